"""Training-mode BatchNorm by joint Monte Carlo over a batch (``ops/batchnorm.py``).

A batch-coupled model is evaluated as one input whose positions are the examples of its
batches, side by side.  For one coordinate the batch's G-vars ``g`` are a Gaussian vector
over the positions with the input covariance ``K``; they are sampled jointly, and per
sample and per batch ``b`` (positions ``P_b``, ``B = |P_b|``)

    u = pre(g),  m = mean_{P_b} u,  s^2 = mean_{P_b} (u - m)^2 + eps,
    xhat = (u - m) / s,  y = post(xhat)

(``gamma = 1``, ``beta = 0``).  Then

* forward: ``E[y_p y_q]`` is the Gram of ``y`` over the samples, ``E[y_p]`` its mean;
* backward: ``J_pk = dy_p / dg_k = post'(xhat_p) (delta_pk - 1/B - xhat_p xhat_k / B) / s
  pre'(g_k)`` for ``p, k`` in one batch (0 across batches), and the gradient covariance
  into ``g`` for every pair of output examples (the leading axes of ``D``) is
  ``sum_{p,q} D_pq E[J_pk J_ql]``: the fourth moments ``E[J_pk J_ql]`` are the Gram over the
  samples of ``J`` flattened per pair of batches;
* the affine parameters: ``sum_{p,q} D_pq E[a_p a_q]`` with ``a = post'(xhat)`` (shift) or
  ``post'(xhat) xhat`` (gain).

The bias of these plug-in averages is O(1/samples) relative, their spread
O(1/sqrt(samples)); the standard error reported with the kernels is the spread of
independent replicates (``tiling``).
"""
from __future__ import annotations

import math
import warnings

import torch

from .scan_mc import _factor

_F64 = torch.float64


def _batches(spec):
    start = 0
    for b in spec.sizes:
        yield slice(start, start + b)
        start += b


def forward(k_in, spec, mc, samples, errors, stream=0):
    """``{"x", "f"}`` ``(1, T, T)``, ``"d"``, ``"mean"`` ``(1, T)`` of the normalized vector, and
    the samples the backward continues, from the packed input covariance ``(1, T, T)``."""
    if k_in.ndim != 3 or k_in.shape[0] != 1:
        raise RuntimeError(f"internal error: a batch-coupled kernel evaluated on {tuple(k_in.shape)} pairs")
    T = k_in.shape[-1]
    errors.append(("mc", k_in.new_zeros(())))          # its error is the spread of replicates
    if not bool(torch.isfinite(k_in).all()):
        nan = k_in.new_full((1, T, T), math.nan)
        return {"x": nan, "f": nan, "d": nan[:, 0], "mean": nan[:, 0], "samples": None}
    L = _factor(k_in[0].to(_F64))
    gen = torch.Generator(device=k_in.device).manual_seed(int(mc[1]) * 7919 + 104_729 + int(stream))
    S = int(samples)
    z = torch.randn(S, L.shape[1], generator=gen, dtype=_F64, device=k_in.device) @ L.T       # (S, T)
    pre, dpre = spec.chain("pre")
    post, dpost = spec.chain("post")
    u = pre(z)
    xhat = torch.empty_like(u)
    scale = torch.empty(S, len(spec.sizes), dtype=_F64, device=u.device)
    for k, b in enumerate(_batches(spec)):
        c = u[:, b] - u[:, b].mean(1, keepdim=True)
        s = torch.sqrt((c * c).mean(1, keepdim=True) + spec.eps)
        xhat[:, b] = c / s
        scale[:, k] = s[:, 0]
    y = post(xhat)
    gram = (y.T @ y / S)[None]
    handle = {"xhat": xhat, "scale": scale, "dpre": dpre(z), "dpost": dpost(xhat),
              "rank": _centered_rank(k_in[0], spec) if not spec.pre else None}
    return {"x": gram, "f": gram, "d": torch.diagonal(gram, dim1=-2, dim2=-1), "mean": y.mean(0)[None],
            "samples": handle}


def pick(d, key):
    return d[key]


