"""Runtime helpers of attention in the Tensor Program limit (``ops/attention.py``).

Per input the attention weights are a fixed matrix ``A`` from the query's positions
``Pq`` to the value's ``Pk``, flattened (``(|Pq|, |Pk|)``, rows summing to 1): with
several heads (a position axis of independent width blocks) it is block-diagonal, the
mask putting ``-inf`` between different heads.  The output ``o_a = sum_b A_ab v_b`` is a
linear map of the positions with a per-input matrix.  Arrays: per-input ``A`` is
``(N, Q, K)``, lifted into a cross layout as ``(N1, 1, Q, K)`` / ``(1, N2, Q, K)``
(packed: ``(Np, Q, K)``); covariances carry leading batch axes (``...``: pairs, the
backward's seeds) before their positions ``(*P, *P)``, flattened here and restored.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .expect import const


class Mask:
    """An additive mask over the flattened query and key positions ``(Q, K)`` (0 where
    allowed, ``-inf`` where masked or across heads, or a finite bias), interned by content
    so that equal masks make equal IR nodes.  ``keep``: 1 where allowed (linear attention
    multiplies by it)."""
    __slots__ = ("array", "keep", "label")
    _interned: dict = {}

    def __init__(self, array, label):
        self.array, self.label = array, label
        self.keep = np.isfinite(array).astype(np.float64)

    @staticmethod
    def make(array, label="mask") -> "Mask":
        a = np.ascontiguousarray(np.asarray(array, dtype=np.float64))
        a.setflags(write=False)
        key = (a.shape, a.tobytes())
        found = Mask._interned.get(key)
        if found is None:
            found = Mask._interned[key] = Mask(a, label)
        return found

    def __repr__(self):
        return f"Mask({self.label}: {self.array.shape})"


def weights(logits, c, softmax, ref, shape, mask):
    """``softmax_b(c L_ab + mask_ab)`` (or ``(c L + mask) * keep`` without softmax) per input,
    from the logits' limit ``L = E[Z^{q_a} Z^{k_b}]`` ``(N, *Pq, *Pk)``; a constant ``L``
    (independent query and key: 0) takes its batch from ``ref``.  ``(N, Q, K)``."""
    q, k = shape
    if not torch.is_tensor(logits) or logits.ndim == 0:
        logits = torch.full((ref.shape[0], q, k), float(logits), dtype=ref.dtype, device=ref.device)
    z = c * logits.reshape(logits.shape[0], q, k)
    m = torch.tensor(mask.array, dtype=z.dtype, device=z.device)
    if softmax:
        return torch.softmax(z + m, dim=-1)
    return (z + torch.nan_to_num(m, neginf=0.0)) * torch.tensor(mask.keep, dtype=z.dtype, device=z.device)


def _flat(x, groups):
    """``(..., *P1, *P2, ...)`` with the position groups ``groups`` flattened (broadcast to
    their full sizes first), and the lead."""
    full = tuple(n for g in groups for n in g)
    lead = x.shape[:x.ndim - len(full)]
    x = x.expand((*lead, *full))
    return x.reshape((*lead, *[math.prod(g) for g in groups])), lead


def pair(a, b, cov, pk, pq):
    """``E[(A x)_s (B y)'_u] = sum_{t,r} A_st B_ur E[x_t y'_r]``: ``(..., *Pq, *Pq)``."""
    cov = const(cov, a)
    if cov.ndim == 0:             # constant over positions and inputs
        y = cov * a.sum(-1)[..., :, None] * b.sum(-1)[..., None, :]
    else:
        y = torch.einsum("...st,...ur,...tr->...su", a, b, _flat(cov, (pk, pk))[0])
    return y.reshape((*y.shape[:-2], *pq, *pq))


def same(a, b, cov, pk, pq):
    """Same input, same position: ``sum_{t,r} A_st B_sr E[x_t y_r]`` from all pairs ``(N, *Pk, *Pk)``."""
    cov = const(cov, a)
    if cov.ndim == 0:
        y = cov * a.sum(-1) * b.sum(-1)
    else:
        y = torch.einsum("...st,...sr,...tr->...s", a, b, _flat(cov, (pk, pk))[0])
    return y.reshape((*y.shape[:-1], *pq))


def left(a, cov, pk, pq):
    """``E[(A x)_s y'_u] = sum_t A_st E[x_t y'_u]`` (``y`` not attended, positions ``Pk``)."""
    y = torch.einsum("...st,...tu->...su", a, _flat(const(cov, a), (pk, pk))[0])
    return y.reshape((*y.shape[:-2], *pq, *pk))


def right(b, cov, pk, pq):
    """``E[y_s (B x)'_u] = sum_r B_ur E[y_s x'_r]``."""
    y = torch.einsum("...ur,...sr->...su", b, _flat(const(cov, b), (pk, pk))[0])
    return y.reshape((*y.shape[:-2], *pk, *pq))


def left_same(a, cov, pk, pq):
    """``E[(A x)_s y_s]`` from all pairs of one input (``Pq == Pk``)."""
    y = torch.einsum("...st,...ts->...s", a, _flat(const(cov, a), (pk, pk))[0])
    return y.reshape((*y.shape[:-1], *pq))


def right_same(b, cov, pk, pq):
    y = torch.einsum("...sr,...sr->...s", b, _flat(const(cov, b), (pk, pk))[0])
    return y.reshape((*y.shape[:-1], *pq))


def mean(a, m, pk, pq):
    """``E[(A x)_s] = sum_t A_st E[x_t]``."""
    if not torch.is_tensor(m) or m.ndim == 0:
        y = m * a.sum(-1)
    else:
        y = torch.einsum("...st,...t->...s", a, _flat(m, (pk,))[0])
    return y.reshape((*y.shape[:-1], *pq))


def adjoint(d, a, b, pk, pq):
    """The backward covariance through two attentions: ``Cov(A^T do, B^T do')_{tr} =
    sum_{s,u} A_st B_ur D_su``, ``D`` of shape ``(..., *Pq, *Pq)`` (leading axes: the
    backward's seeds and the pairs); ``(..., *Pk, *Pk)``."""
    d = const(d, a)
    if d.ndim == 0:
        y = d * a.sum(-2)[..., :, None] * b.sum(-2)[..., None, :]
    else:
        y = torch.einsum("...st,...ur,...su->...tr", a, b, _flat(d, (pq, pq))[0])
    return y.reshape((*y.shape[:-2], *pk, *pk))
