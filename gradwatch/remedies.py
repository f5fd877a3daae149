"""Architecture facts read once from the model, and remedies ranked by the evidence.

:func:`inspect_model` reads the architecture once (activation types, recurrent cells, attention
projections, normalisation, residual structure, each weight's init scale against the scheme that
fits its activation, bias offsets, half precision). :func:`remedies_for` turns an alert into ranked
remedies: every candidate fix gets a score from what points to it, and the fixes are sorted by it.

Evidence outranks architecture: a measured cause (inputs far from unit scale, an update that moves
a layer by 10% of its weights, a loss that started in the thousands, a batch of one sample) comes
before a fix the architecture merely allows, and each such remedy quotes its figure. The scores:

====  =======================================================================================
 7    decisive precision fact (float16 parameters for a non-finite alert)
 6    measured input scale; attention q/k behind the alert; bias init that keeps ReLUs off;
      zero init; batch size 1 for a spike; a loss jump at the spike's step; a vanilla recurrent
      matrix of spectral radius > 1 behind an explosion
 5.5  oversized init for an explosion / saturation; the loss's own scale (targets)
 5    measured learning rate (update-to-weight ratio >= 0.1); a layer the loss never reaches
 3-4  architecture that explains the kind (sigmoid/tanh stacks, vanilla RNNs, small init)
 <3   generic containment and hygiene (clipping, normalisation, residual paths, warm-up)
====  =======================================================================================

Thresholds on the evidence, each from the physics it stands for:

* input RMS >= 10 (:data:`INPUT_RMS_HIGH`): He/Xavier init assume unit-scale inputs; ten times that
  puts the first layer's pre-activations and its weight gradient (which is proportional to the
  input) an order of magnitude off. RMS <= 1e-2 (:data:`INPUT_RMS_LOW`): two orders below.
* update-to-weight ratio >= 0.1 (:data:`UPDATE_HIGH`): the common healthy heuristic is ~1e-3 per
  step; at 1e-1 (100x) a tenth of the weights is replaced every step. It is quoted as the learning
  rate's fault unless an oversized init explains the large gradient behind it.
* starting loss >= 100 (:data:`LOSS_SCALE_HIGH`): a cross-entropy starts near ln(classes) (< 12 for
  1e5 classes); a mean squared error starts near the targets' mean square, so 100 means targets of
  RMS >= 10, i.e. not standardised.
* a loss >= 10x its running mean at the spike's step (:data:`LOSS_JUMP_HIGH`): the batch itself was
  extreme, not the optimizer's state.
* growth >= 10x per step right before a non-finite step (:data:`PRIOR_GROWTH`): healthy norms move
  by less than 3x per step; the Inf is where an explosion ended, not a numerics bug.
* a bias mean below -1 pre-activation std (:data:`BIAS_SHIFT`): with unit inputs, fewer than 16%
  of a ReLU's inputs can then turn it on.
* a vanilla recurrent matrix ``weight_hh`` of spectral radius > 1 (:data:`RECURRENT_RADIUS`): the
  linearised recurrence multiplies the state, and the gradient through T steps, by up to radius^T
  (3^30 = 2e14); PyTorch's default init (uniform +-1/sqrt(H)) gives ~0.58. An amplifying model also
  explains a large starting loss: a cross-entropy far above ln(classes) means huge logits, not targets
  to standardise, so the targets remedy is dropped whenever the model or its inputs amplify.
* an init that amplifies the signal 1e6-fold through the stack (:data:`INIT_AMPLIFICATION`, the product
  of the oversized layers' std factors) explains a non-finite gradient even on the first step.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradwatch.activations import RELU_TYPES, SIGMOID_TYPES, TANH_TYPES
from gradwatch.evidence import EvidenceSnapshot

__all__ = ["BiasFact", "InitFact", "ModelFacts", "RecurrentFact", "inspect_model", "remedies_for"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# The He family: piecewise-linear (or close) units that pass about half of the signal's variance.
_HE_TYPES: tuple[type[nn.Module], ...] = (*RELU_TYPES, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.RReLU)
# Smooth units that the brief of issue 11 gives Xavier (gain 1): GELU, SiLU, Mish.
_SMOOTH_TYPES: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, nn.Mish)
_WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_RESIDUAL_NAME = re.compile(r"res(idual|block|net|unit)?|skip|shortcut|bottleneck|basicblock|downsample", re.I)
_BUILTIN_RESIDUAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_QK_NAME = re.compile(r"^(q|k|wq|wk|query|key|q_proj|k_proj|to_q|to_k|q_lin|k_lin)$", re.I)
# Init scale outside [1/1.5, 1.5] of the fitting scheme is worth naming: PyTorch's default
# (kaiming_uniform with a=sqrt(5)) is 0.41x He and 0.58x Xavier for square layers, which is
# exactly what makes deep default-init ReLU and tanh stacks vanish.
_INIT_BAND = (1 / 1.5, 1.5)
_DEEP = 8  # weight layers from which a plain stack is "deep" (He et al. 2016 saw degradation from ~20)

INPUT_RMS_HIGH = 10.0
INPUT_RMS_LOW = 1e-2
UPDATE_HIGH = 0.1
LOSS_SCALE_HIGH = 100.0
LOSS_JUMP_HIGH = 10.0
PRIOR_GROWTH = 10.0
BIAS_SHIFT = -1.0
# Product of the oversized layers' std factors (each layer multiplies the signal's scale by its factor):
# 1e6 is six orders of magnitude from the init alone (3x on 13 layers, 2x on 20).
INIT_AMPLIFICATION = 1e6
# Spectral radius of a vanilla recurrent matrix above which the recurrence amplifies: the gradient through
# T steps scales like radius^T (Pascanu et al. 2013: radius > 1 is necessary for exploding gradients).
RECURRENT_RADIUS = 1.0


def _names(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more, {len(names)} in all)" if len(names) > limit else "")


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 else f"{x:.1e}"


def _g(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


@dataclass
class InitFact:
    """A weight whose std is far from the value of the init scheme that fits its activation."""

    name: str
    std: float
    expected: float
    scheme: str  # "He" or "Xavier"
    fix: str = "nn.init.kaiming_normal_(w, nonlinearity='relu')"

    @property
    def factor(self) -> float:
        """std / expected std."""
        return self.std / self.expected if self.expected else math.inf


@dataclass
class BiasFact:
    """A layer whose bias sits far below zero against its pre-activation scale."""

    name: str
    mean: float
    shift: float  # bias mean / (weight std * sqrt(fan_in)): in pre-activation stds for unit inputs


@dataclass
class RecurrentFact:
    """A vanilla recurrent matrix (``weight_hh``) whose spectral radius exceeds 1."""

    name: str  # the parameter's qualified name, e.g. ``rnn.weight_hh_l0``
    radius: float


@dataclass
class ModelFacts:
    """What remedies need to know about the model's architecture."""

    sigmoid: list[str] = field(default_factory=list)
    tanh: list[str] = field(default_factory=list)
    relu: list[str] = field(default_factory=list)
    relu_like: list[str] = field(default_factory=list)
    smooth: list[str] = field(default_factory=list)  # GELU, SiLU, Mish
    vanilla_rnn: list[str] = field(default_factory=list)
    gated_rnn: list[str] = field(default_factory=list)
    lstm: list[str] = field(default_factory=list)
    gru: list[str] = field(default_factory=list)
    attention_qk: list[str] = field(default_factory=list)  # q/k projections, nn.MultiheadAttention modules
    norms: list[str] = field(default_factory=list)
    weight_layers: list[str] = field(default_factory=list)
    has_residual: bool = False
    half: bool = False  # some parameter is float16
    zero_init: list[str] = field(default_factory=list)
    small_init: list[InitFact] = field(default_factory=list)
    large_init: list[InitFact] = field(default_factory=list)
    negative_bias: list[BiasFact] = field(default_factory=list)
    recurrent_radius: list[RecurrentFact] = field(default_factory=list)  # vanilla weight_hh with radius > 1

    @property
    def deep_plain(self) -> bool:
        """A stack of many weight layers with no detectable skip connection."""
        return len(self.weight_layers) >= _DEEP and not self.has_residual

    def scheme(self) -> tuple[str, float, str]:
        """The init scheme that fits the model's activations: ``(name, gain, call)``.

        ReLU family: He. tanh: Xavier with ``calculate_gain('tanh')`` (5/3). sigmoid: Xavier, gain 1
        (``calculate_gain('sigmoid')`` is 1). GELU/SiLU/Mish: Xavier, gain 1. No activation module: He.
        """
        if self.relu_like:
            return "He", math.sqrt(2.0), "nn.init.kaiming_normal_(w, nonlinearity='relu')"
        if self.tanh:
            return "Xavier", 5.0 / 3.0, "nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain('tanh'))"
        if self.sigmoid or self.smooth:
            return "Xavier", 1.0, "nn.init.xavier_uniform_(w)"
        return "He", math.sqrt(2.0), "nn.init.kaiming_normal_(w, nonlinearity='relu')"


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def inspect_model(model: nn.Module) -> ModelFacts:
    """Read the architecture facts of ``model`` (once, at construction)."""
    f = ModelFacts()
    weights: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if isinstance(m, SIGMOID_TYPES):
            f.sigmoid.append(label)
        elif isinstance(m, TANH_TYPES):
            f.tanh.append(label)
        elif isinstance(m, RELU_TYPES):
            f.relu.append(label)
        if isinstance(m, _HE_TYPES):
            f.relu_like.append(label)
        if isinstance(m, _SMOOTH_TYPES):
            f.smooth.append(label)
        if isinstance(m, (nn.RNN, nn.RNNCell)):
            f.vanilla_rnn.append(label)
            _check_recurrent(f, name, m)
        elif isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)):
            f.gated_rnn.append(label)
            (f.lstm if isinstance(m, (nn.LSTM, nn.LSTMCell)) else f.gru).append(label)
        if isinstance(m, nn.MultiheadAttention) or (
            isinstance(m, nn.Linear) and name and _QK_NAME.match(name.rsplit(".", 1)[-1])
        ):
            f.attention_qk.append(label)
        if isinstance(m, _NORM_TYPES):
            f.norms.append(label)
        if isinstance(m, _BUILTIN_RESIDUAL) or (
            name and (_RESIDUAL_NAME.search(type(m).__name__) or _RESIDUAL_NAME.search(name.rsplit(".", 1)[-1]))
        ):
            f.has_residual = True
        if isinstance(m, _WEIGHT_TYPES) and m.weight is not None and m.weight.dim() >= 2:
            f.weight_layers.append(label)
            bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
            weights.append((label, m.weight.detach(), bias))
    f.half = any(p.dtype == torch.float16 for p in model.parameters())
    # After the scan: the fitting init scheme depends on every activation in the model.
    for label, w, b in weights:
        _check_init(f, label, w, b)
    return f


