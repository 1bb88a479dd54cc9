"""Runtime helpers of attention in the Tensor Program limit (``ops/attention.py``).

Per input the attention weights are a fixed ``(Tq, Tk)`` matrix ``A`` (each row sums to
1), so the attention output ``o_s = sum_t A_st v_t`` is a linear map of the positions
with a per-input matrix.  Arrays: per-input ``A`` is ``(N, Tq, Tk)``, lifted into a cross
layout as ``(N1, 1, Tq, Tk)`` / ``(1, N2, Tq, Tk)`` (packed: ``(Np, Tq, Tk)``); covariances
carry any leading batch axes (``...``: pairs, backward seeds) before their positions.
"""
from __future__ import annotations

import numpy as np
import torch


class Mask:
    """An additive attention mask ``(Tq, Tk)`` (0 where allowed, ``-inf`` where masked, or
    any finite bias), interned by content so that equal masks make equal IR nodes."""
    __slots__ = ("array", "label")
    _interned: dict = {}

    def __init__(self, array, label):
        self.array, self.label = array, label

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
    """``softmax_t(c L_st + mask_st)`` (or ``c L + mask`` without softmax) per input, from the
    logits' limit ``L = E[Z^{q_s} Z^{k_t}]`` ``(N, Tq, Tk)``; a constant ``L`` (independent
    query and key: 0) takes its batch from ``ref``."""
    if not torch.is_tensor(logits) or logits.ndim == 0:
        logits = torch.full((ref.shape[0], *shape), float(logits), dtype=ref.dtype, device=ref.device)
    z = c * logits
    if mask is not None:
        z = z + torch.tensor(mask.array, dtype=z.dtype, device=z.device)
    return torch.softmax(z, dim=-1) if softmax else z


def _t(x, like):
    return x if torch.is_tensor(x) else torch.as_tensor(float(x), dtype=like.dtype, device=like.device)


def pair(a, b, cov):
    """``E[(A x)_s (B y)'_u] = sum_{t,r} A_st B_ur E[x_t y'_r]``: ``(..., Tq, Tq')``."""
    cov = _t(cov, a)
    if cov.ndim < 2:                 # constant over positions: rows of A and B sum to one (softmax)
        return cov * a.sum(-1)[..., :, None] * b.sum(-1)[..., None, :]
    return torch.einsum("...st,...ur,...tr->...su", a, b, cov)


def same(a, b, cov):
    """Same input, same position: ``sum_{t,r} A_st B_sr E[x_t y_r]`` from all pairs ``(N, Tk, Tk)``."""
    cov = _t(cov, a)
    if cov.ndim < 2:
        return cov * a.sum(-1) * b.sum(-1)
    return torch.einsum("...st,...sr,...tr->...s", a, b, cov)


def left(a, cov):
    """``E[(A x)_s y'_u] = sum_t A_st E[x_t y'_u]`` (``y`` not attended): ``(..., Tq, T)``."""
    return torch.einsum("...st,...tu->...su", a, _t(cov, a))


def right(b, cov):
    """``E[y_s (B x)'_u] = sum_r B_ur E[y_s x'_r]``."""
    return torch.einsum("...ur,...sr->...su", b, _t(cov, b))


def left_same(a, cov):
    """``E[(A x)_s y_s] = sum_t A_st E[x_t y_s]`` from all pairs of one input."""
    return torch.einsum("...st,...ts->...s", a, _t(cov, a))


def right_same(b, cov):
    return torch.einsum("...sr,...sr->...s", b, _t(cov, b))


def mean(a, m):
    """``E[(A x)_s] = sum_t A_st E[x_t]``."""
    if not torch.is_tensor(m) or m.ndim == 0:
        return m * a.sum(-1)
    return torch.einsum("...st,...t->...s", a, m)


def adjoint(d, a, b):
    """The backward covariance through two attentions: ``Cov(A^T do, B^T do')_{tr} =
    sum_{s,u} A_st B_ur D_su``, ``D`` of shape ``(..., Tq, Tq')`` (leading axes: the
    backward's seeds and the pairs)."""
    d = _t(d, a)
    if d.ndim < 2:
        return d * a.sum(-2)[..., :, None] * b.sum(-2)[..., None, :]
    return torch.einsum("...st,...ur,...su->...tr", a, b, d)
