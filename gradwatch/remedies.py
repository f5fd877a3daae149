"""Architecture facts read once from the model, and the ranked remedies they imply.

Remedies read the model (activation types, recurrent cells, normalisation, residual structure,
each weight's init scale against He/Xavier); they never read the statistics. The few figures
a remedy quotes (a clipping threshold) are passed in by the monitor.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from gradwatch.activations import RELU_TYPES, SIGMOID_TYPES, TANH_TYPES

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_RELU_LIKE: tuple[type[nn.Module], ...] = (*RELU_TYPES, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish)
_WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_RESIDUAL_NAME = re.compile(r"res(idual|block|net|unit)?|skip|shortcut|bottleneck|basicblock|downsample", re.I)
_BUILTIN_RESIDUAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# Init scale outside [1/1.5, 1.5] of the fitting scheme is worth naming: PyTorch's default
# (kaiming_uniform with a=sqrt(5)) is 0.41x He and 0.58x Xavier for square layers, which is
# exactly what makes deep default-init ReLU and tanh stacks vanish.
_INIT_BAND = (1 / 1.5, 1.5)
_DEEP = 8  # weight layers from which a plain stack is "deep" (He et al. 2016 saw degradation from ~20)


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more, {len(names)} in all)" if len(names) > limit else "")


@dataclass
class InitFact:
    """A weight whose std is far from the He/Xavier value for its fan-in."""

    name: str
    std: float
    expected: float
    scheme: str  # "He" or "Xavier"

    @property
    def factor(self) -> float:
        """std / expected std."""
        return self.std / self.expected if self.expected else math.inf


@dataclass
class ModelFacts:
    """What remedies need to know about the model's architecture."""

    sigmoid: list[str] = field(default_factory=list)
    tanh: list[str] = field(default_factory=list)
    relu: list[str] = field(default_factory=list)
    relu_like: list[str] = field(default_factory=list)
    vanilla_rnn: list[str] = field(default_factory=list)
    gated_rnn: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    weight_layers: list[str] = field(default_factory=list)
    has_residual: bool = False
    zero_init: list[str] = field(default_factory=list)
    small_init: list[InitFact] = field(default_factory=list)
    large_init: list[InitFact] = field(default_factory=list)

    @property
    def deep_plain(self) -> bool:
        """A stack of many weight layers with no detectable skip connection."""
        return len(self.weight_layers) >= _DEEP and not self.has_residual


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def inspect_model(model: nn.Module) -> ModelFacts:
    """Read the architecture facts of ``model`` (once, at construction)."""
    f = ModelFacts()
    weights: list[tuple[str, torch.Tensor]] = []
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if isinstance(m, SIGMOID_TYPES):
            f.sigmoid.append(label)
        elif isinstance(m, TANH_TYPES):
            f.tanh.append(label)
        elif isinstance(m, RELU_TYPES):
            f.relu.append(label)
        if isinstance(m, _RELU_LIKE):
            f.relu_like.append(label)
        if isinstance(m, (nn.RNN, nn.RNNCell)):
            f.vanilla_rnn.append(label)
        elif isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)):
            f.gated_rnn.append(label)
        if isinstance(m, _NORM_TYPES):
            f.norms.append(label)
        if isinstance(m, _BUILTIN_RESIDUAL) or (
            name and (_RESIDUAL_NAME.search(type(m).__name__) or _RESIDUAL_NAME.search(name.rsplit(".", 1)[-1]))
        ):
            f.has_residual = True
        if isinstance(m, _WEIGHT_TYPES) and m.weight is not None and m.weight.dim() >= 2:
            f.weight_layers.append(label)
            weights.append((label, m.weight.detach()))
    # After the scan: the fitting init scheme depends on every activation in the model.
    for label, w in weights:
        _check_init(f, label, w)
    return f


