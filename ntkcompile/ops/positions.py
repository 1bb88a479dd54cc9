"""Indexing, slicing and averaging along fixed position axes; the layout of positions.

A width vector with fixed positions (a sequence's time steps, a feature map's
pixels) can be indexed, sliced or averaged along a position axis: ``out[:, -1]``
(the last step), ``out[:, 2:5]``, ``out.mean(1)``, ``h[-1]`` of a time-first
sequence.  Each is a fixed linear map ``M`` of the positions,
``y_s = sum_a M[s, a] x_a`` (``ir.PositionMap``), an atom ``GPosMap`` that is
Gaussian exactly when its argument is (TP II: a fixed linear combination of
width vectors):

    E[y_s y'_t] = sum_{a,b} M[s,a] M[t,b] E[x_a x'_b],

and the backward reads the gradient of its argument off through ``M^T``:
``Cov(M^T dy, M^T dy') = M^T D M``.  A selection (each row of ``M`` a single 1)
keeps same-input variances local; a mean needs the same input at every pair of
positions.

Which tensor axis is the batch, the width or a position is the value's layout
(``Width.axes``): ``transpose``/``permute`` only change it.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import WidthInferenceError
from ..ir import ANY, PositionMap, node
from ..ir.nodes import Atom
from ..kernels import spatial
from ..kernels.planner import ADJOINT, COVARIANCE, MEAN, SAME_INPUT, register
from ..passes.lower import Width, rule
from .pool import global_pool


@node
class GPosMap(Atom):
    """``M x``: the fixed map ``map`` (an ``ir.PositionMap``) of the positions of ``arg``."""
    map: object
    arg: object
    uid: int = -1
    consumes = True
    read_off = True
    mixes_positions = True
    homogeneous = True

    @property
    def gaussian(self):
        return all(v.gaussian for _, v in self.arg.pieces)

    @property
    def cov_group(self):
        groups = {a.cov_group for _, v in self.arg.pieces for _, a in v.terms}
        return groups.pop() if len(groups) == 1 else ANY

    def children(self):
        return (self.arg,)

    def positions(self, positions_of):
        return self.map.out_shape

    def describe(self, show):
        kind = "G" if self.gaussian else "linear in H-vars"
        return f"{self.map.label} ({show(self.arg)})    # {kind}"

    def backward_label(self, show):
        return f"({self.map.label})^T d{show(self)}"

    def check(self, program):
        pos = program.positions(self.arg)
        if tuple(pos) != self.map.in_shape:
            return [f"maps a vector with positions {pos} by a map of positions {self.map.in_shape}"]
        return []


# -- lowering ----------------------------------------------------------------------

def _kron(mats):
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


def map_positions(lw, node, x: Width, per_axis: dict, label: str, keep: dict) -> Width:
    """``x`` with position axis ``k`` mapped by the matrix ``per_axis[k]`` (identity where
    absent); axes with ``keep[k] = False`` are dropped (they must map to one position)."""
    mats, out_shape, renumber = [], [], {}
    for k, n in enumerate(x.positions):
        m = per_axis.get(k, np.eye(n))
        mats.append(m)
        if keep.get(k, True):
            renumber[k] = len(out_shape)
            out_shape.append(m.shape[0])
    pmap = PositionMap.make(x.positions, tuple(out_shape), _kron(mats), label)
    atom = lw.b.make(GPosMap, pmap, x.vec)
    layout = tuple(renumber[r] if isinstance(r, int) else r for r in x.axes
                   if not isinstance(r, int) or r in renumber)
    if not out_shape and layout != ("n", "w"):
        raise lw.unsupported(node, f"a width vector whose batch axis is not first (layout {layout})")
    return lw.width(node, lw.b.single(lw.b.atom_var(atom)), x.size, tuple(out_shape),
                    layout=layout if out_shape else None)


def _expand_index(idx, ndim):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is None for i in idx):
        raise NotImplementedError("indexing a width vector with None (a new axis)")
    if sum(i is Ellipsis for i in idx) > 1:
        raise NotImplementedError("an index with two ellipses")
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (ndim - len(idx) + 1) + idx[at + 1:]
    return idx + (slice(None),) * (ndim - len(idx))


def index_width(lw, node, x: Width, idx):
    """``x[idx]`` of a width vector: ints and slices along position axes."""
    axes = x.axes
    try:
        idx = _expand_index(idx, len(axes))
    except NotImplementedError as e:
        raise lw.unsupported(node, str(e)) from e
    if len(idx) != len(axes):
        raise lw.error(node, f"too many indices for a width vector with {len(axes)} axes", WidthInferenceError)
    per_axis, keep, parts = {}, {}, []
    for role, i in zip(axes, idx):
        full = isinstance(i, slice) and i == slice(None)
        if role == "n" and not full:
            raise lw.unsupported(node, "indexing the batch axis of a width vector (inputs are independent "
                                 "rows: index the input batch instead)")
        if role == "w" and not full:
            raise lw.unsupported(node, "indexing or slicing the width axis of a width vector")
        if not isinstance(role, int) or full:
            continue
        n = x.positions[role]
        if isinstance(i, slice):
            rows = list(range(*i.indices(n)))
            keep[role] = True
        elif isinstance(i, int):
            if not -n <= i < n:
                raise lw.error(node, f"index {i} is out of range for a position axis of size {n}", IndexError)
            rows = [i % n]
            keep[role] = False
        else:
            raise lw.unsupported(node, f"indexing a position axis with a {type(i).__name__}")
        if not rows:
            raise lw.error(node, f"the slice {i} of a position axis of size {n} is empty", IndexError)
        per_axis[role] = np.eye(n)[rows]
        parts.append(f"[{i}]" if isinstance(i, int) else f"[{i.start}:{i.stop}:{i.step}]")
    if not per_axis:
        return x
    return map_positions(lw, node, x, per_axis, "positions" + "".join(parts), keep)


@rule(operator.getitem)
def _getitem(lw, node, x, idx):
    if isinstance(x, (tuple, list, torch.Size)):
        return x[idx]
    if isinstance(x, Width) and x.positions and not x.pool:
        return index_width(lw, node, x, idx)
    raise lw.unsupported(node, "indexing a width vector")


def mean_positions(lw, node, x: Width, dims, keepdim):
    """A mean over some position axes of ``x`` (``dims``: tensor axes of position roles)."""
    axes = x.axes
    roles = [axes[d % len(axes)] for d in dims]
    if not all(isinstance(r, int) for r in roles):
        raise lw.unsupported(node, "a mean over the batch or width axis together with positions")
    if x.layout is None and sorted(roles) == list(range(len(x.positions))):
        return global_pool(lw, node, x)       # a feature map's global pooling (readout next)
    per_axis = {r: np.full((1, x.positions[r]), 1.0 / x.positions[r]) for r in roles}
    return map_positions(lw, node, x, per_axis, f"mean over positions {sorted(roles)}",
                         {r: bool(keepdim) for r in roles})


def _transpose(lw, node, x, d0, d1):
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    axes = list(x.axes)
    if len(axes) != len(lw.shape(node)):
        raise lw.unsupported(node, "transposing a width vector")
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return _relayout(lw, node, x, tuple(axes))


def _relayout(lw, node, x, axes):
    if not x.positions:
        if axes != ("n", "w"):
            raise lw.unsupported(node, "transposing the batch and width axes of a width vector")
        return x
    return lw.width(node, x.vec, x.size, x.positions, layout=axes)


@rule("transpose", torch.transpose, "swapaxes", torch.swapaxes)
def _transpose_rule(lw, node, x, dim0, dim1):
    return _transpose(lw, node, x, dim0, dim1)


@rule("permute", torch.permute)
def _permute(lw, node, x, *dims):
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    axes = x.axes
    return _relayout(lw, node, x, tuple(axes[d] for d in dims))


# -- planning ----------------------------------------------------------------------

@register(COVARIANCE, GPosMap)
def _posmap_cov(pl, a, b, pair):
    if not (isinstance(a, GPosMap) and isinstance(b, GPosMap)):
        raise NotImplementedError("a vector indexed or averaged along positions combined with another kind of "
                                  "vector with positions")
    ma, mb = pl.static(a.map, "posmap"), pl.static(b.map, "posmap")
    if pair in SAME_INPUT:
        if a.map is b.map and a.map.select is not None:
            inner = yield from pl.cov(a.arg, b.arg, pair)
            return None if inner is None else pl.call(spatial.map_same, pl.tensor(inner), ma)
        inner = yield from pl.cov(a.arg, b.arg, "f" + pair[1])
        return None if inner is None else pl.call(spatial.map_diagonal, pl.tensor(inner), ma, mb)
    inner = yield from pl.cov(a.arg, b.arg, pair)
    return None if inner is None else pl.call(spatial.map_pair, pl.tensor(inner), ma, mb)


@register(MEAN, GPosMap)
def _posmap_mean(pl, a, side):
    m = yield from pl.mean(a.arg, side)
    return None if m is None else pl.call(spatial.map_mean, m, pl.static(a.map, "posmap"), pl.like)


@register(ADJOINT, GPosMap)
def _posmap_adjoint(pl, u, w):
    """``Cov(M_u^T dy, M_w^T dy') = M_u^T D(u, w) M_w``."""
    d = yield from pl.D(u, w)
    return None if d is None else pl.call(spatial.map_adjoint, pl.tensor(d), pl.static(u.map, "posmap"),
                                          pl.static(w.map, "posmap"))
