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

The same atom adds and removes position axes of size 1 (``unsqueeze``, ``squeeze``,
``x[:, None]``: ``M`` the identity between shapes), and places vectors into a longer
axis: ``torch.cat`` along a position axis is ``sum_k M_k x_k`` with ``M_k`` the
placement of part ``k`` (rows of zeros elsewhere), and ``torch.stack`` is that after an
``unsqueeze``: a stacked sequence's covariance at positions ``(s, t)`` is
``E[x_s x'_t]`` of the vectors placed there, all pairs included (the parts are
different vectors, not independent ones).  A placement reads one input position per
output position (``PositionMap.place``), so its same-input variances need only the
parts' own variances.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

from ..errors import WidthInferenceError
from ..ir import ANY, HAtom, PositionMap, node
from ..ir.builder import holds_probe
from ..ir.nodes import OfArg
from ..kernels import spatial
from ..kernels.planner import ADJOINT, COVARIANCE, MEAN, SAME_INPUT, SIDES, register
from ..passes.lower import UNPOOL, Width, rule
from ..plan import Input
from .blocks import block_rule, map_arg_block, slice_width
from .pool import GPool, global_pool


class MapOfPositions(OfArg):
    """Base of atoms that are a linear map of the positions of the vector ``arg`` (a fixed
    one here, attention's per-input weights in ``ops/attention.py``): Gaussian when ``arg``
    is, in the covariance group of ``arg``'s atoms; the backward reads ``arg`` off through it."""
    __slots__ = ()

    @property
    def gaussian(self):      # of a normalization's probe: not for nonlinearities (ir.builder.holds_probe)
        return all(v.gaussian for _, v in self.arg.pieces) and not holds_probe(self)

    def independent_of(self, other) -> bool:
        """True if the atom ``other`` (not such a map) is independent of every atom of ``arg``
        by construction (parameters of other covariance groups)."""
        group = other.cov_group
        return group is not ANY and all(t.cov_group is not ANY and t.cov_group is not group
                                        for _, v in self.arg.pieces for _, t in v.terms)


@node
class GPosMap(MapOfPositions):
    """``M x``: the fixed map ``map`` (an ``ir.PositionMap``) of the positions of ``arg``."""
    map: object
    arg: object
    uid: int = -1
    homogeneous = True
    covaries_with_others = True     # its COVARIANCE rule pairs it with any atom (h - h.mean(0))

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
        if tuple(pos) not in (self.map.in_shape, ()):     # (): constant over the positions it is read at
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
    layout = tuple(renumber[r] if isinstance(r, int) else r for r in x.axes
                   if not isinstance(r, int) or r in renumber)
    if not out_shape and layout != ("n", "w"):
        raise lw.unsupported(node, f"a width vector whose batch axis is not first (layout {layout})")
    return lw.width(node, map_vec(lw, pmap, x.vec), x.size, tuple(out_shape), layout=layout if out_shape else None)


def map_vec(lw, pmap, vec):
    """The Vec ``M vec``, piece by piece, with maps composed (``M (N x) = (MN) x``), so that no
    map's argument holds another map: the planner pairs the arguments of two maps, which
    must be alike.  ``M`` of the other terms is one atom; terms constant over positions (a
    bias) stay with them, read at the positions their parameter is shared by (so the
    parameter's NTK term still sums over those)."""
    b = lw.b
    identity = pmap.in_shape == pmap.out_shape and bool((pmap.matrix == np.eye(len(pmap.matrix))).all())
    pieces = []
    for frac, var in vec.pieces:
        terms, rest = [], []
        for c, a in var.terms:
            if isinstance(a, GPosMap):
                inner = a.map
                composed = PositionMap.make(inner.in_shape, pmap.out_shape, pmap.matrix @ inner.matrix,
                                            f"{pmap.label} of {inner.label}")
                terms += _mapped(b, composed, a.arg, c)
            else:
                rest.append((c, a))
        if rest and identity:
            terms += rest
        elif rest and pmap.select is not None:
            terms += _selected(lw, pmap, rest)
        elif rest:
            terms += _mapped(b, pmap, b.single(b.var(rest)), b.sconst(1.0))
        pieces.append((frac, b.var(terms)))
    return b.vec(pieces)


