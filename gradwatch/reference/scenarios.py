"""The scenario registry: each pathology beside the remedy that fixes it.

A :class:`Scenario` has a name, a task (data generated in code), a step budget and its
variants: the pathologies (each with the alert kind gradwatch must raise) and the remedies
(which must raise none). Every variant trains on exactly the same batches from the same seed.

The physics is chosen so that the pathology is unmistakable with gradwatch's *default*
detector thresholds -- the scenarios are evidence, not a calibration target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from gradwatch.clip import AGC, Clipper, Norm, ZScore
from gradwatch.reference.models import ResidualMLP, SequenceClassifier, init_weights_, mlp
from gradwatch.reference.tasks import Task, copy_first_token, teacher_regression


@dataclass(frozen=True)
class Variant:
    """One model of a scenario.

    Attributes:
        name: short name (``"sigmoid"``, ``"relu+he"``, ...).
        role: ``"pathology"`` or ``"remedy"``.
        build: returns a fresh model (called after seeding torch).
        expect: for a pathology, the alert kind gradwatch must raise; ``None`` for a remedy.
        clip: returns the clipping strategy of this variant (``None``: no clipping).
        summary: one line on what this variant is.
    """

    name: str
    role: str
    build: Callable[[], nn.Module]
    expect: str | None = None
    clip: Callable[[], Clipper] | None = None
    summary: str = ""


@dataclass(frozen=True)
class Scenario:
    """A pathology and its remedies on one task.

    Attributes:
        name: registry key (``gradwatch demo --scenario NAME``).
        title: one line for tables and the report.
        story: why the pathology happens and why the remedy fixes it.
        task: builds the :class:`~gradwatch.reference.tasks.Task`.
        variants: pathologies first, then remedies.
        steps: optimizer steps (the demo's budget; the tests use the same).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        log_every: gradwatch logging period.
        track_time: profile recurrent modules in time (``GradWatch(track_time=True)``).
        seed: seed of the models' init (the task has its own).
    """

    name: str
    title: str
    story: str
    task: Callable[[], Task]
    variants: tuple[Variant, ...]
    steps: int
    lr: float
    optimizer: str = "adam"
    log_every: int = 5
    track_time: bool = False
    seed: int = 0

    @property
    def pathologies(self) -> tuple[Variant, ...]:
        """The pathology variants."""
        return tuple(v for v in self.variants if v.role == "pathology")

    @property
    def remedies(self) -> tuple[Variant, ...]:
        """The remedy variants."""
        return tuple(v for v in self.variants if v.role == "remedy")

    @property
    def pathology(self) -> Variant:
        """The first pathology."""
        return self.pathologies[0]

    @property
    def remedy(self) -> Variant:
        """The first remedy."""
        return self.remedies[0]

    def variant(self, name: str) -> Variant:
        """The variant called ``name``.

        Raises:
            ValueError: no such variant (the message lists the variants).
        """
        for v in self.variants:
            if v.name == name:
                return v
        names = ", ".join(repr(v.name) for v in self.variants)
        raise ValueError(f"`variant` must be one of {names} for scenario {self.name!r}; got {name!r}")


# ---------------------------------------------------------------------------------------------- builders
DEPTH = 20  # hidden layers of the activation / initialisation / normalisation stacks
WIDTH = 64
RES_DEPTH = 32


def _activation(name: str, init: str, nonlinearity: str) -> Callable[[], nn.Module]:
    return lambda: init_weights_(mlp(DEPTH, WIDTH, activation=name), init, nonlinearity=nonlinearity)


def _init(scheme: str, scale: float, activation: str = "relu", nonlinearity: str = "relu") -> Callable[[], nn.Module]:
    return lambda: init_weights_(mlp(DEPTH, WIDTH, activation=activation), scheme, scale, nonlinearity)


def _rnn(cell: str, forget_bias: float | None = None) -> Callable[[], nn.Module]:
    return lambda: SequenceClassifier(cell, in_dim=8, hidden=64, out_dim=8, forget_bias=forget_bias)


def _clip_mlp() -> nn.Module:
    return init_weights_(mlp(4, WIDTH, activation="relu"), "he", nonlinearity="relu")


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    """Add ``scenario`` to :data:`SCENARIOS` (name must be new)."""
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is already registered")
    SCENARIOS[scenario.name] = scenario
    return scenario


register(
    Scenario(
        name="activation",
        title=f"{DEPTH}-layer MLP: sigmoid vs ReLU / LeakyReLU",
        story=(
            "Sigmoid's derivative is at most 1/4, so the gradient shrinks by at least 4x per layer on its "
            f"way back through {DEPTH} layers. ReLU and LeakyReLU pass it unchanged where active (with He init)."
        ),
        task=lambda: teacher_regression(seed=0),
        variants=(
            Variant("sigmoid", "pathology", _activation("sigmoid", "default", "sigmoid"), expect="vanishing",
                    summary="sigmoid, PyTorch default init"),
            Variant("relu+he", "remedy", _activation("relu", "he", "relu"), summary="ReLU, He init"),
            Variant("leakyrelu+he", "remedy", _activation("leakyrelu", "he", "leaky_relu"),
                    summary="LeakyReLU(0.01), He init"),
        ),
        steps=100,
        lr=1e-3,
    )
)

register(
    Scenario(
        name="recurrence",
        title="copy the first token across 50 steps: vanilla RNN vs LSTM",
        story=(
            "A vanilla RNN multiplies the gradient by the same recurrent Jacobian at every time step, so it "
            "decays geometrically toward the sequence's start (~1e-10 over 50 steps at init) and the first token "
            "cannot be learned. The LSTM's memory cell carries it through the forget gate: with its bias at 3, "
            "sigmoid(3)^50 = 8% of the memory survives 50 steps at init (with bias 1, 0.73^50 = 2e-7)."
        ),
        # Measured (torch 2.13 CPU, seeds 0-2): the LSTM is below 0.1 within ~50 steps; the RNN stays at chance
        # (2.08) for the first 100-150 steps. Given 300 steps Adam sometimes pulls it out (seed 0: 0.09): with
        # blank inputs its input weights get gradient from step 0 only, and Adam rescales that 1e-10 signal.
        task=lambda: copy_first_token(length=50, vocab=8, seed=0),
        variants=(
            Variant("rnn", "pathology", _rnn("rnn"), expect="vanishing", summary="nn.RNN (tanh), hidden 64"),
            Variant("lstm", "remedy", _rnn("lstm", forget_bias=3.0),
                    summary="nn.LSTM, hidden 64, forget-gate bias 3, other biases 0"),
        ),
        steps=100,
        lr=3e-3,
        log_every=5,
        track_time=True,
    )
)

register(
    Scenario(
        name="residual",
        title=f"{RES_DEPTH}-layer tanh stack: plain vs residual",
        story=(
            f"In a plain stack the gradient reaching layer 1 is a product of {RES_DEPTH} Jacobians, each "
            "shrinking it (tanh, default init). A skip connection x + f(x) adds an identity path: the gradient "
            "reaches every layer undiminished."
        ),
        task=lambda: teacher_regression(seed=1),
        variants=(
            Variant("plain", "pathology", lambda: mlp(RES_DEPTH, WIDTH, activation="tanh"), expect="vanishing",
                    summary="plain tanh stack, default init"),
            Variant("residual", "remedy", lambda: ResidualMLP(RES_DEPTH, WIDTH, activation="tanh"),
                    summary="same layers with x + f(x) skips"),
        ),
        steps=100,
        lr=1e-3,
    )
)

register(
    Scenario(
        name="initialisation",
        title=f"{DEPTH}-layer MLP: zero / too-small / too-large init vs He / Xavier",
        story=(
            "All-zero weights make every unit identical and pass no gradient back; weights too small shrink the "
            "signal at every layer, too large amplify it. He init (ReLU) and Xavier init (tanh) keep each "
            "layer's output at the scale of its input."
        ),
        task=lambda: teacher_regression(seed=2),
        variants=(
            Variant("zero", "pathology", _init("zero", 1.0), expect="vanishing", summary="ReLU, all-zero weights"),
            Variant("small", "pathology", _init("he", 0.3), expect="vanishing", summary="ReLU, 0.3x He std"),
            Variant("large", "pathology", _init("he", 2.0), expect="exploding", summary="ReLU, 2x He std"),
            Variant("he", "remedy", _init("he", 1.0), summary="ReLU, He init"),
            Variant("xavier", "remedy", _init("xavier", 1.0, "tanh", "tanh"), summary="tanh, Xavier init"),
        ),
        steps=100,
        lr=1e-3,
    )
)

register(
    Scenario(
        name="normalisation",
        title=f"{DEPTH}-layer sigmoid MLP: without vs with BatchNorm",
        story=(
            "Without normalisation the pre-activations of a deep sigmoid stack drift away from 0, where "
            "sigmoid is flattest, and the gradient shrinks at every layer. BatchNorm re-centres and re-scales "
            "each layer's input so the gradient keeps its scale."
        ),
        task=lambda: teacher_regression(seed=3),
        variants=(
            Variant("plain", "pathology", lambda: mlp(DEPTH, WIDTH, activation="sigmoid"), expect="vanishing",
                    summary="sigmoid, no normalisation"),
            Variant("batchnorm", "remedy", lambda: mlp(DEPTH, WIDTH, activation="sigmoid", batchnorm=True),
                    summary="Linear -> BatchNorm1d -> sigmoid"),
        ),
        steps=100,
        lr=1e-3,
    )
)

register(
    Scenario(
        name="clipping",
        title="learning rate past the stability limit: SGD without vs with clipping",
        story=(
            "With a learning rate past the stability limit every update overshoots, the error grows and with "
            "it the next gradient; through 5 ReLU layers the growth compounds, from 0.5x the weights' norm to "
            "Inf within a few steps. Clipping bounds each update, so the same learning rate trains."
        ),
        task=lambda: teacher_regression(seed=4),
        variants=(
            Variant("none", "pathology", _clip_mlp, expect="nonfinite", summary="5-layer ReLU MLP, SGD lr 0.6"),
            Variant("norm", "remedy", _clip_mlp, clip=lambda: Norm(1.0), summary="+ gw.clip.Norm(1.0)"),
            Variant("agc", "remedy", _clip_mlp, clip=lambda: AGC(), summary="+ gw.clip.AGC(0.01)"),
            # ZScore clips outliers against its running statistics, which need a warm-up (25 steps);
            # this explosion takes 5, so the warm-up is bounded by max_norm.
            Variant("zscore", "remedy", _clip_mlp, clip=lambda: ZScore(max_norm=1.0),
                    summary="+ gw.clip.ZScore(max_norm=1.0)"),
        ),
        steps=100,
        lr=0.6,
        optimizer="sgd",
        # The blow-up takes 5 steps (x6, x2.4, x4, x2e4, Inf): logging every step records the growth
        # before it, which is the story of this scenario's report panel.
        log_every=1,
    )
)


def get_scenario(name: str) -> Scenario:
    """The registered scenario called ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in SCENARIOS:
        names = ", ".join(repr(n) for n in SCENARIOS)
        raise ValueError(f"`scenario` must be one of {names}; got {name!r}")
    return SCENARIOS[name]
