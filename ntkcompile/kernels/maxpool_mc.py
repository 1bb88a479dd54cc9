"""Max pooling by joint Monte Carlo over a tile's inputs (``ops/maxpool.py``).

The max of a window is an H-var of the window's G-vars (4 of them for a 2x2 window, 8
for a pair of inputs), and a pair of pooled maps needs every pair of windows: there is
no low-dimensional quadrature.  As for gated recurrent cells (``scan_mc``), the
coordinates of the pooled G-var ``g`` are sampled *jointly* over every input and
position of a tile from its covariance (so the kernels are Gram matrices: symmetric,
PSD), torch's own ``max_pool`` is applied to every sample, and

* forward: ``E[y_p y'_q]`` = the Gram of ``y = phi(maxpool(g))`` over the samples, with
  ``phi`` the monotone nonlinearity before the pooling (``maxpool(phi(g)) =
  phi(maxpool(g))``);
* backward: ``y_p`` depends on ``g_k`` through ``J_pk = phi'(y_p) [k = argmax of window
  p]`` (the a.e. derivative; ties have probability 0), so the gradient covariance into
  ``g`` is ``E[J^T D J']``: ``sum_{p,q} E[J_pk J'_ql] D[p, q]`` with ``E`` the average
  over the same samples.

The bias of these plug-in averages is O(1/samples) relative and their spread
O(1/sqrt(samples)); the standard error reported with the kernels is the spread of
independent replicates (``tiling``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .scan_mc import _factor
from .recurrence import _unpack as _unpack_steps

_F64 = torch.float64


def _unpack(packed, pairs, k):
    """Packed ``(Np, *P, *P)`` -> full ``(N, N, nP, nP)``; the entry ``(j, i)`` transposed."""
    Np = packed.shape[0]
    nP = math.prod(packed.shape[1:1 + k]) if k else 1
    return _unpack_steps(packed.reshape(Np, nP, nP), pairs)


def _pool(z, spec):
    pool = F.max_pool1d if len(spec.kernel) == 1 else F.max_pool2d
    return pool(z, spec.kernel, spec.stride, spec.padding, return_indices=True)


def forward(k_in, spec, pairs, mc, samples, errors, stream=0):
    """The pooled map's covariances: a dict of ``"x"`` (packed ``(Np, *Q, *Q)``), ``"f"``
    ``(N, *Q, *Q)``, ``"d"`` ``(N, *Q)``, ``"mean"`` ``(N, *Q)`` and the samples the
    backward continues (``spec``: an ``ops.maxpool.MaxPoolSpec``; ``stream`` separates the
    draws of different poolings of one model)."""
    P, Q = spec.in_shape, spec.out_shape
    nP, nQ = math.prod(P), math.prod(Q)
    full = _unpack(k_in, pairs, len(P))
    N = full.shape[0]
    errors.append(("mc", full.new_zeros(())))          # its error is the spread of replicates
    if not bool(torch.isfinite(full).all()):
        nan = full.new_full((N, N, nQ, nQ), math.nan)
        return _outputs(nan, nan.new_full((N, nQ), math.nan), pairs, Q, None)
    cov = full.permute(0, 2, 1, 3).reshape(N * nP, N * nP).to(_F64)
    L = _factor(cov)
    gen = torch.Generator(device=cov.device).manual_seed(int(mc[1]) * 7919 + int(stream))
    S = int(samples)
    z = (torch.randn(S, L.shape[1], generator=gen, dtype=_F64, device=cov.device) @ L.T).reshape(S * N, 1, *P)
    top, idx = _pool(z, spec)
    fn, dfn = spec.functions()
    y = fn(top).reshape(S, N * nQ)
    gram = (y.T @ y / S).reshape(N, nQ, N, nQ).permute(0, 2, 1, 3)
    handle = {"idx": idx.reshape(S, N, nQ), "dphi": dfn(top).reshape(S, N, nQ)}
    return _outputs(gram, y.mean(0).reshape(N, nQ), pairs, Q, handle)


def _outputs(gram, mean, pairs, Q, handle):
    N = gram.shape[0]
    same = gram[torch.arange(N), torch.arange(N)]                       # (N, nQ, nQ)
    shape = lambda a, lead: a.reshape(*lead, *Q, *Q)  # noqa: E731
    return {"x": shape(gram[pairs[0], pairs[1]], (-1,)), "f": shape(same, (N,)),
            "d": torch.diagonal(same, dim1=-2, dim2=-1).reshape(N, *Q), "mean": mean.reshape(N, *Q),
            "samples": handle}


def backward(sim, dy, pairs, spec):
    """The covariance of the gradient into the pooled G-var, packed ``(Np, *P, *P)``, from
    the pooled map's ``dy`` (packed ``(Np, *Q, *Q)`` or a constant)."""
    P, Q = spec.in_shape, spec.out_shape
    nQ, K = math.prod(Q), math.prod(spec.kernel)
    N = sim["f"].shape[0]
    I, J = pairs
    if torch.is_tensor(dy) and dy.ndim > 1 + 2 * len(Q):
        raise NotImplementedError("a readout at every position after max pooling")
    if not torch.is_tensor(dy) or dy.ndim == 0:
        d = torch.full((N, N, nQ, nQ), float(dy), dtype=_F64, device=sim["f"].device)
    else:
        d = _unpack(dy, pairs, len(Q))
    handle = sim["samples"]
    if handle is None or not bool(torch.isfinite(d).all()):
        return d.new_full((I.shape[0], *P, *P), math.nan)
    idx, dphi = handle["idx"], handle["dphi"]
    S = idx.shape[0]
    # J as (S, N, nQ, K): window offset of the argmax within its window, times phi'
    offset = spec.offsets(idx)
    Jd = torch.zeros(S, N, nQ, K, dtype=_F64, device=d.device)
    Jd.scatter_(3, offset.unsqueeze(-1), dphi.unsqueeze(-1))
    Jd = Jd.reshape(S, N * nQ * K)
    G = (Jd.T @ Jd / S).reshape(N, nQ * K, N, nQ * K).permute(0, 2, 1, 3)      # (N, N, nQ K, nQ K)
    G = G.reshape(N, N, nQ, K, nQ, K) * d.reshape(N, N, nQ, 1, nQ, 1)
    A = spec.placement(d)                                                     # (nQ K, nP): window -> input
    dg = A.T @ G.reshape(N, N, nQ * K, nQ * K) @ A                            # (N, N, nP, nP)
    return dg[I, J].reshape(-1, *P, *P)