def _selected(lw, pmap, terms):
    """The terms of ``M x`` for a selection ``M`` (each output reads one input position), which
    commutes with nonlinearities: ``M phi(g) = phi(M g)``, an H-atom of selected G-vars."""
    b = lw.b
    if any(getattr(a, "is_zero", False) for _, a in terms):
        # a normalization's probe (its gain and shift, read off at every position): the map
        # stays outside, where the backward reads the probe off at the positions it keeps
        # (pushing the selection into the normalized H-atoms beside it gave a wrong NTK)
        return _mapped(b, pmap, b.single(b.var(terms)), b.sconst(1.0))
    gauss = [(c, a) for c, a in terms if a.gaussian]
    out = _mapped(b, pmap, b.single(b.var(gauss)), b.sconst(1.0)) if gauss else []
    for c, a in terms:
        if a.gaussian:
            continue
        # a coefficient with positions (a per-token LayerNorm's statistics) is selected with
        # the atom it multiplies
        def select(s):
            return b.sselect(pmap, s) if lw.positions(s) else s
        c = select(c)
        if isinstance(a, HAtom) and not a.gargs:          # the constant 1
            out.append((c, a))
        elif isinstance(a, HAtom):
            slots = [map_vec(lw, pmap, b.single(g)).pieces[0][1] for g in a.gargs]
            var = b.compose(lambda es, a=a: b.substitute(a.expr, dict(enumerate(es)), select), slots)
            out += [(b.smul(c, c2), a2) for c2, a2 in var.terms]
        else:
            out += _mapped(b, pmap, b.single(b.atom_var(a)), c)
    return out


def _mapped(b, pmap, arg, coef):
    """The terms of ``coef * M arg`` (``arg`` itself when ``M`` is the identity, none when it is 0)."""
    if not pmap.matrix.any():
        return []
    if pmap.in_shape == pmap.out_shape and len(arg.pieces) == 1 and bool(
            (pmap.matrix == np.eye(len(pmap.matrix))).all()):
        return [(b.smul(coef, c), a) for c, a in arg.pieces[0][1].terms]
    return [(coef, b.make(GPosMap, pmap, arg))]


def _expand_index(idx, ndim):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1:
        raise NotImplementedError("an index with two ellipses")
    real = sum(i is not None and i is not Ellipsis for i in idx)
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        return idx[:at] + (slice(None),) * (ndim - real) + idx[at + 1:]
    return idx + (slice(None),) * (ndim - real)


def index_width(lw, node, x: Width, idx):
    """``x[idx]`` of a width vector: ints and slices along position axes, a slice of the
    width axis (a block: ``ops/blocks.py``), ``None`` (a new position axis of size 1)."""
    axes = x.axes
    try:
        idx = _expand_index(idx, len(axes))
    except NotImplementedError as e:
        raise lw.unsupported(node, str(e)) from e
    if any(i is None for i in idx):
        return _index_with_new_axes(lw, node, x, idx)
    if len(idx) != len(axes):
        raise lw.error(node, f"too many indices for a width vector with {len(axes)} axes", WidthInferenceError)
    per_axis, keep, parts, block = {}, {}, [], None
    for role, i in zip(axes, idx):
        full = isinstance(i, slice) and i == slice(None)
        if role == "n" and not full:
            raise lw.unsupported(node, "indexing the batch axis of a width vector (inputs are independent "
                                 "rows: index the input batch instead)")
        if role == "w" and not full:
            if not isinstance(i, slice) or i.indices(x.size)[2] != 1:
                raise lw.unsupported(node, f"indexing the width axis of a width vector with {i!r} (only a "
                                     "contiguous slice, a block of the width, has an infinite-width limit)")
            block = i.indices(x.size)[:2]
            continue
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
    if per_axis:
        x = map_positions(lw, node, x, per_axis, "positions" + "".join(parts), keep)
    if block is not None:
        x = slice_width(lw, node, x, *block)
    return x


