"""Transformer blocks (issue 10, item 3): pre-LN and post-LN residual blocks with 1/n
attention, a GELU MLP, token embeddings (``nn.Linear`` or ``nn.Embedding``), learned
positional embeddings, mean-pooling or a first-token readout.

Oracles: empirical NTKs of wide finite networks (torch.func, ``helpers.convergence``);
a one-token sequence, where attention is the identity, against the same blocks with the
attention replaced by its value projection; the linearity of the readout (a mean over
positions against the per-position kernel); exact linear algebra (symmetry, PSD, cross
blocks).  ``tests/ops/test_attention.py`` checks the attention itself against a numpy
recursion.
"""
import pytest
import torch
from torch import nn

import ntkcompile
from helpers.convergence import convergence_sweep

D, T, VOCAB = 3, 4, 7


class Block(nn.Module):
    def __init__(self, n, tied=True, pre=True, attend=True):
        super().__init__()
        self.tied, self.pre, self.attend = tied, pre, attend
        self.n1, self.n2 = nn.LayerNorm(n), nn.LayerNorm(n)
        self.q, self.k, self.v, self.o = (nn.Linear(n, n) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(n, 2 * n), nn.Linear(2 * n, n)

    def attn(self, x):
        if not self.attend:
            return self.o(self.v(x))
        q = self.q(x)
        k = q if self.tied else self.k(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], dim=-1)
        return self.o(a @ self.v(x))

    def mlp(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    def forward(self, h):
        if self.pre:
            h = h + self.attn(self.n1(h))
            return h + self.mlp(self.n2(h))
        h = self.n1(h + self.attn(h))
        return self.n2(h + self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, n, tied=True, pre=True, read="mean", tokens=False, pos=False, attend=True, length=T):
        super().__init__()
        self.read, self.tokens = read, tokens
        self.emb = nn.Embedding(VOCAB, n) if tokens else nn.Linear(D, n)
        self.pos = nn.Parameter(torch.randn(length, n)) if pos else None
        self.blocks = nn.Sequential(Block(n, tied, pre, attend), Block(n, tied, pre, attend))
        self.norm = nn.LayerNorm(n) if pre else nn.Identity()
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = self.emb(x)
        if self.pos is not None:
            h = h + self.pos
        h = self.norm(self.blocks(h))
        return self.out(h.mean(1) if self.read == "mean" else h[:, 0] if self.read == "first" else h)


OPTS = dict(W_std=1.1, b_std=0.2)


def _x(n, seed=0, length=T):
    return torch.randn(n, length, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("pre", [True, False])
def test_one_token_attends_to_itself(pre):
    """With one position the attention weights are 1: the blocks are the same blocks with
    the attention replaced by its value projection (the query and key drop out of the
    NTK in the limit, so the NTKs agree too)."""
    x = _x(4, length=1)
    got = ntkcompile.compile(Transformer(16, pre=pre, length=1), **OPTS)(x)
    want = ntkcompile.compile(Transformer(16, pre=pre, attend=False, length=1), **OPTS)(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(tied=False), dict(pre=False), dict(read="first"),
                                dict(tokens=True, pos=True)], ids=["pre-ln", "untied", "post-ln", "first-token",
                                                                    "tokens+positions"])
def test_transformer_kernels_are_symmetric_psd_and_consistent(kw):
    if kw.get("tokens"):
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, VOCAB, (5, T), generator=g)
    else:
        x = _x(5, seed=1)
    kfn = ntkcompile.compile(Transformer(16, **kw), **OPTS)
    full, cross = kfn(x), kfn(x[:2], x[2:])
    for name in ("nngp", "ntk"):
        k = getattr(full, name)
        torch.testing.assert_close(k, k.T, rtol=0, atol=0)
        assert torch.linalg.eigvalsh(k).min() > -1e-10 * k.diagonal().max()
        torch.testing.assert_close(getattr(cross, name), k[:2, 2:], rtol=1e-12, atol=1e-12)


def test_the_mean_readout_is_the_mean_of_every_positions_readout():
    x = _x(3, seed=2)
    steps = ntkcompile.compile(Transformer(16, read="steps"), **OPTS)(x)
    mean = ntkcompile.compile(Transformer(16), **OPTS)(x)
    assert steps.ntk.shape == (3, 3, T, T)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(mean, name), getattr(steps, name).mean((2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_wide_transformers_converge_to_the_kernel(tied):
    """Two pre-LN blocks on sequences of 4: the relative error of the empirical NTK decays
    like width^-1/2 (measured over 128..4096 with 6 seeds: slopes -0.42 tied, -0.42
    untied; the mean of 16 width-1024 NTKs is within 1.2 % of the limit, below its own
    Monte Carlo spread)."""
    x = _x(3)
    limit = ntkcompile.compile(Transformer(16, tied=tied), **OPTS)(x).ntk
    errors, slope = convergence_sweep(lambda n: Transformer(n, tied=tied).double(), [64, 256, 1024], [0, 1, 2],
                                      x, None, limit, OPTS["W_std"], OPTS["b_std"])
    assert errors[-1] < errors[0], errors
    assert -0.7 <= slope <= -0.3, (errors, slope)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sgd_of_wide_transformers_follows_simulate():
    """Minibatch SGD (MSE, batches of 4) of finite Transformers against ``simulate`` from each
    network's own ``f_0`` (``compare_widths``): the largest gap falls like width^-1/2
    (measured with 4 seeds at widths 64, 256, 1024: mean gaps 0.51, 0.25, 0.10, slope -0.58;
    lr 0.3 diverges, and simulate says so with the minibatch bound 0.135)."""
    x, xt = _x(16, seed=5), _x(4, seed=6)
    y = torch.sign(x[:, :, 0].sum(1))
    kfn = ntkcompile.compile(Transformer(16), **OPTS)
    report = ntkcompile.compare_widths(lambda n: Transformer(n).double(), [64, 256, 1024, 2048], x, y, xt, **OPTS,
                                       loss="mse", lr=0.1, steps=12, batch_size=4, seeds=range(6), kfn=kfn)
    assert report.mean_gaps[-1] < report.mean_gaps[0], report.table()
    assert -0.7 <= report.slope <= -0.3, report.table()


@pytest.mark.slow
def test_wide_transformers_with_positional_embeddings_converge():
    """The positional parameter is a bias per position (``ops/posemb.py``); the finite
    networks draw it N(0, 1) and scale it by ``b_std`` (``ntk_parametrize(..., biases=)``),
    here 1.0 (``std``) so that its term (19 % of the NTK) is visible.  Measured: errors
    0.125, 0.029, 0.030 at widths 128, 512, 2048 (slope -0.51); against the kernel without
    the positional term 0.20, 0.14, 0.18 (slope -0.05)."""
    x = _x(3, seed=3)
    std = {"pos": (1.0, 1.0)}
    limit = ntkcompile.compile(Transformer(16, pos=True), std=std, **OPTS)(x).ntk
    errors, slope = convergence_sweep(lambda n: Transformer(n, pos=True).double(), [128, 512, 2048], [0, 1, 2],
                                      x, None, limit, OPTS["W_std"], OPTS["b_std"], std=std, biases=("pos",))
    assert errors[-1] < errors[0], errors
    assert -0.7 <= slope <= -0.3, (errors, slope)
