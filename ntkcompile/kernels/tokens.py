"""Token equality arrays: the covariances of an embedding (``ops/embedding.py``).

An embedding's G-var at position ``s`` is the row of token ``tok_s``, so
``E[e_s e'_t] = W_std^2 [tok_s == tok'_t]`` (0 for the padding token ``pad``, whose row
is zero; ``pad = -1``: none).  Token ids arrive as floats of the kernel's dtype (exact
up to 2^53 in float64, 2^24 in float32); ``P`` is the token array's positions (``()``
for one token per input), ``k = len(P)``.
"""
from __future__ import annotations


def _match(left, right, pad, like):
    eq = left == right
    if pad >= 0:
        eq = eq & (left != pad)
    return eq.to(like.dtype)


def same_tokens(t, pad, like):
    """Same input, same position: ``(N, *P)``, 1 except at padding tokens."""
    return (t != pad).to(like.dtype)


def token_pairs(t1, t2, k, pad, like):
    """Every pair of positions of two inputs: ``(N1, N2, *P, *P)``."""
    left = t1.reshape(t1.shape[0], 1, *t1.shape[1:], *([1] * k))
    right = t2.reshape(1, t2.shape[0], *([1] * k), *t2.shape[1:])
    return _match(left, right, pad, like)


def token_pairs_same(t, k, pad, like):
    """Every pair of positions of the same input: ``(N, *P, *P)``."""
    left = t.reshape(t.shape[0], *t.shape[1:], *([1] * k))
    right = t.reshape(t.shape[0], *([1] * k), *t.shape[1:])
    return _match(left, right, pad, like)


def token_aligned(t1, t2, pad, like):
    """Aligned positions of two inputs: ``(N1, N2, *P)``."""
    return _match(t1.unsqueeze(1), t2.unsqueeze(0), pad, like)