def _check_recurrent(f: ModelFacts, name: str, m: nn.Module) -> None:
    """Record each ``weight_hh`` of a vanilla RNN whose spectral radius exceeds :data:`RECURRENT_RADIUS`."""
    for pname, w in m.named_parameters(recurse=False):
        if not pname.startswith("weight_hh") or w.dim() != 2 or w.shape[0] != w.shape[1] or w.is_meta:
            continue
        wd = w.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(wd).all()):
            # Weights already overflowed have no spectral radius; LAPACK's eigensolver (MKL's DGEBAL)
            # segfaults on NaN input, which would take the training process down with it.
            continue
        radius = float(torch.linalg.eigvals(wd).abs().max())
        if radius > RECURRENT_RADIUS:
            f.recurrent_radius.append(RecurrentFact(f"{name}.{pname}" if name else pname, radius))


def _recurrent_remedy(facts: list[RecurrentFact]) -> str:
    worst = max(x.radius for x in facts)
    return (
        f"Initialise {_names([x.name for x in facts])} orthogonal (nn.init.orthogonal_) or rescale it to spectral "
        f"radius <= 1: its radius is {worst:.2g}, so the gradient through T time steps grows like {worst:.2g}^T; "
        "or use nn.LSTM/nn.GRU, and clip gradients."
    )


