"""Architecture facts read from the model, and the remedies they rank."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from gradwatch.evidence import EvidenceSnapshot, GroupInfo, OptimizerInfo
from gradwatch.remedies import inspect_model, remedies_for


class _RNNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class ResidualBlock(_Block):
    pass


def test_facts_of_a_default_init_sigmoid_stack():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.Sigmoid())])
    f = inspect_model(model)
    assert f.sigmoid == [str(i) for i in range(1, 20, 2)]
    assert f.weight_layers == [str(i) for i in range(0, 20, 2)]
    assert f.deep_plain and not f.has_residual and f.norms == []
    # PyTorch's default init is 1/sqrt(3 fan_in) = 0.58x Xavier for square layers: too small.
    assert [x.name for x in f.small_init] == f.weight_layers
    assert all(x.scheme == "Xavier" and 0.5 < x.factor < 0.66 for x in f.small_init)


def test_vanilla_rnn_gets_lstm_remedy_first():
    f = inspect_model(_RNNModel())
    assert f.vanilla_rnn == ["rnn"]
    rem = remedies_for("vanishing", f)
    assert rem[0].startswith("Replace the vanilla recurrent cell `rnn` with nn.LSTM or nn.GRU")
    rem = remedies_for("exploding", f, typical_norm=0.37)
    assert rem[0].startswith("Replace the vanilla recurrent cell `rnn`")
    assert rem[1] == (
        "Clip gradients: gw.clip.Norm(max_norm=0.74) (2x the typical total norm seen so far, 0.37), "
        "or gw.clip.ZScore() to clip only outliers."
    )


def test_residual_structure_is_recognised_by_name_and_builtin_layers():
    assert inspect_model(nn.Sequential(*[ResidualBlock() for _ in range(10)])).has_residual
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    assert inspect_model(enc).has_residual
    plain = inspect_model(nn.Sequential(*[_Block() for _ in range(10)]))
    assert not plain.has_residual  # a skip inside forward() is invisible without a telling name
    last = remedies_for("vanishing", plain)[-1]
    assert last.startswith("Add residual connections (x + f(x)) around blocks of the 10")


def test_he_init_relu_net_has_no_init_remedy_and_bn_net_no_norm_remedy():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        lin = nn.Linear(64, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, nn.BatchNorm1d(64), nn.ReLU()]
    f = inspect_model(nn.Sequential(*layers))
    assert f.small_init == [] and f.large_init == [] and f.zero_init == []
    assert f.norms == ["1", "4", "7", "10"]
    rem = remedies_for("vanishing", f)
    assert not any("normalisation" in r or "Initialise" in r for r in rem)


def test_dead_and_saturated_remedies_name_the_modules():
    f = inspect_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))
    assert remedies_for("dead", f)[0] == (
        "Replace `1` with nn.LeakyReLU(0.01) or nn.GELU, whose gradient is never exactly zero."
    )
    assert remedies_for("saturated", f)[0] == (
        "Replace `3` with nn.ReLU/nn.LeakyReLU, which do not saturate for positive inputs."
    )


# ------------------------------------------------------------------ issue 11: init fits the activation
def _stack(act, depth: int = 6, init=None) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(64, 64)
        if init is not None:
            init(lin.weight)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(64, 4))


def test_sigmoid_stack_gets_xavier_without_the_tanh_gain():
    f = inspect_model(_stack(nn.Sigmoid))
    rem = remedies_for("vanishing", f)
    init = next(r for r in rem if r.startswith("Initialise"))
    assert "with Xavier init (nn.init.xavier_uniform_(w))" in init
    assert "calculate_gain('tanh')" not in init  # the measured wrong advice
    assert 0.5 < statistics.median(x.factor for x in f.small_init) < 0.66  # default init: 0.58x Xavier (gain 1)


def test_tanh_stack_gets_the_tanh_gain_and_xavier_tanh_init_is_fine():
    f = inspect_model(_stack(nn.Tanh))
    init = next(r for r in remedies_for("vanishing", f) if r.startswith("Initialise"))
    assert "nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain('tanh'))" in init
    fitted = inspect_model(_stack(nn.Tanh, init=lambda w: nn.init.xavier_normal_(w, gain=5 / 3)))
    assert [x.name for x in fitted.small_init] == ["12"] and fitted.large_init == []  # only the default-init head


def test_gelu_stack_gets_xavier_and_relu_stack_gets_he():
    assert inspect_model(_stack(nn.GELU)).scheme()[0] == "Xavier"
    assert inspect_model(_stack(nn.ReLU)).scheme()[2] == "nn.init.kaiming_normal_(w, nonlinearity='relu')"


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.q.weight.mul_(8.0)
            self.k.weight.mul_(8.0)


def test_attention_qk_points_at_the_score_scale_and_the_qk_init():
    f = inspect_model(_Attention())
    assert f.attention_qk == ["q", "k"]
    rem = remedies_for("vanishing", f, layers=("q",))
    assert rem[0].startswith(
        "Scale the attention scores by 1/sqrt(d) (q @ k.transpose(-2, -1) / math.sqrt(d), or use "
        "F.scaled_dot_product_attention) and initialise `q`, `k` at PyTorch's default scale"
    )
    assert not rem[0].count("`fc`")


def test_zero_gradient_without_zero_init_points_at_what_blocks_it():
    f = inspect_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    rem = remedies_for("vanishing", f, source="zero", layers=("0",))
    assert rem[0].startswith("Replace `1` with nn.LeakyReLU(0.01) or nn.GELU: `0` get exactly zero gradients although")
    assert rem[1].startswith("Find what zeroes the gradient above `0`: a mask or a multiplication by 0")
    plain = inspect_model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    assert remedies_for("vanishing", plain, source="zero", layers=("0",))[0].startswith("Find what zeroes")
    assert remedies_for("no_gradient", f, source="missing", layers=("aux",))[0].startswith(
        "`aux` never reaches the loss: call it in forward()"
    )


# ------------------------------------------------------------------ issue 11: ranked by the evidence
def _sgd(lr: float, layers: tuple[str, ...]) -> OptimizerInfo:
    return OptimizerInfo("SGD", (GroupInfo(0, lr, 0.0, None, 0.0, layers),))


def test_inputs_far_from_unit_scale_come_first_for_an_explosion():
    f = inspect_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    ev = EvidenceSnapshot(input_rms=58.0, input_max=100.0, input_layer="0")
    rem = remedies_for("exploding", f, evidence=ev, typical_norm=1.0)
    assert rem[0] == (
        "Normalise the inputs to zero mean and unit variance: `0` receives inputs of RMS 58 (max 100), while "
        "He/Xavier init assume ~1."
    )
    assert rem[1].startswith("Clip gradients")
    assert remedies_for("exploding", f, evidence=EvidenceSnapshot(input_rms=1.0), typical_norm=1.0)[0].startswith(
        "Clip gradients"
    )


def test_a_large_update_names_the_learning_rate_with_its_figure():
    f = inspect_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    ev = EvidenceSnapshot(optimizer=_sgd(3.0, ("0", "2")), peak_update=("0", 0.4, 0))
    assert remedies_for("dead", f, evidence=ev)[0] == (
        "Lower the learning rate: SGD lr 3 moved `0` by 40% of its weights in one step at step 0 (~0.1% is "
        "healthy). One large update can push a unit's input below zero for every sample."
    )
    small = EvidenceSnapshot(optimizer=_sgd(0.01, ("0", "2")), peak_update=("0", 0.01, 0))
    assert remedies_for("dead", f, evidence=small)[0].startswith("Replace `1` with nn.LeakyReLU(0.01)")


def test_oversized_init_outranks_the_update_it_causes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=3 * (2 / 64) ** 0.5)
    f = inspect_model(model)
    ev = EvidenceSnapshot(optimizer=_sgd(0.01, ("0",)), peak_update=("4", 2.0, 0))
    rem = remedies_for("exploding", f, evidence=ev, typical_norm=1.0)
    assert rem[0].startswith("Initialise `0`, `2`, `4` with He init")
    assert rem[1].startswith("Lower the learning rate: SGD lr 0.01 moved `4` by 200%")


def test_spike_with_a_batch_of_one_or_an_extreme_batch():
    f = inspect_model(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)))
    one = EvidenceSnapshot(batch_size=1)
    assert remedies_for("spike", f, evidence=one)[0].startswith(
        "Raise the batch size: with 1 sample(s) per step the gradient's noise is as large as its signal"
    )
    jump = EvidenceSnapshot(loss_jump=900.0, loss_jump_step=80, batch_size=64)
    assert remedies_for("spike", f, evidence=jump, step=80)[0].startswith(
        "Look at the batch of step 80 for outliers or corrupted samples: the loss jumped to 900x its running mean"
    )
    assert remedies_for("spike", f, evidence=jump, step=81)[0].startswith("Clip gradients")


def test_regression_targets_far_from_unit_scale():
    f = inspect_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)))
    ev = EvidenceSnapshot(loss_start=2.6e12, input_rms=1.0)
    assert remedies_for("exploding", f, evidence=ev)[0] == (
        "Standardise the regression targets (and inputs) to unit variance: the loss started at 2.60e+12, and its "
        "gradients scale with it (a cross-entropy starts near ln(classes))."
    )


def test_recurrent_radius_above_one_is_the_explosion_cause_not_the_targets():
    torch.manual_seed(0)
    rnn = nn.RNN(8, 32, batch_first=True, nonlinearity="relu")
    with torch.no_grad():
        w = rnn.weight_hh_l0
        w.mul_(3.0 / torch.linalg.eigvals(w).abs().max())
    model = nn.ModuleDict({"rnn": rnn, "head": nn.Linear(32, 8)})
    f = inspect_model(model)
    assert [x.name for x in f.recurrent_radius] == ["rnn.weight_hh_l0"]
    assert abs(f.recurrent_radius[0].radius - 3.0) < 1e-5
    # A cross-entropy that starts at 4.6e10 means huge logits from the recurrence, not targets to standardise.
    rem = remedies_for("exploding", f, evidence=EvidenceSnapshot(loss_start=4.6e10, input_rms=0.35))
    assert rem[0] == (
        "Initialise `rnn.weight_hh_l0` orthogonal (nn.init.orthogonal_) or rescale it to spectral radius <= 1: its "
        "radius is 3, so the gradient through T time steps grows like 3^T; or use nn.LSTM/nn.GRU, and clip gradients."
    )
    assert not any(x.startswith("Standardise the regression targets") for x in rem)
    # PyTorch's default init (uniform +-1/sqrt(H): radius ~0.58) is no such cause.
    torch.manual_seed(0)
    assert inspect_model(nn.RNN(8, 32, num_layers=2)).recurrent_radius == []


def test_recurrent_weights_already_overflowed_are_left_out_not_fed_to_the_eigensolver():
    # MKL's eigensolver segfaults on a NaN matrix: a monitor restored into a model whose RNN had
    # diverged (or built on one) must not take the training process down.
    torch.manual_seed(0)
    model = nn.ModuleDict({"bad": nn.RNN(4, 6), "good": nn.RNN(4, 6, nonlinearity="relu")})
    with torch.no_grad():
        model["bad"].weight_hh_l0[2, 3] = float("nan")
        w = model["good"].weight_hh_l0
        w.mul_(2.0 / torch.linalg.eigvals(w).abs().max())
    f = inspect_model(model)
    assert [x.name for x in f.recurrent_radius] == ["good.weight_hh_l0"]
    assert abs(f.recurrent_radius[0].radius - 2.0) < 1e-5


def test_nonfinite_ranks_numerics_unless_precision_or_an_explosion_explain_it():
    f = inspect_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert remedies_for("nonfinite", f)[0].startswith("Find the operation that overflows: log(0)")
    half = inspect_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).half())
    assert remedies_for("nonfinite", half)[0].startswith("Train in float32 or bfloat16")
    after = EvidenceSnapshot(input_rms=200.0, finding={"prior_growth": 60.0})
    assert remedies_for("nonfinite", f, evidence=after)[0].startswith("Normalise the inputs")


def test_dead_units_from_a_negative_bias_get_the_bias_init_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
        model[0].bias.fill_(-3.0)
    f = inspect_model(model)
    assert [b.name for b in f.negative_bias] == ["0"]
    assert remedies_for("dead", f)[0].startswith("Initialise the biases of `0` to zero (nn.init.zeros_(m.bias))")
