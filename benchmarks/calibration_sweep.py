"""Calibration sweep: models a new user would try, trained with gradwatch's default detectors.

Healthy trainings must stay silent; broken ones should be flagged. Prints, per model, the loss
before and after and the alerts raised (kind, step, layer, value). Not part of the test suite
(about 2 minutes on 2 CPU cores); the scenario suite in tests/test_scenarios.py pins the cases
that must hold.

    python benchmarks/calibration_sweep.py
"""

import torch
import torch.nn as nn

import gradwatch as gw

torch.set_num_threads(1)


def run(name, model, make_batch, lossf, steps=150, opt=None, track=True):
    torch.manual_seed(0)
    opt = opt(model) if opt else torch.optim.Adam(model.parameters(), 1e-3)
    mon = gw.GradWatch(model, sinks=[], on_alert="ignore", track_activations=track)
    l0 = None
    for s in range(steps):
        x, y = make_batch(s)
        loss = lossf(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step()
        opt.step()
        if l0 is None:
            l0 = loss.item()
    mon.close()
    alerts = [(a.kind, a.step, a.layer, f"{a.value:.2g}") for a in mon.alerts][:3]
    print(f"{name:34s} {l0:9.3g}->{loss.item():9.3g} alerts={alerts}", flush=True)


g = torch.Generator().manual_seed(0)
W = torch.randn(20, 5)


def cls(s, n=64, d=20):
    x = torch.randn(n, d)
    return x, (x @ W).argmax(1)


def img(s):
    x = torch.randn(32, 1, 28, 28)
    return x, (x[:, 0, :14].mean((1, 2)) > 0).long()


ce = nn.functional.cross_entropy
# 1 SGD lr .1 MLP
run(
    "mlp sgd 0.1",
    nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5)),
    cls,
    ce,
    opt=lambda m: torch.optim.SGD(m.parameters(), 0.1, momentum=0.9),
)
# 2 CNN BN SGD
cnn = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1),
    nn.BatchNorm2d(16),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1),
    nn.BatchNorm2d(32),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(32 * 49, 2),
)
run("cnn bn sgd 0.1", cnn, img, ce, opt=lambda m: torch.optim.SGD(m.parameters(), 0.1, momentum=0.9))


# 3 post-LN transformer
class T(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(100, 64)
        s.t = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True), 3, enable_nested_tensor=False
        )
        s.h = nn.Linear(64, 100)

    def forward(s, x):
        return s.h(s.t(s.e(x)))


def tok(s):
    x = torch.randint(0, 100, (16, 20))
    return x, torch.roll(x, 1, 1)


run("post-LN transformer adam", T(), tok, lambda o, y: ce(o.reshape(-1, 100), y.reshape(-1)))


# 4 LSTM LM
class L(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(50, 32)
        s.l = nn.LSTM(32, 64, 2, batch_first=True, dropout=0.1)
        s.h = nn.Linear(64, 50)

    def forward(s, x):
        return s.h(s.l(s.e(x))[0])


def tok50(s):
    x = torch.randint(0, 50, (16, 30))
    return x, torch.roll(x, 1, 1)


run("lstm lm", L(), tok50, lambda o, y: ce(o.reshape(-1, 50), y.reshape(-1)))


# 5 VAE
class V(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
        s.dec = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid())

    def forward(s, x):
        h = s.enc(x)
        mu, lv = h[:, :8], h[:, 8:]
        z = mu + torch.randn_like(mu) * (0.5 * lv).exp()
        return s.dec(z), mu, lv


def vloss(o, x):
    r, mu, lv = o
    return (
        nn.functional.binary_cross_entropy(r, x, reduction="sum") / x.shape[0]
        - 0.5 * (1 + lv - mu**2 - lv.exp()).sum(1).mean()
    )


run("vae", V(), lambda s: ((torch.rand(64, 64) > 0.5).float(),) * 2, vloss)
# 6 memorization to convergence
X = torch.randn(32, 20)
Y = torch.randint(0, 5, (32,))
run(
    "memorize 32 samples 600 steps",
    nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5)),
    lambda s: (X, Y),
    ce,
    steps=600,
    opt=lambda m: torch.optim.Adam(m.parameters(), 1e-2),
)
# 7 diverging SGD
run(
    "mlp sgd lr 5 (ReLUs die)",
    nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5)),
    cls,
    ce,
    steps=60,
    opt=lambda m: torch.optim.SGD(m.parameters(), 5.0),
)
# 8 frozen backbone
bb = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
bb.requires_grad_(False)
run("frozen backbone + head", nn.Sequential(bb, nn.Linear(128, 5)), cls, ce)


# 9 deep tanh xavier 30
def deep(depth, act, init):
    L = []
    d = 20
    for _i in range(depth):
        lin = nn.Linear(d, 64)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        L += [lin, act()]
        d = 64
    return nn.Sequential(*L, nn.Linear(64, 5))


