"""Embeddings of integer tokens (ops/embedding.py).

Oracles: the input layer ``Linear(V, n, bias=False)`` on one-hot tokens, with its fan-in
scaling undone (``W_std_linear = W_std sqrt(V)``), exactly (a separate code path: the
one-hot Gram matrix against token equality); and the empirical NTK of a wide finite
network in NTK parametrization.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers import kernels as compare
from helpers.kernels import close
from ntkcompile.errors import UnsupportedOpError

V, N, W, B = 7, 16, 1.3, 0.3


class Tokens(nn.Module):
    """Embedding, a Linear at every position, then a mean over time or the last token."""

    def __init__(self, read="mean", padding_idx=None, one_hot=False):
        super().__init__()
        self.read = read
        self.e = nn.Linear(V, N, bias=False) if one_hot else nn.Embedding(V, N, padding_idx=padding_idx)
        self.l, self.out = nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, t):
        h = torch.relu(self.l(self.e(t)))
        if self.read == "mean":
            h = h.mean(1)
        elif self.read == "last":
            h = h[:, -1]
        return self.out(h)


def kernels(model, x, **kw):
    return compare.kernels(model, x, W_std=W, b_std=B, **kw)


def one_hot_kernels(read, tokens, pad=None):
    x = F.one_hot(tokens, V).to(torch.float64)
    if pad is not None:
        x[..., pad] = 0.0            # the padding token's row is zero
    return kernels(Tokens(read, one_hot=True), x, std={"e": (W * math.sqrt(V), 0.0)})


@pytest.mark.parametrize("read", ["mean", "last"])
def test_embedding_is_a_one_hot_input_layer(read):
    tokens = torch.randint(0, V, (6, 5))
    close(kernels(Tokens(read), tokens), one_hot_kernels(read, tokens))


def test_one_token_per_input():
    tokens = torch.randint(0, V, (6,))
    kfn = ntkcompile.compile(Tokens("none"), W_std=W, b_std=B)
    close(kfn(tokens), one_hot_kernels("none", tokens))
    assert kfn.input_shape == ()


def test_padding_tokens_have_zero_rows():
    tokens = torch.randint(0, V, (6, 5))
    tokens[:, 0] = 2
    close(kernels(Tokens("mean", padding_idx=2), tokens), one_hot_kernels("mean", tokens, pad=2))


def test_cross_kernels_and_float_token_ids():
    """Against another batch, and token ids given as floats (as the command line reads them)."""
    t1, t2 = torch.randint(0, V, (4, 5)), torch.randint(0, V, (3, 5))
    kfn = ntkcompile.compile(Tokens("mean"), W_std=W, b_std=B)
    k = kfn(t1, t2.double())
    x1, x2 = F.one_hot(t1, V).double(), F.one_hot(t2, V).double()
    ref = ntkcompile.compile(Tokens("mean", one_hot=True), W_std=W, b_std=B, std={"e": (W * math.sqrt(V), 0.0)})
    close(k, ref(x1, x2))


def test_embedding_through_export():
    tokens = torch.randint(0, V, (6, 5))
    ep = torch.export.export(Tokens("mean", padding_idx=1), (tokens,))
    close(kernels(ep, tokens), kernels(Tokens("mean", padding_idx=1), tokens))


class FunctionalEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, N))
        self.out = nn.Linear(N, 1)

    def forward(self, t):
        return self.out(torch.tanh(F.embedding(t, self.table)).mean(1))


class ModuleEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(V, N)
        self.out = nn.Linear(N, 1)

    def forward(self, t):
        return self.out(torch.tanh(self.table(t)).mean(1))


def test_functional_embedding_of_a_bare_parameter():
    tokens = torch.randint(0, V, (5, 4))
    close(kernels(FunctionalEmbedding(), tokens), kernels(ModuleEmbedding(), tokens))


class NTKTokens(nn.Module):
    """``Tokens("mean")`` in NTK parametrization, biases omitted: rows ``W w``, weights
    ``(W / sqrt(fan_in)) w``, every ``w ~ N(0, 1)``."""

    def __init__(self, width, generator):
        super().__init__()
        self.width = width
        self.e = nn.Parameter(torch.randn(V, width, generator=generator, dtype=torch.float64))
        self.l = nn.Parameter(torch.randn(width, width, generator=generator, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(1, width, generator=generator, dtype=torch.float64))

    def forward(self, t):
        h = W * self.e[t]
        h = torch.relu(h @ self.l.T * (W / math.sqrt(self.width)))
        return h.mean(1) @ self.v.T * (W / math.sqrt(self.width))


def test_empirical_ntk_of_a_wide_embedding_model():
    """Width 2048, the mean of three seeds: within 5% in relative Frobenius norm (measured
    1.8-2.6% over token draws; per parameter, the embedding's, the Linear's and the
    readout's terms each match)."""
    tokens = torch.randint(0, V, (5, 4), generator=torch.Generator().manual_seed(0))
    limit = ntkcompile.compile(Tokens("mean"), W_std=W, b_std=0.0)(tokens).ntk
    emp = sum(ntkcompile.empirical_ntk(NTKTokens(2048, torch.Generator().manual_seed(seed)), tokens)
              for seed in range(3)) / 3
    assert float(torch.linalg.norm(emp - limit) / torch.linalg.norm(limit)) < 0.05


class MaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.out = nn.Embedding(V, N, max_norm=1.0), nn.Linear(N, 1)

    def forward(self, t):
        return self.out(self.e(t))


def test_max_norm_is_refused():
    with pytest.raises(UnsupportedOpError, match="max_norm"):
        ntkcompile.compile(MaxNorm())(torch.randint(0, V, (3,)))
