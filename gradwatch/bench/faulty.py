"""The faulty training programs: each a small real training with one known fault.

Ported from the field's public benchmarks where they have one (AUTOTRAINER, ICSE'21; DeepDiagnosis,
ICSE'22; TrainCheck, OSDI'25), the pathologies of gradwatch's reference scenarios, and the failures
users report most. Each case states the alert kind the fault must raise first and the category of
the fix that removes its cause (:mod:`gradwatch.bench.expectations`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch.bench import data
from gradwatch.bench.loop import adam, monitor_for, seeded, sgd, train, trial_from, watch_step
from gradwatch.bench.models import Attention, Exp, LeNet, SequenceClassifier, cnn, init_, mlp
from gradwatch.bench.registry import Case, Trial, register

ce = F.cross_entropy


def _case(name: str, source: str, expect: str, remedy: tuple[str, ...], summary: str, **kw: object):
    def deco(fn):  # type: ignore[no-untyped-def]
        register(Case(name=name, source=source, summary=summary, run=fn, expect=expect, remedy=remedy, **kw)) # type: ignore[arg-type]
        return fn

    return deco


# ------------------------------------------------------------------------------------------ AUTOTRAINER
@_case("autotrainer_circles_sigmoid8", "AUTOTRAINER", "vanishing", ("architecture",),
       "8 sigmoid Dense layers (Glorot init) on two concentric circles, SGD lr 0.01")
def _circles_sigmoid8() -> Trial:
    x, y = data.circles()
    seeded(0)
    model = init_(mlp([2] + [32] * 8 + [2], nn.Sigmoid), "xavier", nonlinearity="linear")
    return train(model, data.Sampler(x, y, 32), ce, steps=150, optimizer=sgd(0.01))


@_case("autotrainer_oscillating_bs1", "AUTOTRAINER", "spike", ("learning_rate", "batch_size"),
       "LeakyReLU MLP on the circles, batch size 1, SGD lr 1.0: the loss oscillates above chance, never learns")
def _oscillating_bs1() -> Trial:
    # Measured: 50-step means of the loss 0.91, 0.84, 0.76, 0.91, 0.86, 0.88 (chance 0.69), accuracy 50%;
    # the same model at lr 0.1 reaches 0.7 and falls.
    x, y = data.circles()
    seeded(0)
    model = mlp([2, 64, 64, 2], nn.LeakyReLU)
    return train(model, data.Sampler(x, y, 1), ce, steps=300, optimizer=sgd(1.0))


@_case("autotrainer_exp_activation", "AUTOTRAINER", "nonfinite", ("numerics", "architecture"),
       "exp as the hidden activation on blobs (inputs up to ~15): activations overflow to Inf")
def _exp_activation() -> Trial:
    x, y = data.blobs()
    seeded(0)
    model = mlp([2, 32, 32, 3], Exp)
    return train(model, data.Sampler(x, y, 32), ce, steps=60, optimizer=sgd(0.01))


@_case("autotrainer_lenet_deep_sigmoid", "AUTOTRAINER", "vanishing", ("architecture",),
       "LeNet-5 with sigmoid activations and 4 extra sigmoid Dense layers on 16x16 images, SGD lr 0.05")
def _lenet_deep_sigmoid() -> Trial:
    x, y = data.images()
    seeded(0)
    return train(LeNet(nn.Sigmoid, extra=4), data.Sampler(x, y, 32), ce, steps=100, optimizer=sgd(0.05))


RELU34_SEEDS = tuple(range(12))


def _relu34_dead_layer(model: nn.Sequential, probe: Tensor) -> int | None:
    """Index of the first hidden layer whose every unit is zero on every probe sample (the net died)."""
    h = probe
    with torch.no_grad():
        k = 0
        for m in model:
            h = m(h)
            if isinstance(m, nn.ReLU):
                if not bool((h > 0).any()):
                    return k
                k += 1
    return None


@_case("autotrainer_relu34_seeds", "AUTOTRAINER", "dead", ("architecture", "init", "learning_rate"),
       f"34 ReLU Dense layers of width 8 (He init) on inputs in [-1, 0], Adam lr 1e-3, seeds {RELU34_SEEDS[0]}-"
       f"{RELU34_SEEDS[-1]}: about half die while training; scored per seed against the trained network")
def _relu34_seeds() -> list[Trial]:
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(4096, 4, generator=g)
    y = torch.randint(0, 2, (4096,), generator=g)
    trials = []
    for seed in RELU34_SEEDS:
        seeded(seed)
        # Measured: no seed is dead at init; after 60 steps a whole layer is zero on every probe sample for 7 of
        # the 12 seeds (width 16: none of them).
        model = init_(mlp([4] + [8] * 34 + [2]), "he")
        dead: list[int | None] = []
        t = train(model, data.Sampler(x, y, 64, seed=seed), ce, steps=60, optimizer=adam(1e-3), seed=seed,
                  after=lambda m, found=dead: found.append(_relu34_dead_layer(m, x[:512])))
        died = dead[0] is not None
        note = f"layer {dead[0]} dead" if died else "alive"
        trials.append(Trial(t.alerts, t.steps, seed, "dead" if died else None, oracle=True, note=note))
    return trials


# ---------------------------------------------------------------------------------------- DeepDiagnosis
@_case("deepdiagnosis_dead_negative_bias", "DeepDiagnosis", "dead", ("init",),
       "ReLU MLP (He init) whose biases start at -3: most units never fire")
def _dead_negative_bias() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = init_(mlp([20, 64, 64, 64, 5]), "he", bias=-3.0)
    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3))


@_case("deepdiagnosis_dead_cnn_negative_bias", "DeepDiagnosis", "dead", ("init",),
       "ReLU CNN (He init) whose conv biases start at -4: the feature maps are zero")
def _dead_cnn_negative_bias() -> Trial:
    x, y = data.images()
    seeded(0)
    model = init_(cnn(), "he", bias=-4.0)
    return train(model, data.Sampler(x, y, 32), ce, steps=40, optimizer=adam(1e-3))


@_case("deepdiagnosis_saturated_tanh_large_init", "DeepDiagnosis", "saturated", ("init",),
       "tanh MLP with weights drawn at 20x the Xavier std: pre-activations far in tanh's flat tails")
def _saturated_tanh_large_init() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = init_(mlp([20, 256, 256, 256, 5], nn.Tanh), "xavier", gain=20.0, nonlinearity="tanh")
    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3))


@_case("deepdiagnosis_saturated_sigmoid_inputs", "DeepDiagnosis", "saturated", ("inputs",),
       "sigmoid MLP fed unnormalised inputs (x100): every unit saturated from the first layer")
def _saturated_sigmoid_inputs() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = mlp([20, 64, 64, 5], nn.Sigmoid)
    return train(model, data.Sampler(100 * x, y, 64), ce, steps=60, optimizer=adam(1e-3))


@_case("deepdiagnosis_saturated_tanh_pixels", "DeepDiagnosis", "saturated", ("inputs",),
       "tanh CNN on raw 0-255 pixel values")
def _saturated_tanh_pixels() -> Trial:
    x, y = data.images()
    seeded(0)
    model = cnn(act=nn.Tanh)
    return train(model, data.Sampler(255 * x, y, 32), ce, steps=40, optimizer=adam(1e-3))


# ------------------------------------------------------------------------------------------- TrainCheck
@_case("traincheck_missing_zero_grad", "TrainCheck", "accumulating", ("zero_grad",),
       "ReLU MLP, Adam: the loop never calls optimizer.zero_grad()")
def _missing_zero_grad() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 64), ce, steps=100, optimizer=adam(1e-3),
                 zero_grad=False)


@_case("traincheck_missing_zero_grad_sgd_cnn", "TrainCheck", "accumulating", ("zero_grad",),
       "CNN, SGD lr 0.01 momentum 0.9: the loop never calls optimizer.zero_grad()")
def _missing_zero_grad_cnn() -> Trial:
    x, y = data.images()
    seeded(0)
    return train(cnn(), data.Sampler(x, y, 32), ce, steps=60, optimizer=sgd(0.01, momentum=0.9), zero_grad=False)


@_case("traincheck_zero_grad_once_per_epoch", "TrainCheck", "accumulating", ("zero_grad",),
       "ReLU MLP, SGD lr 0.05: zero_grad() sits in the epoch loop, so 40 steps share one accumulating gradient")
def _zero_grad_per_epoch() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = mlp([20, 64, 64, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = data.Sampler(x, y, 64)
    monitor = monitor_for(model)
    steps = 120
    for epoch in range(steps // 40):
        opt.zero_grad()
        for i in range(40):
            loss = ce(model(batches(epoch * 40 + i)[0]), batches(epoch * 40 + i)[1])
            loss.backward()
            watch_step(monitor, loss, opt)
            opt.step()
    return trial_from(monitor, steps)


@_case("traincheck_step_every_micro_batch", "TrainCheck", "accumulating", ("zero_grad",),
       "gradient accumulation done wrong: optimizer.step() after every micro-batch, zero_grad() only every 4th")
def _step_every_micro_batch() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = mlp([20, 64, 64, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data.Sampler(x, y, 16)
    monitor = monitor_for(model)
    steps = 100
    for step in range(steps):
        xb, yb = batches(step)
        loss = ce(model(xb), yb) / 4
        loss.backward()
        watch_step(monitor, loss, opt)
        opt.step()
        if (step + 1) % 4 == 0:
            opt.zero_grad()
    return trial_from(monitor, steps)


class _EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 5)
        self.aux_head = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


@_case("traincheck_two_optimizers_one_zeroed", "TrainCheck", "accumulating", ("zero_grad",),
       "encoder and head with one optimizer each; the loop zeroes only the head's, the encoder's gradients pile up")
def _two_optimizers() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    opt_enc = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    opt_head = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    batches = data.Sampler(x, y, 64)
    monitor = monitor_for(model)
    steps = 100
    for step in range(steps):
        xb, yb = batches(step)
        loss = ce(model(xb), yb)
        loss.backward()
        watch_step(monitor, loss, opt_enc)
        opt_enc.step()
        opt_head.step()
        opt_head.zero_grad()
    return trial_from(monitor, steps)


@_case("traincheck_optimizer_over_frozen_head", "TrainCheck", "no_gradient", ("frozen",),
       "the head is frozen by mistake (requires_grad=False) and the optimizer is built over the head only")
def _optimizer_over_frozen_head() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    model.head.requires_grad_(False)
    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3),
                 params=lambda m: m.head.parameters())


@_case("traincheck_head_unused_in_forward", "TrainCheck", "no_gradient", ("unused_layer",),
       "an auxiliary head is built and optimised but never called in forward (its .grad stays None)")
def _head_unused() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(_EncoderHead(), data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3))


@_case("traincheck_head_unused_zero_grads", "TrainCheck", "no_gradient", ("unused_layer",),
       "the same unused head with zero_grad(set_to_none=False): its gradient is exactly zero every step")
def _head_unused_zeros() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    for p in model.aux_head.parameters():
        p.grad = torch.zeros_like(p)
    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3), set_to_none=False)


@_case("traincheck_detached_features", "TrainCheck", "no_gradient", ("unused_layer",),
       "the encoder's features are .detach()ed before the head: the encoder is optimised but never reached")
def _detached_features() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3),
                 forward=lambda m, xb: m.head(m.encoder(xb).detach()))


@_case("encoder_under_no_grad", "gradwatch", "no_gradient", ("unused_layer",),
       "the encoder runs under torch.no_grad() (copied from evaluation code) while the optimizer trains it")
def _encoder_no_grad() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()

    def forward(m: _EncoderHead, xb: Tensor) -> Tensor:
        with torch.no_grad():
            h = m.encoder(xb)
        return m.head(h)

    return train(model, data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3), forward=forward)


# ------------------------------------------------------------------------- gradwatch reference scenarios
def _reference(scenario: str, variant: str) -> Trial:
    from gradwatch.reference import get_scenario

    sc = get_scenario(scenario)
    v = sc.variant(variant)
    task = sc.task()
    seeded(sc.seed)
    model = v.build()
    opt = sgd(sc.lr) if sc.optimizer == "sgd" else adam(sc.lr)
    options = {"clip": v.clip()} if v.clip is not None else {}
    return train(model, task.batch, task.loss, steps=sc.steps, optimizer=opt, options=options)


_REFERENCE = (
    ("activation", "sigmoid", "vanishing", ("architecture",), "20-layer sigmoid MLP, default init"),
    ("recurrence", "rnn", "vanishing", ("architecture",),
     "vanilla RNN copying the first token across 50 steps (default options: no track_time)"),
    ("residual", "plain", "vanishing", ("architecture", "init"),
     "32-layer plain tanh stack, default init (0.58x Xavier): residual paths or Xavier init fix it"),
    ("initialisation", "zero", "vanishing", ("init",), "20-layer ReLU MLP, all-zero weights"),
    ("initialisation", "small", "vanishing", ("init",), "20-layer ReLU MLP at 0.3x the He std"),
    ("initialisation", "large", "exploding", ("init",), "20-layer ReLU MLP at 2x the He std"),
    ("normalisation", "plain", "vanishing", ("architecture",), "20-layer sigmoid MLP without normalisation"),
    ("clipping", "none", "exploding", ("learning_rate", "clipping"),
     "5-layer ReLU MLP, SGD lr 0.6 past the stability limit: Inf within a few steps (an explosion first)"),
)

for _sc, _v, _kind, _remedy, _summary in _REFERENCE:
    register(Case(f"reference_{_sc}_{_v}", "reference", _summary,
                  (lambda s=_sc, v=_v: _reference(s, v)), _kind, _remedy))


# ------------------------------------------------------------------------------- inputs, learning rate
@_case("unnormalised_inputs_raw_pixels", "gradwatch", "exploding", ("inputs",),
       "ReLU MLP on raw 0-255 pixel values (never divided by 255 nor standardised), SGD lr 0.01")
def _unnormalised_inputs() -> Trial:
    # Measured: ||g||/||w|| of the first layer 28, 87, 65, 680 over the first steps (0.05 with standardised
    # inputs), the loss from 10 to 2e5, 98% of the first layer's units dead by step 60. At x100 the same MLP
    # still learns (loss 0.95), so x100 is not an unmistakable fault for this model.
    x, y = data.images()
    seeded(0)
    model = mlp([256, 128, 64, 4])
    return train(model, data.Sampler(255 * x.flatten(1), y, 32), ce, steps=60, optimizer=sgd(0.01))


@_case("unscaled_regression_targets", "gradwatch", "exploding", ("inputs",),
       "ReLU MLP regressing targets in the thousands (not standardised), SGD lr 0.01")
def _unscaled_targets() -> Trial:
    x, y = data.teacher_regression()
    seeded(0)
    model = mlp([32, 64, 64, 8])
    return train(model, data.Sampler(x, 1000 * y, 64), F.mse_loss, steps=60, optimizer=sgd(0.01))


@_case("corrupted_batch", "gradwatch", "spike", ("inputs",),
       "healthy ReLU MLP training, Adam; one batch (step 80) arrives with inputs x1000 (a corrupted shard)")
def _corrupted_batch() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    clean = data.Sampler(x, y, 64)

    def batches(i: int) -> tuple[Tensor, Tensor]:
        xb, yb = clean(i)
        return (1000 * xb, yb) if i == 80 else (xb, yb)

    return train(mlp([20, 64, 64, 5]), batches, ce, steps=120, optimizer=adam(1e-3))


@_case("lr_too_high_kills_relus", "gradwatch", "dead", ("learning_rate",),
       "ReLU MLP (PyTorch init), SGD lr 6.0: large updates push the units' inputs below zero, 94% of the last "
       "hidden layer dies")
def _lr_kills_relus() -> Trial:
    # Measured after 60 steps: dead units per hidden layer 0%, 48%, 94%, loss 1.51 (chance 1.61); no explosion
    # (total norm <= 0.7). At lr 1.0 the same model reaches 0.70 with no dead unit.
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 64, 5]), data.Sampler(x, y, 64), ce, steps=60, optimizer=sgd(6.0))


@_case("lr_too_high_bn_cnn_dead_channels", "gradwatch", "dead", ("learning_rate",),
       "2-block BatchNorm CNN on noisy 8-class images, SGD lr 0.1 momentum 0.9: most conv2 channels die")
def _lr_kills_bn_cnn() -> Trial:
    # Measured: 66% of conv2's channels output zero on a whole batch at step 10, 91% from step 40 on; at lr 0.02
    # none does and the loss falls further (control_cnn_batchnorm).
    x, y = data.images(classes=8, noise=1.0)
    seeded(0)
    return train(cnn(batchnorm=True, classes=8), data.Sampler(x, y, 32), ce, steps=80,
                 optimizer=sgd(0.1, momentum=0.9))


@_case("lr_too_low", "gradwatch", "vanishing", ("learning_rate",),
       "ReLU MLP, Adam lr 1e-7: every update moves the weights by ~1e-7 of their size, the loss stays flat")
def _lr_too_low() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 64), ce, steps=150, optimizer=adam(1e-7))


@_case("he3x_relu20_fast_explosion", "gradwatch", "exploding", ("init",),
       "20-layer ReLU classifier at 3x the He std, SGD lr 0.01: total norm 3.7e10 at step 0, NaN from step 1")
def _he3x() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = init_(mlp([20] + [64] * 20 + [5]), "he", gain=3.0)
    return train(model, data.Sampler(x, y, 64), ce, steps=40, optimizer=sgd(0.01))


# ------------------------------------------------------------------------------ architecture, numerics
def _attention_task(seed: int = 0) -> data.Sampler:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, 32, generator=g)
    y = (x[:, :, :4].sum((1, 2)) > 0).long() * 2 + (x[:, 0, 4] > 0).long()
    return data.Sampler(x, y, 32)


@_case("attention_unscaled_large_qk", "gradwatch", "vanishing", ("architecture", "init"),
       "self-attention without the 1/sqrt(d) scale, q/k weights at 32x PyTorch's init: one-hot softmax")
def _attention_unscaled() -> Trial:
    # Measured: mean max attention probability 1.00 (scaled model: 0.12); ||g||/||w|| of q and k 2e-4 - 2e-3,
    # 3-30x below the scaled model's, while v, fc1 and head match it; loss after 100 steps 1.00 against 0.77
    # for the scaled twin (control_attention_scaled).
    seeded(0)
    return train(Attention(scaled=False, qk_gain=32.0), _attention_task(), ce, steps=100, optimizer=adam(3e-3))


def _softmax_nll(logits: Tensor, y: Tensor) -> Tensor:
    e = logits.exp()  # in float16, exp overflows for logits above 11.1 (float32: 88.7)
    return -(e / e.sum(-1, keepdim=True)).gather(1, y[:, None]).log().float().mean()


@_case("float16_overflow", "gradwatch", "nonfinite", ("numerics",),
       "classifier trained in pure float16 with a hand-written softmax: once logits pass 11, exp overflows")
def _float16_overflow() -> Trial:
    # Measured: NaN from step ~30 in float16; the same program in float32 trains to loss 0.42 in 80 steps.
    x, y = data.teacher_classes()
    seeded(0)
    model = mlp([20, 128, 128, 5]).half()
    return train(model, data.Sampler((8 * x).half(), y, 64), _softmax_nll, steps=80, optimizer=sgd(0.1))


@_case("gru_100_steps_time_vanishing", "gradwatch", "vanishing", ("architecture",),
       "GRU (hidden 32) copying the first token across 100 steps: the gradient dies across time (default options)")
def _gru_100() -> Trial:
    x, y = data.copy_first_token(length=100)
    seeded(0)
    return train(SequenceClassifier("gru", 8, 32, 8), data.Sampler(x, y, 32), ce, steps=40, optimizer=adam(3e-3))


def _manual_bce(logits: Tensor, y: Tensor) -> Tensor:
    p = torch.sigmoid(logits[:, 0])
    t = y.float()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


@_case("manual_bce_log_sigmoid", "gradwatch", "nonfinite", ("numerics",),
       "binary classifier with a hand-written BCE, log(sigmoid(z)), SGD lr 1.0: confident logits give log(0)")
def _manual_bce_case() -> Trial:
    x, y = data.teacher_classes(classes=2)
    seeded(0)
    return train(mlp([20, 64, 1]), data.Sampler(4 * x, y, 64), _manual_bce, steps=80, optimizer=sgd(1.0))


def _manual_log_softmax(logits: Tensor, y: Tensor) -> Tensor:
    return F.nll_loss(torch.log(torch.softmax(logits / 0.01, -1)), y)


@_case("manual_log_softmax_temperature", "gradwatch", "nonfinite", ("numerics",),
       "classifier with log(softmax(z / 0.01)) written out by hand: probabilities underflow to 0, log(0) = -Inf")
def _manual_log_softmax_case() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 5]), data.Sampler(x, y, 64), _manual_log_softmax, steps=40, optimizer=adam(1e-3))


class _Embedder(nn.Module):
    """Embeddings L2-normalised by hand, x / ||x||, where padding rows are all zero (0/0 = NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        e = self.net(x)
        e = e * (x.abs().sum(1, keepdim=True) > 0)  # padding rows (all-zero inputs) embed to zero
        return self.head(e / e.norm(dim=1, keepdim=True))


@_case("normalise_zero_rows", "gradwatch", "nonfinite", ("numerics",),
       "embeddings normalised by hand as x / ||x|| while zero-padded rows give ||x|| = 0: NaN")
def _normalise_zero_rows() -> Trial:
    x, y = data.teacher_classes()
    x = x.clone()
    x[::8] = 0.0  # one sample in eight is padding
    seeded(0)
    return train(_Embedder(), data.Sampler(x, y, 64), ce, steps=40, optimizer=adam(1e-3))


# ---------------------------------------------------------------- variants added after the detectors were tuned
# The same pathologies in other programs, added late to check that the diagnosis follows the physics rather than
# the cases above.
@_case("sigmoid_cnn_6_conv", "gradwatch", "vanishing", ("architecture",),
       "6 conv layers with sigmoid activations (no normalisation) on 16x16 images, SGD lr 0.05")
def _sigmoid_cnn() -> Trial:
    x, y = data.images()
    seeded(0)
    layers: list[nn.Module] = []
    c = 1
    for _ in range(6):
        layers += [nn.Conv2d(c, 8, 3, padding=1), nn.Sigmoid()]
        c = 8
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return train(model, data.Sampler(x, y, 32), ce, steps=60, optimizer=sgd(0.05))


class _ReluRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(8, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 8)
        with torch.no_grad():
            w = self.rnn.weight_hh_l0
            w.mul_(3.0 / torch.linalg.eigvals(w).abs().max())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@_case("relu_rnn_radius_3", "gradwatch", "exploding", ("init", "architecture"),
       "ReLU RNN whose recurrent matrix has spectral radius 3, over 30 steps, Adam lr 1e-3")
def _relu_rnn() -> Trial:
    # Measured: loss 4.6e10 at step 0 and ||g||/||w|| of the recurrent weights 4e10 (3^30 = 2e14 growth bound).
    x, y = data.copy_first_token(length=30)
    seeded(0)
    return train(_ReluRNN(), data.Sampler(x, y, 32), ce, steps=40, optimizer=adam(1e-3))


@_case("transformer_missing_zero_grad", "gradwatch", "accumulating", ("zero_grad",),
       "the causal transformer LM trained with AdamW without optimizer.zero_grad()")
def _transformer_no_zero_grad() -> Trial:
    from gradwatch.bench.models import TinyTransformerLM

    x, y = data.markov_tokens()
    seeded(0)

    def lm_loss(out: Tensor, t: Tensor) -> Tensor:
        return ce(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    return train(TinyTransformerLM(), data.Sampler(x, y, 16), lm_loss, steps=60,
                 optimizer=lambda ps: torch.optim.AdamW(list(ps), lr=1e-3), zero_grad=False)


class _GatedBranch(nn.Module):
    """A residual branch multiplied by a gate left at 0.0 (meant to be learnable, built as a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(20, 64)
        self.branch = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 5)
        self.gate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        return self.head(h + self.gate * self.branch(h))


@_case("branch_gated_by_constant_zero", "gradwatch", "no_gradient", ("unused_layer",),
       "a residual branch scaled by a constant 0.0 gate: optimised, but its gradient is exactly zero")
def _gated_branch() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(_GatedBranch(), data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3))


class _LogFeatures(nn.Module):
    """log() of ReLU features (meant as log(1 + x)): log(0) = -Inf wherever a unit is off."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(20, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.log(F.relu(self.fc(x))))


@_case("log_of_relu_features", "gradwatch", "nonfinite", ("numerics",),
       "features computed as log(relu(Wx)) instead of log1p: log(0) = -Inf on the first step")
def _log_relu() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(_LogFeatures(), data.Sampler(x, y, 64), ce, steps=30, optimizer=adam(1e-3))


@_case("one_feature_in_thousands", "gradwatch", "exploding", ("inputs",),
       "tabular MLP where one of 20 features is in the thousands (not standardised), SGD lr 0.01")
def _feature_thousands() -> Trial:
    # Measured: first-layer ||g||/||w|| 25, 153, 161, then the first layer dies (0) and the loss sits at chance.
    x, y = data.teacher_classes()
    x = x.clone()
    x[:, 3] = 1000 + 300 * x[:, 3]
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 64), ce, steps=60, optimizer=sgd(0.01))