run("tanh30 xavier", deep(30, nn.Tanh, lambda w: nn.init.xavier_normal_(w, gain=5 / 3)), cls, ce)
run("relu30 he", deep(30, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")), cls, ce)
run(
    "gelu12 default adamw",
    deep(12, nn.GELU, lambda w: None),
    cls,
    ce,
    opt=lambda m: torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.1),
)
run("silu8 default", deep(8, nn.SiLU, lambda w: None), cls, ce)
# 10 regression unnormalized targets
run(
    "regression y~1000 adam",
    nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1)),
    lambda s: (lambda x: (x, 1000 + 100 * x[:, :1]))(torch.randn(64, 20)),
    nn.functional.mse_loss,
)
# 11 single linear
run("logistic regression", nn.Linear(20, 5), cls, ce)


# 12 embeddingbag
class R(nn.Module):
    def __init__(s):
        super().__init__()
        s.u = nn.Embedding(1000, 16)
        s.i = nn.Embedding(1000, 16)
        s.m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(s, x):
        return s.m(torch.cat([s.u(x[:, 0]), s.i(x[:, 1])], 1)).squeeze(1)


run("recsys embeddings", R(), lambda s: (torch.randint(0, 1000, (128, 2)), torch.rand(128)), nn.functional.mse_loss)
# 13 1d conv net on sequences no norm
run(
    "conv1d seq",
    nn.Sequential(
        nn.Conv1d(4, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    ),
    lambda s: (lambda x: (x, (x[:, 0].mean(1) > 0).long()))(torch.randn(32, 4, 50)),
    ce,
)


# 14 GRU long seq
class G(nn.Module):
    def __init__(s):
        super().__init__()
        s.g = nn.GRU(1, 64, batch_first=True)
        s.f = nn.Linear(64, 1)

    def forward(s, x):
        return s.f(s.g(x)[0][:, -1])


run(
    "gru seq 100",
    G(),
    lambda s: (lambda x: (x, x[:, :5].sum(1)))(torch.randn(32, 100, 1)),
    nn.functional.mse_loss,
    steps=100,
)

# --- more architectures
V = 20000


def bow(s):
    x = torch.zeros(32, V)
    idx = torch.randint(0, V, (32, 20))
    x.scatter_(1, idx, 1.0)
    return x, (idx[:, 0] % 2)


run(
    "bag-of-words 20k -> mlp4",
    nn.Sequential(
        nn.Linear(V, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2)
    ),
    bow,
    ce,
    steps=100,
)


class ViT(nn.Module):
    def __init__(s, d=64):
        super().__init__()
        s.patch = nn.Conv2d(3, d, 4, 4)
        s.cls = nn.Parameter(torch.zeros(1, 1, d))
        s.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        s.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"),
            6,
            enable_nested_tensor=False,
        )
        s.norm = nn.LayerNorm(d)
        s.head = nn.Linear(d, 10)
        nn.init.zeros_(s.head.weight)

    def forward(s, x):
        p = s.patch(x).flatten(2).transpose(1, 2)
        p = torch.cat([s.cls.expand(len(x), -1, -1), p], 1) + s.pos
        return s.head(s.norm(s.enc(p))[:, 0])


run(
    "vit zero-init head",
    ViT(),
    lambda s: (lambda x: (x, (x[:, 0].mean((1, 2)) > 0).long()))(torch.randn(32, 3, 16, 16)),
    ce,
    steps=100,
    opt=lambda m: torch.optim.AdamW(m.parameters(), 3e-4),
)


class UNet(nn.Module):
    def __init__(s):
        super().__init__()
        c = 16
        s.e1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        s.e2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        s.b = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU())
        s.up = nn.ConvTranspose2d(2 * c, c, 2, 2)
        s.d1 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU())
        s.out = nn.Conv2d(c, 1, 1)

    def forward(s, x):
        a = s.e1(x)
        b = s.b(s.e2(nn.functional.max_pool2d(a, 2)))
        return s.out(s.d1(torch.cat([a, s.up(b)], 1)))


run(
    "unet denoise",
    UNet(),
    lambda s: (lambda x: (x + 0.3 * torch.randn_like(x), x))(torch.rand(16, 1, 32, 32)),
    nn.functional.mse_loss,
    steps=100,
)


class Seq2Seq(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(30, 32)
        s.enc = nn.LSTM(32, 64, batch_first=True)
        s.dec = nn.LSTM(32, 64, batch_first=True)
        s.o = nn.Linear(64, 30)

    def forward(s, x):
        _, h = s.enc(s.e(x))
        y, _ = s.dec(s.e(torch.flip(x, [1])), h)
        return s.o(y)


run(
    "seq2seq lstm reverse",
    Seq2Seq(),
    lambda s: (lambda x: (x, torch.flip(x, [1])))(torch.randint(0, 30, (32, 12))),
    lambda o, y: ce(o.reshape(-1, 30), y.reshape(-1)),
    steps=150,
)
