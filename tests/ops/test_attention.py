"""Self-attention in the Tensor Program limit (logits scaled by 1/n, ``ops/attention.py``).

Oracle: an NTK4A-style recursion written here in numpy, independently of the compiler
(no IR, no planner): the covariances of every (input, position) pair as one matrix, the
attention weights of each input from its own query-key covariance, the attention output
``A K_v A^T`` and the backward ``A^T D A``, the weights of query and key absent from the
NTK (``ops/attention.py`` derives why).  The model: a ReLU embedding with a learned
positional embedding, one attention with a residual, mean over positions, readout; with
several heads (the width reshaped to ``(H, n / H)``), one mask per head.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

D, N, T = 3, 16, 4
W, B = 1.2, 0.3


class OneLayer(nn.Module):
    def __init__(self, tied=True, causal=False, softmax=True, pos=True, how="masked_fill"):
        super().__init__()
        self.tied, self.causal, self.softmax, self.how = tied, causal, softmax, how
        self.emb = nn.Linear(D, N)
        self.pos = nn.Parameter(torch.randn(T, N)) if pos else None
        self.q, self.k, self.v, self.o, self.out = (nn.Linear(N, N) for _ in range(5))
        self.register_buffer("additive", torch.zeros(T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf))

    def forward(self, x):
        h = torch.relu(self.emb(x) + self.pos if self.pos is not None else self.emb(x))
        q = self.q(h)
        k = q if self.tied else self.k(h)
        if self.how == "sdpa":
            a = F.scaled_dot_product_attention(q, k, self.v(h), is_causal=self.causal, scale=1 / q.shape[-1])
        else:
            s = q @ k.transpose(-1, -2) / q.shape[-1]
            if self.causal and self.how == "masked_fill":
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            elif self.causal:
                s = s + self.additive
            a = (torch.softmax(s, dim=-1) if self.softmax else s) @ self.v(h)
        return self.out((h + self.o(a)).mean(1))


def _relu(K):
    d = np.sqrt(np.diag(K))
    c = np.clip(K / np.outer(d, d), -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    th = np.arccos(c)
    return np.outer(d, d) / (2 * np.pi) * (np.sin(th) + (np.pi - th) * c), (np.pi - th) / (2 * np.pi)


def oracle(x, tied, causal, softmax=True, pos=True, head_masks=None):
    """NNGP and NTK of ``OneLayer`` (numpy, float64); ``head_masks``: one additive ``(T, T)``
    mask per head, the heads equal blocks of the width (each attends with its own mask)."""
    n = x.shape[0]
    X = x.reshape(n * T, D).numpy()
    same_pos = np.tile(np.eye(T), (n, n)) if pos else 0.0
    K0 = W ** 2 * X @ X.T / D + B ** 2 + B ** 2 * same_pos         # embedding + its bias + positions
    Ch, Dr = _relu(K0)
    Kv = W ** 2 * Ch + B ** 2                                       # q, k, v: same form
    mask = np.where(np.triu(np.ones((T, T)), 1) > 0, -np.inf, 0.0) if causal else np.zeros((T, T))
    heads = []
    for m in head_masks if head_masks is not None else [mask]:
        A = np.zeros((n * T, n * T))
        for a in range(n):
            blk = slice(a * T, (a + 1) * T)
            L = Kv[blk, blk] if tied else np.zeros((T, T))          # E[q_s k_t] of input a (every head)
            if softmax:
                z = L + m
                e = np.exp(z - z.max(1, keepdims=True))
                A[blk, blk] = e / e.sum(1, keepdims=True)
            else:
                A[blk, blk] = L
        heads.append(A)
    Ko = sum(A @ Kv @ A.T for A in heads) / len(heads)              # a fraction 1/H of the width each
    P = np.kron(np.eye(n), np.ones((1, T)) / T)
    nngp = W ** 2 * P @ (Ch + W ** 2 * Ko + B ** 2) @ P.T + B ** 2

    def S(M):                  # sum over all pairs of positions, per pair of inputs
        return M.reshape(n, T, n, T).sum((1, 3))

    Dh1 = np.full((n * T, n * T), W ** 2 / T ** 2)                # readout vector / T at every position
    ntk = nngp.copy()
    ntk += W ** 2 * S(Dh1 * Ko) + B ** 2 * S(Dh1)                  # output projection o
    Dv = sum(A.T @ (W ** 2 * Dh1) @ A for A in heads) / len(heads)  # dv = A^T W_o^T dh1, head by head
    ntk += W ** 2 * S(Dv * Ch) + B ** 2 * S(Dv)                     # values v
    Dg0 = Dr * (Dh1 + W ** 2 * Dv)                                  # residual + through v
    ntk += W ** 2 * S(Dg0 * (X @ X.T / D)) + B ** 2 * S(Dg0)        # embedding
    if pos:
        ntk += B ** 2 * S(Dg0 * same_pos)                           # one vector per position
    return nngp, ntk


# relu'(g) relu'(g') = (pi - arccos c) / 2 pi amplifies a rounding of c = 1 (the same input and
# position, its covariance summed in another order than its variance) to sqrt(2 ulp) ~ 2e-8
# in theta: ~3e-9 in the derivative, ~1e-9 relative in the NTK (measured 6e-10)
NTK_RTOL = 1e-8

CASES = [(tied, causal) for tied in (True, False) for causal in (False, True)]


@pytest.mark.parametrize("tied,causal", CASES)
def test_attention_against_the_numpy_recursion(tied, causal):
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(n, T, D, generator=g, dtype=torch.float64) for n in (3, 2))
    kfn = ntkcompile.compile(OneLayer(tied, causal), W_std=W, b_std=B)
    for a, b in ((x1, None), (x1, x2)):
        got = kfn(a, b)
        both = torch.cat([a, b]) if b is not None else a
        nngp, ntk = oracle(both, tied, causal)
        cols = slice(len(a), None) if b is not None else slice(None)
        np.testing.assert_allclose(got.nngp.numpy(), nngp[:len(a), cols], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.ntk.numpy(), ntk[:len(a), cols], rtol=NTK_RTOL)


def test_linear_attention_without_positions():
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ntkcompile.compile(OneLayer(True, False, softmax=False, pos=False), W_std=W, b_std=B)(x)
    nngp, ntk = oracle(x, True, False, softmax=False, pos=False)
    np.testing.assert_allclose(got.nngp.numpy(), nngp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.ntk.numpy(), ntk, rtol=NTK_RTOL)


@pytest.mark.parametrize("how", ["sdpa", "additive"])
def test_sdpa_and_additive_masks_are_the_hand_written_attention(how):
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = ntkcompile.compile(OneLayer(True, True), W_std=W, b_std=B)(x)
    got = ntkcompile.compile(OneLayer(True, True, how=how), W_std=W, b_std=B)(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-13, atol=1e-13)


def test_tiles_keep_each_inputs_attention():
    """The weights are per input: tiles of the batch and the packed self layout must pick
    each input's own weights (``kernels/attention.py``'s lifted layouts)."""
    x = torch.randn(5, T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kfn = ntkcompile.compile(OneLayer(True, True), W_std=W, b_std=B)
    whole, tiled = kfn(x), kfn(x, tile_size=2)
    cross = kfn(x[:2], x[2:])
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(tiled, name), getattr(whole, name), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(getattr(cross, name), getattr(whole, name)[:2, 2:], rtol=1e-13, atol=1e-13)


class Refused(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.emb, self.q, self.v, self.out = nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = self.emb(x)
        q, v = self.q(h), self.v(h)
        if self.how == "sqrt":
            a = torch.softmax(q @ q.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        elif self.how == "unscaled":
            a = torch.softmax(q @ q.transpose(-1, -2), -1) @ v
        elif self.how == "sdpa-default":
            a = F.scaled_dot_product_attention(q, q, v)
        elif self.how == "width-softmax":
            a = torch.softmax(q, -1)
        elif self.how == "input-mask":
            s = (q @ q.transpose(-1, -2) / q.shape[-1]).masked_fill(x[:, :, :1] > 0, float("-inf"))
            a = torch.softmax(s, -1) @ v
        elif self.how == "all-masked":
            s = (q @ q.transpose(-1, -2) / q.shape[-1]).masked_fill(torch.ones(T, T, dtype=torch.bool), float("-inf"))
            a = torch.softmax(s, -1) @ v
        elif self.how == "values-twice":
            a = torch.softmax(q @ q.transpose(-1, -2) / q.shape[-1], -1) @ v + v
        return self.out(a.mean(1))


@pytest.mark.parametrize("how,error,match", [
    ("sqrt", UnsupportedOpError, "1/sqrt.*no Gaussian infinite-width limit.*1/n"),
    ("unscaled", UnsupportedOpError, "not scaled.*unknown"),
    ("sdpa-default", UnsupportedOpError, "without scale="),
    ("width-softmax", UnsupportedOpError, "softmax over the width"),
    ("input-mask", UnsupportedOpError, "mask that depends on the input"),
    ("all-masked", WidthInferenceError, "masks every key"),
    ("values-twice", UnsupportedOpError, "both attended"),
])
def test_attention_that_has_no_limit_here_is_refused(how, error, match):
    with pytest.raises(error, match=match):
        ntkcompile.compile(Refused(how))(torch.randn(2, T, D))


def test_multihead_attention_modules_are_refused():
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Linear(D, N), nn.Linear(N, 1)
            self.att = nn.MultiheadAttention(N, 2, batch_first=True)

        def forward(self, x):
            h = self.emb(x)
            return self.out(self.att(h, h, h)[0].mean(1))

    with pytest.raises(UnsupportedOpError, match="nn.MultiheadAttention.*infinitely many heads"):
        ntkcompile.compile(MHA())(torch.randn(2, T, D))


class MultiHead(nn.Module):
    """``H`` heads: the width reshaped to ``(H, n / H)``, each head attending with the
    logits of its own block scaled by ``1 / head_dim``; ``per_head``: head 0 causal, the
    others not (an additive mask of shape ``(H, T, T)``)."""

    def __init__(self, H, tied=True, how="hand", per_head=False):
        super().__init__()
        self.H, self.tied, self.how, self.per_head = H, tied, how, per_head
        self.emb = nn.Linear(D, N)
        self.q, self.k, self.v, self.o, self.out = (nn.Linear(N, N) for _ in range(5))
        causal = torch.zeros(T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
        self.register_buffer("masks", torch.stack([causal] + [torch.zeros(T, T)] * (H - 1)))

    def forward(self, x):
        h = torch.relu(self.emb(x))
        if self.how == "export":                  # tuple unpacking of a shape: traced by torch.export (ATen)
            b, t, n = h.shape
            split = lambda z: z.view(b, t, self.H, n // self.H).transpose(1, 2)  # noqa: E731
        else:
            split = lambda z: z.view(z.shape[0], z.shape[1], self.H, -1).transpose(1, 2)  # noqa: E731
        q, v = split(self.q(h)), split(self.v(h))
        k = q if self.tied else split(self.k(h))
        if self.how == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / q.shape[-1])
        else:
            s = q @ k.transpose(-1, -2) / q.shape[-1]
            if self.per_head:
                s = s + self.masks
            else:
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(s, dim=-1) @ v
        a = a.transpose(1, 2).reshape(x.shape[0], T, N)
        return self.out((h + self.o(a)).mean(1))


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("how", ["hand", "sdpa", "export"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_several_heads(heads, how, tied):
    """In the limit every head's logits are the same (its blocks of W_q, W_k are independent
    copies), so with one mask for all heads several heads are one head: the oracle's."""
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = ntkcompile.compile(MultiHead(heads, tied, how), W_std=W, b_std=B)(x)
    nngp, ntk = oracle(x, tied, True, pos=False)
    np.testing.assert_allclose(got.nngp.numpy(), nngp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.ntk.numpy(), ntk, rtol=NTK_RTOL)


def test_a_mask_per_head():
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = ntkcompile.compile(MultiHead(2, per_head=True), W_std=W, b_std=B)(x)
    causal = np.where(np.triu(np.ones((T, T)), 1) > 0, -np.inf, 0.0)
    nngp, ntk = oracle(x, True, False, pos=False, head_masks=[causal, np.zeros((T, T))])
    np.testing.assert_allclose(got.nngp.numpy(), nngp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.ntk.numpy(), ntk, rtol=NTK_RTOL)
