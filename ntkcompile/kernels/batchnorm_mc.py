"""Training-mode BatchNorm by joint Monte Carlo over a batch (``ops/batchnorm.py``).

A batch-coupled model is evaluated as one input whose positions are the examples of its
batches, side by side (then each example's own positions, for BatchNorm2d, which normalizes
over both).  For one coordinate the batch's G-vars ``g`` are a Gaussian vector
over the positions with the input covariance ``K``; they are sampled jointly, and per
sample and per batch ``b`` (positions ``P_b``, ``B = |P_b|``)

    u = pre(g),  m = mean_{P_b} u,  s^2 = mean_{P_b} (u - m)^2 + eps,
    xhat = (u - m) / s,  y = post(xhat)

(``gamma = 1``, ``beta = 0``).  Then

* forward: ``E[y_p y_q]`` is the Gram of ``y`` over the samples, ``E[y_p]`` its mean;
* backward: ``J_pk = dy_p / dg_k = post'(xhat_p) (delta_pk - 1/B - xhat_p xhat_k / B) / s
  pre'(g_k)`` for ``p, k`` in one batch (0 across batches), and the gradient covariance
  into ``g`` for every pair of output examples (the leading axes of ``D``) is
  ``sum_{p,q} D_pq E[J_pk J_ql]``: for small batches from the fourth moments ``E[J_pk J_ql]``,
  the Gram over the samples of ``J`` flattened per pair of batches (``_dense``); for feature
  maps (a batch of ``B`` examples of ``|P|`` positions is ``B |P|`` G-vars) from the structure
  of ``J`` (``_structured``);
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
    """The flattened positions of each batch: its examples times every position of each."""
    per, start = math.prod(spec.example_shape), 0
    for b in spec.sizes:
        yield slice(start * per, (start + b) * per)
        start += b


def forward(k_in, spec, mc, samples, errors, stream=0):
    """``{"x", "f"}`` ``(1, *Q, *Q)``, ``"d"``, ``"mean"`` ``(1, *Q)`` of the normalized vector
    (``Q = (examples, *example_shape)``), and the samples the backward continues, from the
    packed input covariance ``(1, *Q, *Q)``."""
    Q = (sum(spec.sizes),) + tuple(spec.example_shape)
    n = math.prod(Q)
    if k_in.ndim != 1 + 2 * len(Q) or k_in.shape[0] != 1:
        raise RuntimeError(f"internal error: a batch-coupled kernel evaluated on {tuple(k_in.shape)} pairs")
    errors.append(("mc", k_in.new_zeros(())))          # its error is the spread of replicates
    shaped = lambda a, k: a.reshape(1, *(Q * k))  # noqa: E731
    if not bool(torch.isfinite(k_in).all()):
        nan = k_in.new_full((1, n, n), math.nan)
        return {"x": shaped(nan, 2), "f": shaped(nan, 2), "d": shaped(nan[:, 0], 1), "mean": shaped(nan[:, 0], 1),
                "samples": None}
    k = k_in.reshape(n, n).to(_F64)
    L = _factor(k)
    gen = torch.Generator(device=k_in.device).manual_seed(int(mc[1]) * 7919 + 104_729 + int(stream))
    S = int(samples)
    z = torch.randn(S, L.shape[1], generator=gen, dtype=_F64, device=k_in.device) @ L.T       # (S, n)
    pre, dpre = spec.chain("pre")
    post, dpost = spec.chain("post")
    u = pre(z)
    xhat = torch.empty_like(u)
    scale = torch.empty_like(u)
    for b in _batches(spec):
        c = u[:, b] - u[:, b].mean(1, keepdim=True)
        s = torch.sqrt((c * c).mean(1, keepdim=True) + spec.eps)
        xhat[:, b] = c / s
        scale[:, b] = s
    y = post(xhat)
    gram = y.T @ y / S
    handle = {"xhat": xhat, "scale": scale, "dpre": dpre(z), "dpost": dpost(xhat),
              "rank": _centered_rank(k, spec) if not spec.pre else None}
    return {"x": shaped(gram, 2), "f": shaped(gram, 2), "d": shaped(torch.diagonal(gram), 1),
            "mean": shaped(y.mean(0), 1), "samples": handle}


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


def _jacobians(h, b):
    """``J`` ``(S, B, B)`` of the flattened positions ``b`` of one batch: ``[s, p, k]`` =
    ``dy_p / dg_k`` of sample ``s``."""
    x = h["xhat"][:, b]
    B = x.shape[1]
    eye = torch.eye(B, dtype=_F64, device=x.device)
    core = eye - 1.0 / B - x[:, :, None] * x[:, None, :] / B
    a = h["dpost"][:, b] / h["scale"][:, b]
    return a[:, :, None] * core * h["dpre"][:, None, b]


def _dense(h, flat, batches):
    """``E[J^T D J]`` from the fourth moments ``E[J_pk J_ql]``, the Gram over the samples of
    ``J`` flattened per pair of batches: ``(sum_b B^2)^2 x samples`` work, for small batches."""
    S = h["xhat"].shape[0]
    out = torch.zeros_like(flat)
    Js = [_jacobians(h, b).reshape(S, -1) for b in batches]
    for i, bi in enumerate(batches):
        for j, bj in enumerate(batches):
            Bi, Bj = bi.stop - bi.start, bj.stop - bj.start
            m = (Js[i].T @ Js[j] / S).reshape(Bi, Bi, Bj, Bj)            # [p, k, q, l] = E[J_pk J_ql]
            m = m.permute(0, 2, 1, 3).reshape(Bi * Bj, Bi * Bj)           # (p q) x (k l)
            out[:, bi, bj] = (flat[:, bi, bj].reshape(-1, Bi * Bj) @ m).reshape(-1, Bi, Bj)
    return out


def _structured(h, flat, batches, twins=None):
    """``E[J^T D J]`` from the structure ``J = diag(a) (I - U U^T) diag(b)``: ``a = post'(xhat) /
    s``, ``b = pre'(g)``, ``U`` the columns ``1_B / sqrt(B)`` and ``xhat_B / sqrt(B)`` of each batch
    ``B``.  With ``A = (a a^T) o D`` and ``Y_j = a o U_j``,

        (I - UU^T) A (I - UU^T) = A - U (U^T A) - (A U) U^T + U (U^T A U) U^T,
        (U^T A)_jl = a_l (D^T Y_j)_l,  (A U)_kj = a_k (D Y_j)_k,  (U^T A U)_ij = Y_i . D Y_j,

    each term then averaged over the samples with ``b_k b_l``: products of ``n x n`` by
    ``n x (samples x 2 batches)`` per pair of output examples (large batches of maps), restricted
    to the rows and columns where ``D`` is not 0.  ``twins[i]``: the entry of ``flat`` that is
    entry ``i`` transposed (the pair of output examples the other way round), whose result is
    transposed instead of recomputed."""
    S, n = h["xhat"].shape
    a, bb, x = h["dpost"] / h["scale"], h["dpre"], h["xhat"]
    U = torch.zeros(S, n, 2 * len(batches), dtype=_F64, device=x.device)
    for g, b in enumerate(batches):
        root = math.sqrt(b.stop - b.start)
        U[:, b, 2 * g] = 1.0 / root
        U[:, b, 2 * g + 1] = x[:, b] / root
    ab = a * bb
    gram = ab.T @ ab / S                                                   # E[(a b)(a b)^T]
    Y = (a[:, :, None] * U).permute(1, 0, 2).reshape(n, -1)                # (n, S 2G)
    Bu = (bb[:, :, None] * U).permute(1, 0, 2).reshape(n, -1)
    cols = Y.shape[1]
    ba = ab.T.repeat_interleave(U.shape[2], dim=1)                         # (n, S 2G): a_l b_l per column
    out = torch.empty_like(flat)
    for i, D in enumerate(flat):
        j = twins[i] if twins is not None else i
        if j < i and torch.allclose(flat[j].T, D, rtol=1e-12, atol=0.0):
            out[i] = out[j].T                 # the pair of output examples the other way round
            continue
        # D is often zero outside a few rows and columns (the examples of the pair it belongs to)
        r = D.abs().sum(1).nonzero().flatten()
        c = D.abs().sum(0).nonzero().flatten()
        Dsub = D[r][:, c]
        Rc, Lr = Dsub.T @ Y[r], Dsub @ Y[c]                                # (D^T Y)[c], (D Y)[r]
        t = torch.zeros(n, n, dtype=_F64, device=D.device)
        t[:, c] -= Bu @ (ba[c] * Rc).T
        t[r] -= (ba[r] * Lr) @ Bu.T
        C = torch.einsum("nsi,nsj->sij", Y[r].reshape(len(r), S, -1), Lr.reshape(len(r), S, -1))  # (S, 2G, 2G)
        W = torch.einsum("nsi,sij->nsj", Bu.reshape(n, S, -1), C).reshape(n, cols)
        t += W @ Bu.T
        out[i] = gram * D + t / S
    return out


def _at_output(sim, d):
    """``d`` broadcast to ``(*lead, 1, *Q, *Q)`` (the output's position pairs), its ``lead`` axes,
    and the number ``n`` of flattened positions."""
    f = sim["f"]
    nq = (f.ndim - 1) // 2
    d = torch.as_tensor(d, dtype=_F64, device=f.device)
    d = torch.broadcast_to(d, (*d.shape[:max(d.ndim - 2 * nq, 0)], *f.shape[1:]))
    return d, d.shape[:d.ndim - 2 * nq], math.prod(f.shape[1:1 + nq])


def backward(sim, d, spec, seeds=0):
    """The gradient covariance into the normalized G-var, ``(*lead, 1, *Q, *Q)``, from ``d``
    ``(*lead, 1, *Q, *Q)`` at its output (``lead``: the readout's pairs of output examples,
    ``seeds`` axes: two groups of output positions)."""
    h = sim["samples"]
    d, lead, n = _at_output(sim, d)
    if h is None or not bool(torch.isfinite(d).all()):
        return torch.full_like(d, math.nan)
    _check_rank(h["rank"])
    flat = d.reshape(-1, n, n)
    batches = list(_batches(spec))
    S = h["xhat"].shape[0]
    dense = sum((b.stop - b.start) ** 2 for b in batches) ** 2 * S
    structured = flat.shape[0] * 4 * n * n * S * 2 * len(batches)
    if dense <= structured:
        return _dense(h, flat, batches).reshape(d.shape)
    twins = None
    if seeds and seeds % 2 == 0:          # (s, t) -> (t, s): the seed groups swapped
        half = lead[:seeds // 2]
        m = math.prod(half)
        idx = torch.arange(flat.shape[0]).reshape(m, m, -1)
        twins = idx.transpose(0, 1).reshape(-1).tolist()
    return _structured(h, flat, batches, twins).reshape(d.shape)


def affine(sim, d, kind):
    """``sum_{p,q} D_pq E[a_p a_q]`` over the last two axes of ``d`` (``kind``: ``"gain"``,
    ``a = post'(xhat) xhat``, or ``"shift"``, ``a = post'(xhat)``)."""
    h = sim["samples"]
    d, lead, n = _at_output(sim, d)
    if h is None:
        return torch.full(lead, math.nan, dtype=_F64, device=d.device)
    a = h["dpost"] * h["xhat"] if kind == "gain" else h["dpost"]
    gram = a.T @ a / a.shape[0]
    return (d.reshape(*lead, n * n) * gram.reshape(n * n)).sum(-1)