def _centered_rank(k, spec):
    """The smallest rank, over the batches, of the input covariance centered over the batch."""
    ranks = []
    for b in _batches(spec):
        c = k[b, b] - k[b, b].mean(0, keepdim=True)
        c = c - c.mean(1, keepdim=True)
        ev = torch.linalg.eigvalsh(0.5 * (c + c.T))
        ranks.append(int((ev > 1e-10 * max(float(ev.max()), 1e-300)).sum()))
    return min(ranks)


def _check_rank(rank):
    """The gradient through the batch statistics has ``1 / s``: ``E[1/s^2]`` of a Gaussian
    spanning ``r`` directions after centering is finite for ``r >= 3`` (the NTK), its square
    for ``r >= 5`` (the finite-width NTK's variance, and this Monte Carlo's)."""
    if rank is None or rank >= 5:
        return
    if rank < 3:
        raise ValueError(
            f"BatchNorm in training mode over a batch whose centered inputs span {rank} direction(s): "
            "the gradient through the batch statistics has 1/sigma, and E[1/sigma^2] diverges for a "
            "Gaussian in fewer than 3 dimensions, so the infinite-width NTK is infinite (only eps keeps "
            "finite networks finite). Use batches of 8 or more examples spanning at least 3 directions")
    warnings.warn(f"BatchNorm in training mode over a batch whose centered inputs span {rank} directions: "
                  "the NTK is finite but 1/sigma^2 is heavy-tailed (infinite variance below 5 directions), so "
                  "finite networks converge slowly and the Monte Carlo standard errors are unreliable; use "
                  "batches of 8 or more examples", RuntimeWarning, stacklevel=2)


def _jacobian(h, b, k):
    """``J`` ``(S, B, B)`` of batch ``b`` (index ``k``): ``[s, p, k]`` = ``dy_p / dg_k`` of sample ``s``."""
    x = h["xhat"][:, b]
    B = x.shape[1]
    eye = torch.eye(B, dtype=_F64, device=x.device)
    core = eye - 1.0 / B - x[:, :, None] * x[:, None, :] / B
    a = h["dpost"][:, b] / h["scale"][:, k:k + 1]
    return a[:, :, None] * core * h["dpre"][:, None, b]


def backward(sim, d, spec):
    """The gradient covariance into the normalized G-var, ``(*lead, 1, T, T)``, from ``d``
    ``(*lead, 1, T, T)`` at its output (``lead``: the readout's pairs of output examples)."""
    h = sim["samples"]
    d = torch.as_tensor(d, dtype=_F64, device=sim["f"].device)
    T = sim["f"].shape[-1]
    d = torch.broadcast_to(d, (*d.shape[:-2], T, T)) if d.ndim >= 2 else d.expand(1, T, T)
    if h is None or not bool(torch.isfinite(d).all()):
        return torch.full_like(d, math.nan)
    _check_rank(h["rank"])
    lead = d.shape[:-2]
    flat = d.reshape(-1, T, T)
    out = torch.zeros_like(flat)
    S = h["xhat"].shape[0]
    batches = list(_batches(spec))
    Js = [_jacobian(h, b, k).reshape(S, -1) for k, b in enumerate(batches)]
    for i, bi in enumerate(batches):
        for j, bj in enumerate(batches):
            Bi, Bj = bi.stop - bi.start, bj.stop - bj.start
            m = (Js[i].T @ Js[j] / S).reshape(Bi, Bi, Bj, Bj)            # [p, k, q, l] = E[J_pk J_ql]
            m = m.permute(0, 2, 1, 3).reshape(Bi * Bj, Bi * Bj)           # (p q) x (k l)
            out[:, bi, bj] = (flat[:, bi, bj].reshape(-1, Bi * Bj) @ m).reshape(-1, Bi, Bj)
    return out.reshape(*lead, T, T)


def affine(sim, d, kind):
    """``sum_{p,q} D_pq E[a_p a_q]`` over the last two axes of ``d`` (``kind``: ``"gain"``,
    ``a = post'(xhat) xhat``, or ``"shift"``, ``a = post'(xhat)``)."""
    h = sim["samples"]
    d = torch.as_tensor(d, dtype=_F64, device=sim["f"].device)
    if h is None:
        return torch.full(d.shape[:-2], math.nan, dtype=_F64, device=d.device)
    a = h["dpost"] * h["xhat"] if kind == "gain" else h["dpost"]
    gram = a.T @ a / a.shape[0]
    return (d * gram).sum((-2, -1))