def _check_init(f: ModelFacts, label: str, w: torch.Tensor) -> None:
    if w.numel() == 0 or w.is_meta:
        return
    std = float(w.float().std()) if w.numel() > 1 else float(w.float().abs().mean())
    if std == 0.0:
        f.zero_init.append(label)
        return
    fan_in, fan_out = _fans(w)
    # The fitting scheme follows the activations: He for the ReLU family, Xavier for sigmoid/tanh.
    if f.relu_like or not (f.sigmoid or f.tanh):
        scheme, expected = "He", math.sqrt(2.0 / fan_in)
    else:
        scheme, expected = "Xavier", math.sqrt(2.0 / (fan_in + fan_out))
    fact = InitFact(label, std, expected, scheme)
    if fact.factor < _INIT_BAND[0]:
        f.small_init.append(fact)
    elif fact.factor > _INIT_BAND[1]:
        f.large_init.append(fact)


def _init_fix(scheme: str) -> str:
    return (
        "nn.init.kaiming_normal_(w, nonlinearity='relu')"
        if scheme == "He"
        else "nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain('tanh'))"
    )


def _init_remedy(facts: list[InitFact], direction: str) -> str:
    # Named in model order; the figure quoted is the median factor, typical of the layers named.
    factor = statistics.median(x.factor for x in facts)
    scheme = facts[0].scheme
    return (
        f"Initialise {_names([x.name for x in facts])} with {scheme} init ({_init_fix(scheme)}): their weight "
        f"std is {factor:.2g}x the {scheme} value for their fan-in, so each layer {direction} the signal."
    )


def _clip_remedy(typical_norm: float | None) -> str:
    if typical_norm is not None and math.isfinite(typical_norm) and typical_norm > 0:
        t = float(f"{2 * typical_norm:.2g}")
        return (
            f"Clip gradients: gw.clip.Norm(max_norm={t:g}) (2x the typical total norm seen so far, "
            f"{typical_norm:.3g}), or gw.clip.ZScore() to clip only outliers."
        )
    return "Clip gradients: gw.clip.Norm(max_norm=1.0), or gw.clip.ZScore() to clip only outliers."


