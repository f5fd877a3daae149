"""Architecture facts read from the model, and the remedies they rank."""

from __future__ import annotations

import torch
from torch import nn

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