def _index_with_new_axes(lw, node, x, idx):
    """``x[..., None, ...]``: the index without the Nones, then the new size-1 axes."""
    y = index_width(lw, node, x, tuple(i for i in idx if i is not None))
    shape = list(lw.shape(node))
    before = [n for n, i in zip(shape, [i for i in idx if not isinstance(i, int)]) if i is not None]
    return reshape_unit_axes(lw, node, y, tuple(before), tuple(shape))


@rule(operator.getitem)
def _getitem(lw, node, x, idx):
    if isinstance(x, (tuple, list, torch.Size)):
        return x[idx]
    if isinstance(x, Width) and not x.pool:
        return index_width(lw, node, x, idx)
    raise lw.unsupported(node, "indexing a width vector")


# -- axes of size 1, concatenation and stacking along positions ---------------------

def _unit_roles(axes, before, after):
    """The roles of ``after``'s axes when it is ``before`` with axes of size 1 inserted
    (None) or removed (position axes only), or None if the reshape does more."""
    roles, i = [], 0
    for a in after:
        while i < len(before) and before[i] != a and before[i] == 1 and isinstance(axes[i], int):
            i += 1
        if i < len(before) and before[i] == a:
            roles.append(axes[i])
            i += 1
        elif a == 1:
            roles.append(None)
        else:
            return None
    if any(not (before[j] == 1 and isinstance(axes[j], int)) for j in range(i, len(before))):
        return None
    return roles


def reshape_unit_axes(lw, node, x: Width, before, after):
    """``x`` reshaped from ``before`` to ``after`` by inserting or removing axes of size 1
    (``unsqueeze``, ``squeeze``, a ``view``), or None if the reshape does more."""
    if len(x.axes) != len(before):
        return None
    roles = _unit_roles(x.axes, tuple(before), tuple(after))
    if roles is None or roles.count("n") != 1 or roles.count("w") != 1:
        return None
    kept = sorted(r for r in roles if isinstance(r, int))
    renumber = {k: j for j, k in enumerate(kept)}
    new = iter(range(len(kept), len(roles)))
    layout = tuple(renumber[r] if isinstance(r, int) else next(new) if r is None else r for r in roles)
    positions = tuple(x.positions[k] for k in kept) + (1,) * roles.count(None)
    if positions == x.positions:
        return _relayout(lw, node, x, layout)
    if not positions and layout != ("n", "w"):
        raise lw.unsupported(node, f"a width vector whose batch axis is not first (layout {layout})")
    pmap = PositionMap.make(x.positions, positions, np.eye(math.prod(positions)), f"reshape to {positions}")
    return lw.width(node, map_vec(lw, pmap, x.vec), x.size, positions, layout=layout if positions else None)


def _unpool_gap(lw, node, x: Width) -> Width:
    """A feature map's global average pooling used by an op other than the readout (an
    MLP head: ``fc(relu(fc(x.mean((2, 3)))))``): the mean over all positions as a map, a
    vector without positions."""
    fmap = Width(x.vec, x.size, x.pooled)
    per_axis = {k: np.full((1, n), 1.0 / n) for k, n in enumerate(x.pooled)}
    return map_positions(lw, node, fmap, per_axis, "mean over all positions", {k: False for k in per_axis})


UNPOOL["gap"] = _unpool_gap


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


block_rule(GPosMap, GPool)(map_arg_block)      # acting on positions, they commute with width blocks


# -- planning ----------------------------------------------------------------------

def _placed_alike(a, b):
    """For two placements (``PositionMap.place``) of vectors with the same positions: None if
    no output position reads both (their product is 0 on the same input), True if every
    position that reads both reads the same input position, else False."""
    pa, pb = a.map.place, b.map.place
    if pa is None or pb is None or a.map.in_shape != b.map.in_shape:
        return False
    common = [s for s, (i, j) in enumerate(zip(pa, pb)) if i >= 0 and j >= 0]
    if not common:
        return None
    return all(pa[s] == pb[s] for s in common)


_CONSTANT = PositionMap.make((), (), np.ones((1, 1)), "constant over positions")


