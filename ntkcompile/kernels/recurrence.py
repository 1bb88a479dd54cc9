"""Recurrences over time as loops in the plan: the exact route for Elman cells.

A recurrent layer ``h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, ``h_{-1} = 0``,
has the pre-activation covariance (TP II: the same matrix ``W_hh`` at every step,
so all its uses covary)

    P[s, t] = W_ih^2 X[s, t] + b_ih^2 + b_hh^2 + W_hh^2 C[s-1, t-1],
    C[s, t] = E[phi(u) phi(v)],  (u, v) ~ N(0, [[P_ss, P_st], [P_st, P'_tt]]),

for every pair of time steps ``(s, t)`` of two inputs, and, under the gradient
independence assumption, the backward covariance of the pre-activations

    Delta[s, t] = E[phi'(u) phi'(v)] * (O[s, t] + W_hh^2 Delta[s+1, t+1]),

where ``O`` is what the rest of the network sends back into the states
(``D(h, h')``).  The layer's parameters contribute ``sum_{s,t} Delta * P`` to the
NTK, and its input receives ``W_ih^2 Delta``.

The planner evaluates each recurrence as a ``plan.Loop`` whose body it plans
*once*: a step computes a whole row ``s`` (every ``t`` at once), carrying the
previous row, so the generated code does not grow with ``T``.  Inside a body the
expectations go through the planner's ordinary rules (closed forms, quadrature
with its error estimate): the body's pre-activation is a ``Bound`` Gaussian atom
whose covariances are the loop's arrays -- a row ``(N1, N2, T)`` for the cross
pair, ``(N1, 1)`` (step ``s``) and ``(N2, T)`` (every ``t``) for the variances,
which the ordinary lifts ``x[:, None]``, ``x[None, :]`` broadcast against the row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir import node
from ..ir.nodes import Atom
from ..plan import Loop, LoopOut, LoopVar
from .planner import COVARIANCE, register

# -- the body's Gaussian ---------------------------------------------------------------


@node
class Bound(Atom):
    """A Gaussian whose covariances are given plan values (``Planner.bound``), keyed by
    ``(atom, atom, pair)``: a pre-activation inside a loop body.  ``key`` =
    ``(scan, label, loop id)`` makes it unique to its loop; the bound atoms of one
    scan covary with each other only (``cov_group``)."""
    key: object
    uid: int = -1
    gaussian = True

    @property
    def cov_group(self):
        return self.key[0]

    def positions(self, positions_of):
        return ()

    def describe(self, show):
        return f"bound {self.key[1]}"


@register(COVARIANCE, Bound)
def _bound_cov(pl, a, b, pair):
    try:
        return pl.bound[(a, b, pair)]
    except KeyError:
        raise NotImplementedError(f"a loop body needs E[{a.key[1]} {b.key[1]}'] on {pair}") from None


def bind_pair(pl, key, pair, cross, var_left, var_right):
    """Two fresh ``Bound`` atoms (the two operands of ``pair``) with variances ``var_left``,
    ``var_right`` and covariance ``cross``; returns their Vars."""
    if not hasattr(pl, "bound"):
        pl.bound = {}
    left, right = (1, 2) if pair == "x" else (int(pair[-1]),) * 2
    u = pl.b.make(Bound, (key[0], key[1] + " (left)", key[2]))
    v = pl.b.make(Bound, (key[0], key[1] + " (right)", key[2]))
    pl.bound[(u, u, f"d{left}")] = var_left
    pl.bound[(v, v, f"d{right}")] = var_right
    pl.bound[(u, v, pair)] = pl.bound[(v, u, pair)] = cross
    return pl.b.atom_var(u), pl.b.atom_var(v)


def bind(pl, key, values: dict):
    """A fresh ``Bound`` atom with covariances ``values[pair]`` with itself; its Var."""
    if not hasattr(pl, "bound"):
        pl.bound = {}
    atom = pl.b.make(Bound, key)
    for pair, v in values.items():
        pl.bound[(atom, atom, pair)] = v
    return pl.b.atom_var(atom)


def of(pl, fn, var):
    """The Var ``fn(var)`` for an ``ir.Elementwise`` ``fn`` (an H-atom of a bound Gaussian)."""
    b = pl.b
    return b.compose(lambda es: b.ecall(fn, es[0]), [var])


# -- runtime helpers the loops call ----------------------------------------------------

def at(a, t, reverse):
    """``a[..., t]`` (time reversed: ``a[..., T-1-t]``) of ``(*lead, T)``; constants stay."""
    if not torch.is_tensor(a) or a.ndim == 0:
        return a
    return a[..., a.shape[-1] - 1 - t if reverse else t]


def at_keep(a, t, reverse):
    """``a[..., t:t+1]``: the variances of side 1 at step ``t``, as ``(N1, 1)``."""
    if not torch.is_tensor(a) or a.ndim == 0:
        return a
    i = a.shape[-1] - 1 - t if reverse else t
    return a[..., i:i + 1]


def row(a, s, reverse):
    """Row ``s`` of ``(*lead, T, T)``: ``(*lead, T)``."""
    if not torch.is_tensor(a) or a.ndim < 2:
        return a
    return a[..., a.shape[-2] - 1 - s if reverse else s, :]


def shift(r, later):
    """A row moved one step along ``t``: ``r[t-1]`` (``later=False``: the previous step;
    zero at the first) or ``r[t+1]`` (zero at the last).  None (no row yet) is zero."""
    if r is None:
        return 0.0
    if not torch.is_tensor(r) or r.ndim == 0:
        return r
    return F.pad(r[..., 1:], (0, 1)) if later else F.pad(r[..., :-1], (1, 0))


def put(buf, t, v, like, reverse):
    """Write step ``t``'s variances ``v`` ``(*lead,)`` into the stack ``buf`` shaped like
    ``like`` ``(*lead, T)`` (allocated on first use)."""
    buf = torch.zeros_like(like) if buf is None else buf
    buf[..., like.shape[-1] - 1 - t if reverse else t] = v
    return buf


def put_row(buf, s, v, like, reverse):
    """Write row ``s`` ``(*lead, T)`` into the stack ``buf`` shaped like ``like``
    ``(*lead, T, T)`` (allocated on first use)."""
    if buf is None:      # a backward row may carry the output pairs' leading axes (a per-step readout)
        lead = torch.broadcast_shapes(like.shape[:-2], v.shape[:-1]) if torch.is_tensor(v) else like.shape[:-2]
        buf = like.new_zeros((*lead, *like.shape[-2:]))
    buf[..., like.shape[-2] - 1 - s if reverse else s, :] = v
    return buf


# -- the loops ---------------------------------------------------------------------------

def variance_loop(pl, scan, fn, side, xin, coef, T):
    """``(P, C)`` on the same input and step: ``(N, T)`` each, one step per time.

    ``xin``: the input's ``(N, T)`` variances; ``coef = (W_ih^2, b^2, W_hh^2)``.
    """
    plan, rev = pl.plan, scan.param.reverse
    lid = plan.new_loop_id()
    t, c_prev = plan.make(LoopVar, lid, None), plan.make(LoopVar, lid, 0)
    pbuf, cbuf = plan.make(LoopVar, lid, 1), plan.make(LoopVar, lid, 2)
    w_ih, bias, w_hh = coef
    p_t = plan.add([plan.mul(w_ih, pl.call(at, xin, t, rev)), bias, plan.mul(w_hh, c_prev)])
    d = f"d{side}"
    g = bind(pl, (scan, f"pre_t (variances, side {side})", lid), {d: p_t})
    c_t = yield from pl.cov(of(pl, fn, g), of(pl, fn, g), d)
    body = (_zero(c_t), pl.call(put, pbuf, t, p_t, xin, rev), pl.call(put, cbuf, t, _zero(c_t), xin, rev))
    loop = plan.make(Loop, lid, T, (0.0, None, None), body)
    return plan.make(LoopOut, loop, 1), plan.make(LoopOut, loop, 2)


def cross_loop(pl, scan, fn, pair, xin, d_left, d_right, coef, T):
    """``(P, C)`` for every pair of steps, ``(*lead, T, T)``: row ``s`` per step.

    ``pair`` is ``"x"`` (two inputs) or ``"f1"``/``"f2"`` (one input with itself);
    ``d_left``/``d_right`` are the two sides' ``(N, T)`` pre-activation variances.
    """
    plan, rev = pl.plan, scan.param.reverse
    lid = plan.new_loop_id()
    s, c_prev = plan.make(LoopVar, lid, None), plan.make(LoopVar, lid, 0)
    pbuf, cbuf = plan.make(LoopVar, lid, 1), plan.make(LoopVar, lid, 2)
    w_ih, bias, w_hh = coef
    p_row = plan.add([plan.mul(w_ih, pl.call(row, xin, s, rev)), bias,
                      plan.mul(w_hh, pl.call(shift, c_prev, rev))])
    u, v = bind_pair(pl, (scan, f"pre_s pre'_t ({pair})", lid), pair, p_row,
                     pl.call(at_keep, d_left, s, rev), d_right)
    c_row = yield from pl.cov(of(pl, fn, u), of(pl, fn, v), pair)
    body = (_zero(c_row), pl.call(put_row, pbuf, s, p_row, xin, rev),
            pl.call(put_row, cbuf, s, _zero(c_row), xin, rev))
    loop = plan.make(Loop, lid, T, (None, None, None), body)
    return plan.make(LoopOut, loop, 1), plan.make(LoopOut, loop, 2)


def backward_loop(pl, scan, fn, p, d1, d2, out, w_hh, T):
    """``Delta`` ``(*lead, T, T)`` from the last step back: ``out`` is ``O = D(h, h')``."""
    plan, rev = pl.plan, not scan.param.reverse        # backwards in the layer's own time
    lid = plan.new_loop_id()
    s, d_next, dbuf = plan.make(LoopVar, lid, None), plan.make(LoopVar, lid, 0), plan.make(LoopVar, lid, 1)
    u, v = bind_pair(pl, (scan, "pre_s pre'_t (backward)", lid), "x", pl.call(row, p, s, rev),
                     pl.call(at_keep, d1, s, rev), d2)
    dphi = yield from pl.cov(of(pl, fn.prime(), u), of(pl, fn.prime(), v), "x")
    o_row = pl.call(row, pl.tensor(out), s, rev) if out is not None else None
    d_row = plan.mul(dphi, plan.add([o_row, plan.mul(w_hh, pl.call(shift, d_next, rev))]))
    body = (_zero(d_row), pl.call(put_row, dbuf, s, _zero(d_row), p, rev))
    loop = plan.make(Loop, lid, T, (None, None), body)
    return plan.make(LoopOut, loop, 1)


def _zero(v):
    return 0.0 if v is None else v


# -- the joint Monte Carlo route (gated cells: kernels/scan_mc.py) -----------------------
#
# Sampling is joint over every input of a tile, so these run against itself only
# (``pairs`` = the packed pairs' rows and columns); a cross kernel of such a model is
# a block of the kernel of both batches together (``tiling``).

def _unpack(packed, pairs):
    """Packed pairs ``(Np, T, T)`` (``i <= j``) -> ``(N, N, T, T)``; ``E[x_j,s x_i,t]`` is
    the ``(i, j)`` entry at ``(t, s)``.  With leading axes of output pairs (a per-step
    readout's backward, ``(*P, *P, Np, T, T)`` -> ``(R, R, N, N, T, T)``, ``R = |P|``),
    those swap too."""
    if pairs is None:
        raise RuntimeError("internal error: the joint Monte Carlo evaluator runs against itself only")
    I, J = pairs
    n = int(J[-1]) + 1 if J.numel() else 0
    k = packed.ndim - 3
    if k:
        R = math.prod(packed.shape[:k // 2])
        packed = packed.reshape(R, R, *packed.shape[k:])
    full = packed.new_empty(*packed.shape[:-3], n, n, *packed.shape[-2:])
    full[..., I, J, :, :] = packed
    full[..., J, I, :, :] = packed.transpose(-1, -2).transpose(0, 1) if k else packed.transpose(-1, -2)
    return full


def mc_forward(cell, k_in, pairs, mc, samples, errors):
    """The states' covariances of a gated layer, sampled jointly: a dict of
    ``"x"`` (packed ``(Np, T, T)``), ``"d"`` ``(N, T)``, ``"f"`` ``(N, T, T)``, ``"mean"``,
    and ``"forward"``, the sampled forward pass that ``mc_backward`` continues."""
    from .scan_mc import scan_mc_forward
    full = _unpack(k_in, pairs)
    if not bool(torch.isfinite(full).all()):
        # NaN out: the tile is re-run with checking code, which names the first array that
        # is not finite and its model node (tiling._non_finite)
        n, T = full.shape[0], full.shape[-1]
        out, handle = {"h": full.new_full((n, n, T, T), math.nan), "mean": full.new_full((n, T), math.nan)}, None
    else:
        out, handle = scan_mc_forward(cell, full, samples=samples, seed=mc[1])
    errors.append(("mc", full.new_zeros(())))      # its error is the spread of replicates (tiling)
    h = out["h"]
    n = h.shape[0]
    same = h[torch.arange(n), torch.arange(n)]                       # (N, T, T)
    return {"x": h[pairs[0], pairs[1]], "f": same, "d": torch.diagonal(same, dim1=-2, dim2=-1),
            "mean": out["mean"], "forward": handle}


def mc_backward(sim, dh, pairs):
    """The layer's NTK term (packed ``(Np,)``) and the covariance of the gradient into its
    input (packed ``(Np, T, T)``), from the outside gradient's covariance ``dh``: the
    backward pass of ``mc_forward``'s samples ``sim`` (the same draws, not sampled again)."""
    from .scan_mc import scan_mc_backward
    n, T = sim["f"].shape[0], sim["f"].shape[-1]
    seeds = ()
    if not torch.is_tensor(dh) or dh.ndim < 3:
        like = sim["f"]
        d = torch.broadcast_to(torch.as_tensor(dh, dtype=like.dtype, device=like.device), (n, n, T, T)).clone()
    else:
        seeds = tuple(dh.shape[:dh.ndim - 3])          # a per-step readout's output pairs
        d = _unpack(dh, pairs)
    if sim["forward"] is None or not bool(torch.isfinite(d).all()):
        nan = d.new_full(d.shape, math.nan)
        out = {"ntk": nan[..., 0, 0], "dx": nan}
    else:
        out = scan_mc_backward(sim["forward"], d)
    I, J = pairs
    return {"ntk": out["ntk"][..., I, J].reshape(*seeds, -1),
            "dx": out["dx"][..., I, J, :, :].reshape(*seeds, -1, T, T)}