def _check_init(f: ModelFacts, label: str, w: torch.Tensor, b: torch.Tensor | None) -> None:
    if w.numel() == 0 or w.is_meta:
        return
    wf = w.float()
    std = float(wf.std()) if w.numel() > 1 else float(wf.abs().mean())
    if std == 0.0:
        f.zero_init.append(label)
        return
    fan_in, fan_out = _fans(w)
    scheme, gain, fix = f.scheme()
    expected = gain / math.sqrt(fan_in) if scheme == "He" else gain * math.sqrt(2.0 / (fan_in + fan_out))
    fact = InitFact(label, std, expected, scheme, fix)
    if fact.factor < _INIT_BAND[0]:
        f.small_init.append(fact)
    elif fact.factor > _INIT_BAND[1]:
        f.large_init.append(fact)
    if b is not None and b.numel() and not b.is_meta:
        mean = float(b.float().mean())
        shift = mean / (std * math.sqrt(fan_in))  # pre-activation std of w @ x for unit-variance inputs
        if shift < BIAS_SHIFT:
            f.negative_bias.append(BiasFact(label, mean, shift))


# ------------------------------------------------------------------------------------ remedy texts
def _init_remedy(facts: list[InitFact], direction: str) -> str:
    # Named in model order; the figure quoted is the median factor, typical of the layers named.
    factor = statistics.median(x.factor for x in facts)
    scheme = facts[0].scheme
    return (
        f"Initialise {_names([x.name for x in facts])} with {scheme} init ({facts[0].fix}): their weight "
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


_NORM_FIX = (
    "Add normalisation (nn.BatchNorm1d/2d after each Linear/Conv, or nn.LayerNorm) so every layer's "
    "input stays at unit scale."
)


def _rnn_fix(facts: ModelFacts) -> str:
    return (
        f"Replace the vanilla recurrent cell {_names(facts.vanilla_rnn)} with nn.LSTM or nn.GRU: their gates and "
        "memory cell keep the gradient alive across time steps (set the LSTM forget-gate bias to 1, or ~3 for "
        "~50-step memories: a fraction sigmoid(bias)^T of the cell survives T steps at init)."
    )


class _Ranked:
    """Candidate remedies with scores; :meth:`ranked` sorts by score, ties in the order added."""

    def __init__(self) -> None:
        self._items: list[tuple[float, int, str]] = []

    def add(self, score: float, text: str) -> None:
        if all(t != text for _, _, t in self._items):
            self._items.append((score, len(self._items), text))

    def ranked(self) -> tuple[str, ...]:
        return tuple(t for _, _, t in sorted(self._items, key=lambda x: (-x[0], x[1])))


@dataclass
class _Clues:
    """The evidence, digested for ranking: each field is ``None`` unless it points to a cause."""

    inputs_high: str | None = None
    inputs_low: str | None = None
    lr_high: str | None = None
    loss_scale: str | None = None
    batch_one: str | None = None
    loss_jump: str | None = None
    prior_growth: float | None = None


def _clues(ev: EvidenceSnapshot | None, kind: str, step_of_alert: int | None) -> _Clues:
    c = _Clues()
    if ev is None:
        return c
    where = f"`{ev.input_layer}`" if ev.input_layer else "the model"
    if ev.input_rms is not None and math.isfinite(ev.input_rms):
        if ev.input_rms >= INPUT_RMS_HIGH:
            c.inputs_high = (
                f"Normalise the inputs to zero mean and unit variance: {where} receives inputs of RMS "
                f"{_g(ev.input_rms)} (max {_g(ev.input_max or ev.input_rms)}), while He/Xavier init assume ~1."
            )
        elif 0 < ev.input_rms <= INPUT_RMS_LOW:
            c.inputs_low = (
                f"Normalise the inputs to zero mean and unit variance: {where} receives inputs of RMS "
                f"{_g(ev.input_rms)}, so its weight gradient (proportional to its input) is tiny."
            )
    # An update is the learning rate's doing where the gradient behind it was not exploding (||g||/||w||
    # below Exploding's 50; SGD's update is lr * ||g||/||w||), or under Adam-family optimizers, whose
    # update is ~lr per entry whatever the gradient's size: the evidence keeps the largest such update.
    if ev.peak_update is not None and ev.peak_update[1] >= UPDATE_HIGH:
        layer, ratio, when = ev.peak_update
        who = ev.optimizer.describe(layer) if ev.optimizer is not None else "the optimizer"
        at = f" at step {when}"
        c.lr_high = (
            f"Lower the learning rate: {who} moved `{layer}` by {_pct(ratio)} of its weights in one step{at} "
            "(~0.1% is healthy)."
        )
    if ev.loss_start is not None and math.isfinite(ev.loss_start) and ev.loss_start >= LOSS_SCALE_HIGH:
        c.loss_scale = (
            f"Standardise the regression targets (and inputs) to unit variance: the loss started at "
            f"{_g(ev.loss_start)}, and its gradients scale with it (a cross-entropy starts near ln(classes))."
        )
    if ev.batch_size is not None and ev.batch_size <= 2:
        c.batch_one = (
            f"Raise the batch size: with {ev.batch_size} sample(s) per step the gradient's noise is as large "
            "as its signal; or lower the learning rate with it."
        )
    jump = ev.finding.get("loss_jump") if ev.finding else None
    if jump is None and ev.loss_jump is not None and ev.loss_jump_step == step_of_alert:
        jump = ev.loss_jump
    if jump is not None and jump >= LOSS_JUMP_HIGH:
        at = f"step {step_of_alert}" if step_of_alert is not None else "that step"
        c.loss_jump = (
            f"Look at the batch of {at} for outliers or corrupted samples: the loss jumped to {_g(jump)}x its "
            "running mean at that step, so the batch itself was extreme; skip or fix it."
        )
    growth = ev.finding.get("prior_growth") if ev.finding else None
    if growth is not None and growth >= PRIOR_GROWTH:
        c.prior_growth = growth
    return c


def remedies_for(
    kind: str,
    facts: ModelFacts,
    *,
    typical_norm: float | None = None,
    source: str | None = None,
    evidence: EvidenceSnapshot | None = None,
    layers: Sequence[str] = (),
    step: int | None = None,
) -> tuple[str, ...]:
    """Ranked remedies for an alert of ``kind`` on a model with these facts and this evidence.

    Args:
        kind: the alert kind.
        facts: from :func:`inspect_model`.
        typical_norm: typical total gradient norm observed (for a clipping threshold).
        source: the check that fired (``"time:<layer>"`` for vanishing across time steps).
        evidence: what gradwatch measured beyond the gradients (:class:`~gradwatch.evidence.EvidenceSnapshot`).
        layers: the layers the alert names, most relevant first.
        step: the step of the alert (a loss jump at that very step points at the batch).
    """
    r = _Ranked()
    c = _clues(evidence, kind, step)
    if c.inputs_high or facts.large_init or facts.recurrent_radius:
        # The inputs, the init or an expanding recurrence explain a large starting loss (a cross-entropy
        # far above ln(classes) means huge logits): the targets are then no cause to name.
        c.loss_scale = None
    squashing = facts.sigmoid + facts.tanh
    big_init = [x for x in facts.large_init if x.name not in facts.attention_qk] or facts.large_init
    qk_named = [x for x in layers if x in facts.attention_qk]
    qk_large = [x for x in facts.large_init if x.name in facts.attention_qk]
    if facts.attention_qk and kind in ("vanishing", "exploding", "saturated") and (qk_named or qk_large):
        qk = qk_named or [x.name for x in qk_large]
        init_note = ""
        if qk_large:
            init_note = (
                f" and initialise {_names([x.name for x in qk_large])} at PyTorch's default scale (their weight std "
                f"is {statistics.median(x.factor for x in qk_large):.2g}x the {qk_large[0].scheme} value)"
            )
        r.add(6, (
            f"Scale the attention scores by 1/sqrt(d) (q @ k.transpose(-2, -1) / math.sqrt(d), or use "
            f"F.scaled_dot_product_attention){init_note}: large unscaled scores from {_names(qk)} saturate the "
            "softmax, whose gradient then vanishes."
        ))

    if kind == "vanishing" and source is not None and source.startswith("time:"):
        layer = source[len("time:") :]
        if layer in facts.vanilla_rnn:
            r.add(4, _rnn_fix(facts))
        elif layer in facts.gru:
            r.add(3, (
                "Shorten the span the gradient must cross: a loss at every time step (not only the last), shorter "
                "or chunked sequences, or attention / skip connections across time."
            ))
            r.add(2.5, (
                f"Raise the update-gate bias of `{layer}` (entries [H:2H] of bias_ih/bias_hh) to ~2-3: the state is "
                "then mostly carried over, and a fraction sigmoid(bias)^T of the gradient survives T steps."
            ))
        else:
            r.add(4, (
                f"If `{layer}` is an LSTM, raise its forget-gate bias (entries [H:2H] of bias_ih/bias_hh) to 1, or ~3 "
                "for ~50-step memories: a fraction sigmoid(bias)^T of the cell survives T steps at init."
            ))
        r.add(3, (
            "Shorten the span the gradient must cross: a loss at every time step (not only the last), shorter "
            "or chunked sequences, or attention / skip connections across time."
        ))
        return r.ranked()

    if kind == "vanishing" and source == "update":
        largest = evidence.finding.get("max_update") if evidence is not None else None
        opt = evidence.optimizer if evidence is not None else None
        who = opt.describe() if opt is not None else "the optimizer"
        moved = f" moved no layer by more than {_pct(largest)} of its weights per step" if largest else " barely moves"
        r.add(7, (
            f"Raise the learning rate: {who}{moved} (~0.1% is healthy), and the loss has not improved since the first "
            "step; try 10-100x, or a learning-rate finder."
        ))
        r.add(2, "Check that the learning-rate schedule does not start at (or decay to) ~0.")
        return r.ranked()
    if kind == "vanishing":
        if facts.zero_init:
            r.add(6, (
                f"Never initialise weights to zero: {_names(facts.zero_init)} are all zeros, so their units stay "
                "identical and pass no gradient; use nn.init.kaiming_normal_ (ReLU) or nn.init.xavier_uniform_ "
                "(tanh/sigmoid)."
            ))
        elif source == "zero":
            # Backward reaches these layers (layers it never reaches are no_gradient's) and delivers exact
            # zeros: something above them passes no gradient, most often a layer of all-dead ReLUs.
            named = list(layers) or ["the layer"]
            if facts.relu:
                r.add(5, (
                    f"Replace {_names(facts.relu)} with nn.LeakyReLU(0.01) or nn.GELU: {_names(named)} get exactly "
                    "zero gradients although backward reaches them, which a layer of ReLUs that are all off (dead) "
                    "above them causes; check the biases and the learning rate too."
                ))
            r.add(4.5, (
                f"Find what zeroes the gradient above {_names(named)}: a mask or a multiplication by 0, zero "
                "weights downstream, or an output routed around the loss; if it is unused in forward(), remove it."
            ))
        if c.inputs_low:
            r.add(6, c.inputs_low)
        if c.lr_high:
            r.add(5, c.lr_high + " Large steps push units into their dead or saturated range.")
        if facts.vanilla_rnn:
            r.add(4, _rnn_fix(facts))
        if facts.sigmoid:
            r.add(3.5, (
                f"Replace the sigmoid activations {_names(facts.sigmoid)} with nn.ReLU or nn.LeakyReLU (with He "
                f"init): sigmoid's derivative is at most 1/4, so {len(facts.sigmoid)} of them shrink the gradient "
                f"by up to 4^{len(facts.sigmoid)}."
            ))
        if facts.tanh and not facts.sigmoid:
            r.add(3.2, (
                f"Replace the tanh activations {_names(facts.tanh)} with nn.ReLU/nn.LeakyReLU, or keep them with "
                "Xavier init (gain calculate_gain('tanh')): tanh's derivative falls below 1 everywhere but at 0."
            ))
        if facts.small_init:
            r.add(3, _init_remedy(facts.small_init, "shrinks"))
        if not facts.norms and facts.weight_layers:
            r.add(2, _NORM_FIX)
        if facts.deep_plain:
            r.add(1.5, (
                f"Add residual connections (x + f(x)) around blocks of the {len(facts.weight_layers)}-layer plain "
                "stack, so the gradient has an identity path to the early layers."
            ))
        if not r.ranked():
            r.add(0, "Check for a detached tensor or a frozen block between the early and the late layers.")
    elif kind == "exploding":
        # The cause first where the evidence shows one; clipping contains any explosion, so it comes
        # next (first when no cause is visible).
        if c.inputs_high:
            r.add(6, c.inputs_high)
        if facts.recurrent_radius:
            r.add(6, _recurrent_remedy(facts.recurrent_radius))
        if c.loss_scale:
            r.add(5.5, c.loss_scale)
        if big_init:
            r.add(5.5 if c.lr_high or c.prior_growth else 4, _init_remedy(big_init, "amplifies"))
        if c.lr_high:
            r.add(5, c.lr_high + " Large updates feed larger gradients.")
        if facts.vanilla_rnn:
            r.add(4, _rnn_fix(facts))
        r.add(3, _clip_remedy(typical_norm))
        if not c.lr_high:
            r.add(2, "Lower the learning rate, or add a warm-up: large updates feed larger gradients.")
        r.add(1.8, (
            "Check the loss scale: normalise inputs and regression targets to unit variance (a target of ~1000 "
            "makes MSE gradients ~1000x larger)."
        ))
        if not facts.norms and facts.weight_layers:
            r.add(1.6, _NORM_FIX)
        if facts.deep_plain:
            r.add(1.5, f"Add residual connections around blocks of the {len(facts.weight_layers)}-layer plain stack.")
    elif kind == "spike":
        if c.batch_one:
            r.add(6, c.batch_one)
        if c.loss_jump:
            r.add(6, c.loss_jump)
        if c.inputs_high:
            r.add(5.5, c.inputs_high)
        if c.lr_high:
            r.add(5, c.lr_high)
        r.add(3, _clip_remedy(typical_norm))
        r.add(2, "Lower the peak learning rate or lengthen its warm-up.")
        r.add(1, "Look at the batch of that step for outliers or corrupted labels.")
    elif kind == "nonfinite":
        if facts.half:
            r.add(7, (
                "Train in float32 or bfloat16 (torch.autocast(dtype=torch.bfloat16)), or keep float32 weights under "
                "torch.autocast with a torch.amp.GradScaler: float16 overflows to Inf above 65504."
            ))
        amplification = math.prod(x.factor for x in facts.large_init) if facts.large_init else 1.0
        if amplification >= INIT_AMPLIFICATION and c.prior_growth is None:
            # The forward signal is amplified by the product of the oversized layers' factors: from the
            # first step, whatever the data, the init alone can overflow.
            r.add(5.5, _init_remedy(big_init, "amplifies"))
        if c.prior_growth is not None:
            # The Inf is where an explosion ended: its causes come first, then the numerics.
            if c.inputs_high:
                r.add(6, c.inputs_high)
            if big_init:
                r.add(5.5, _init_remedy(big_init, "amplifies"))
            if c.lr_high:
                r.add(5, c.lr_high)
            # Without a measured cause the overflow may as well be an unstable op that grew first.
            r.add(3.5, _clip_remedy(typical_norm))
        r.add(4, (
            "Find the operation that overflows: log(0), division by ~0, sqrt of a negative; prefer fused, stable "
            "forms (F.log_softmax, nn.BCEWithLogitsLoss instead of log(sigmoid(x)))."
        ))
        r.add(2, _clip_remedy(typical_norm))
        r.add(1.5, "Under float16 use torch.amp.GradScaler, or train in bfloat16; lower the learning rate.")
    elif kind == "dead":
        if facts.negative_bias:
            worst = min(facts.negative_bias, key=lambda b: b.shift)
            r.add(6, (
                f"Initialise the biases of {_names([b.name for b in facts.negative_bias])} to zero "
                f"(nn.init.zeros_(m.bias)): they start at {_g(worst.mean)}, {abs(worst.shift):.2g} pre-activation "
                "stds below zero, so most ReLUs never fire."
            ))
        if c.lr_high:
            r.add(5, c.lr_high + " One large update can push a unit's input below zero for every sample.")
        if c.inputs_high:
            r.add(4.5, c.inputs_high)
        units = facts.relu or ["the ReLU modules"]
        r.add(3, f"Replace {_names(units)} with nn.LeakyReLU(0.01) or nn.GELU, whose gradient is never exactly zero.")
        if not c.lr_high:
            r.add(2, "Lower the learning rate: one large update can push a unit's input below zero for every sample.")
        r.add(1.5, "Initialise with He init and zero (not negative) biases.")
        if not facts.norms:
            r.add(1, _NORM_FIX)
    elif kind == "saturated":
        if c.inputs_high:
            r.add(6, c.inputs_high)
        if big_init:
            r.add(5.5, _init_remedy(big_init, "amplifies"))
        if c.lr_high:
            r.add(5, c.lr_high)
        if squashing:
            r.add(3, f"Replace {_names(squashing)} with nn.ReLU/nn.LeakyReLU, which do not saturate for positive "
                     "inputs.")
        r.add(2, "Add nn.BatchNorm/nn.LayerNorm before the activations to keep their inputs near 0.")
        scheme = facts.scheme()
        r.add(1, f"Use {scheme[0]} init ({scheme[2]}) so pre-activations start at unit scale.")
    elif kind == "accumulating":
        growth = (evidence.finding.get("growth") if evidence is not None else None) or None
        grown = f" (its norm grew {growth:.2g}x in a few steps)" if growth else ""
        who = f" over {_names(layers)}" if layers else ""
        r.add(6, (
            f"Call optimizer.zero_grad() once per optimizer step, after optimizer.step(): the gradient applied{who} "
            f"is the sum of every step's gradient since it was last zeroed{grown}, a step that grows without bound."
        ))
        r.add(3, (
            "For gradient accumulation over micro-batches, call optimizer.zero_grad() right after each "
            "optimizer.step() and divide each micro-batch's loss by their number."
        ))
    elif kind == "no_gradient":
        if source == "inert":
            frozen = evidence.optimizer.frozen if evidence is not None and evidence.optimizer is not None else ()
            what = _names(frozen) if frozen else "The parameters the optimizer holds"
            r.add(6, (
                f"{what} have requires_grad=False but are the only parameters the optimizer updates: unfreeze them "
                "(requires_grad_(True)), or build the optimizer over the trainable parameters "
                "([p for p in model.parameters() if p.requires_grad])."
            ))
        else:
            named = list(layers) or ["the layer"]
            r.add(6, (
                f"{_names(named)} never reaches the loss: call it in forward() (or remove it from the model and the "
                "optimizer); if it is called, look for a .detach(), .item(), .data or torch.no_grad() between it "
                "and the loss, or a constant 0 factor (a gate or mask left at 0) on its output."
            ))
            r.add(2, (
                f"If {_names(named)} is meant to stay fixed, freeze it (requires_grad_(False)) and leave it out of "
                "the optimizer."
            ))
    elif kind == "desync":
        from gradwatch.desync import remedies as desync_remedies  # the cause follows the check that fired

        for text in desync_remedies(source):
            r.add(6, text)  # already ranked; ties keep their order
    return r.ranked()