@register(COVARIANCE, GPosMap)
def _posmap_cov(pl, a, b, pair):
    if not (isinstance(a, GPosMap) and isinstance(b, GPosMap)):
        return (yield from _posmap_other_cov(pl, a, b, pair))
    ra, rb = len(a.map.in_shape), len(b.map.in_shape)
    if ra and rb and ra != rb:
        raise NotImplementedError("a stack or concatenation of vectors with different numbers of position axes")
    ma, mb = pl.static(a.map, "posmap"), pl.static(b.map, "posmap")
    if pair in SAME_INPUT:
        ref = side_inputs(pl, pair)
        if a.map is b.map and a.map.select is not None:
            inner = yield from pl.cov(a.arg, b.arg, pair)
            if inner is None or isinstance(inner, float):
                return inner                      # a constant, selected
            return pl.call(spatial.map_same, inner, ma)
        alike = _placed_alike(a, b)
        if alike is None:
            return None
        if alike:
            inner = yield from pl.cov(a.arg, b.arg, pair)
            return None if inner is None else pl.call(spatial.map_place_same, pl.tensor(inner), ma, mb, ref)
        inner = yield from pl.cov(a.arg, b.arg, "f" + pair[1])
        return None if inner is None else pl.call(spatial.map_diagonal, pl.tensor(inner), ma, mb, ref)
    inner = yield from pl.cov(a.arg, b.arg, pair)
    return None if inner is None else pl.call(spatial.map_pair, pl.tensor(inner), ma, mb)


def _posmap_other_cov(pl, a, b, pair):
    """``E[(M x)_s y'_t]`` for ``y`` not a map (a bias added to a stack, an H-atom beside a
    pooled sequence): ``y`` is the identity map of its positions (constant: none)."""
    mapped, other = (a, b) if isinstance(a, GPosMap) else (b, a)
    if mapped.independent_of(other):
        return None                                   # independent parameters
    pos = tuple(pl.p.positions(other))
    if pos and len(mapped.map.in_shape) not in (0, len(pos)):
        raise NotImplementedError("a vector indexed, stacked or averaged along positions combined with a "
                                  "vector of another number of position axes")
    same = PositionMap.make(pos, pos, np.eye(math.prod(pos)), "identity") if pos else _CONSTANT
    m, ident = pl.static(mapped.map, "posmap"), pl.static(same, "posmap")
    maps = (m, ident) if mapped is a else (ident, m)
    x, y = mapped.arg, pl.b.single(pl.b.atom_var(other))
    ref = side_inputs(pl, pair) if pair in SAME_INPUT else None
    if pair in SAME_INPUT and not pos:
        inner = yield from (pl.cov(x, y, pair) if mapped is a else pl.cov(y, x, pair))
        return None if inner is None else pl.call(spatial.map_mean, inner, m, ref)
    inner_pair = "f" + pair[1] if pair in SAME_INPUT else pair
    inner = yield from (pl.cov(x, y, inner_pair) if mapped is a else pl.cov(y, x, inner_pair))
    if inner is None:
        return None
    if pair in SAME_INPUT:
        return pl.call(spatial.map_diagonal, pl.tensor(inner), *maps, ref)
    return pl.call(spatial.map_pair, pl.tensor(inner), *maps)


@register(MEAN, GPosMap)
def _posmap_mean(pl, a, side):
    m = yield from pl.mean(a.arg, side)
    return None if m is None else pl.call(spatial.map_mean, m, pl.static(a.map, "posmap"), side_inputs(pl, f"d{side}"))


def side_inputs(pl, pair):
    """An array of the inputs of a same-input pair's side (a constant's batch axis comes from it)."""
    return pl.plan.make(Input, abs(SIDES[pair][0]), 0)


@register(ADJOINT, GPosMap)
def _posmap_adjoint(pl, u, w):
    """``Cov(M_u^T dy, M_w^T dy') = M_u^T D(u, w) M_w``."""
    d = yield from pl.D(u, w)
    return None if d is None else pl.call(spatial.map_adjoint, pl.tensor(d), pl.static(u.map, "posmap"),
                                          pl.static(w.map, "posmap"))