def remedies_for(
    kind: str, facts: ModelFacts, *, typical_norm: float | None = None, source: str | None = None
) -> tuple[str, ...]:
    """Ranked remedies for an alert of ``kind`` on a model with these facts.

    Args:
        kind: the alert kind.
        facts: from :func:`inspect_model`.
        typical_norm: typical total gradient norm observed (for a clipping threshold).
        source: the check that fired (``"time:<layer>"`` for vanishing across time steps).
    """
    out: list[str] = []
    squashing = facts.sigmoid + facts.tanh
    norm_fix = (
        "Add normalisation (nn.BatchNorm1d/2d after each Linear/Conv, or nn.LayerNorm) so every layer's "
        "input stays at unit scale."
    )
    rnn_fix = (
        f"Replace the vanilla recurrent cell {_names(facts.vanilla_rnn)} with nn.LSTM or nn.GRU: their gates and "
        "memory cell keep the gradient alive across time steps (set the LSTM forget-gate bias to 1, or ~3 for "
        "~50-step memories: a fraction sigmoid(bias)^T of the cell survives T steps at init)."
    )
    if kind == "vanishing" and source is not None and source.startswith("time:"):
        layer = source[len("time:") :]
        if layer in facts.vanilla_rnn:
            out.append(rnn_fix)
        else:
            out.append(
                f"If `{layer}` is an LSTM, raise its forget-gate bias (entries [H:2H] of bias_ih/bias_hh) to 1, or "
                "~3 for ~50-step memories: a fraction sigmoid(bias)^T of the cell survives T steps at init."
            )
        out.append(
            "Shorten the span the gradient must cross: a loss at every time step (not only the last), shorter "
            "or chunked sequences, or attention / skip connections across time."
        )
        return tuple(out)
    if kind == "vanishing":
        if facts.zero_init:
            out.append(
                f"Never initialise weights to zero: {_names(facts.zero_init)} are all zeros, so their units stay "
                "identical and pass no gradient; use nn.init.kaiming_normal_ (ReLU) or nn.init.xavier_uniform_ "
                "(tanh/sigmoid)."
            )
        if facts.sigmoid:
            out.append(
                f"Replace the sigmoid activations {_names(facts.sigmoid)} with nn.ReLU or nn.LeakyReLU (with He "
                f"init): sigmoid's derivative is at most 1/4, so {len(facts.sigmoid)} of them shrink the gradient "
                f"by up to 4^{len(facts.sigmoid)}."
            )
        if facts.vanilla_rnn:
            out.append(rnn_fix)
        if facts.small_init:
            out.append(_init_remedy(facts.small_init, "shrinks"))
        if facts.tanh and not facts.sigmoid:
            out.append(
                f"Replace the tanh activations {_names(facts.tanh)} with nn.ReLU/nn.LeakyReLU, or keep them with "
                "Xavier init: tanh's derivative falls below 1 everywhere but at 0."
            )
        if not facts.norms and facts.weight_layers:
            out.append(norm_fix)
        if facts.deep_plain:
            out.append(
                f"Add residual connections (x + f(x)) around blocks of the {len(facts.weight_layers)}-layer plain "
                "stack, so the gradient has an identity path to the early layers."
            )
        if not out:
            out.append("Check for a detached tensor or a frozen block between the early and the late layers.")
    elif kind == "exploding":
        # The cause first when the model shows one (oversized init, a vanilla recurrence); clipping
        # contains any explosion, so it comes next (first when no cause is visible).
        if facts.large_init:
            out.append(_init_remedy(facts.large_init, "amplifies"))
        if facts.vanilla_rnn:
            out.append(rnn_fix)
        out.append(_clip_remedy(typical_norm))
        out.append("Lower the learning rate, or add a warm-up: large updates feed larger gradients.")
        out.append(
            "Check the loss scale: normalise inputs and regression targets to unit variance (a target of ~1000 "
            "makes MSE gradients ~1000x larger)."
        )
        if not facts.norms and facts.weight_layers:
            out.append(norm_fix)
        if facts.deep_plain:
            out.append(
                f"Add residual connections around blocks of the {len(facts.weight_layers)}-layer plain stack."
            )
    elif kind == "spike":
        out.append(_clip_remedy(typical_norm))
        out.append("Lower the peak learning rate or lengthen its warm-up.")
        out.append("Look at the batch of that step for outliers or corrupted labels.")
    elif kind == "nonfinite":
        out.append(
            "Find the operation that overflows: log(0), division by ~0, sqrt of a negative; prefer fused, stable "
            "forms (F.log_softmax, nn.BCEWithLogitsLoss instead of log(sigmoid(x)))."
        )
        out.append(_clip_remedy(typical_norm))
        out.append("Under float16 use torch.amp.GradScaler, or train in bfloat16; lower the learning rate.")
    elif kind == "dead":
        units = facts.relu or ["the ReLU modules"]
        out.append(
            f"Replace {_names(units)} with nn.LeakyReLU(0.01) or nn.GELU, whose gradient is never exactly zero."
        )
        out.append("Lower the learning rate: one large update can push a unit's input below zero for every sample.")
        out.append("Initialise with He init and zero (not negative) biases.")
        if not facts.norms:
            out.append(norm_fix)
    elif kind == "saturated":
        if squashing:
            out.append(
                f"Replace {_names(squashing)} with nn.ReLU/nn.LeakyReLU, which do not saturate for positive inputs."
            )
        out.append("Add nn.BatchNorm/nn.LayerNorm before the activations to keep their inputs near 0.")
        out.append("Use Xavier init (nn.init.xavier_uniform_) so pre-activations start at unit scale.")
    elif kind == "desync":
        from gradwatch.desync import remedies as desync_remedies  # the cause follows the check that fired

        out.extend(desync_remedies(source))
    return tuple(out)
