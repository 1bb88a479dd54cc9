"""Stacking and concatenating width vectors along positions; nonlinearities of stacks.

``torch.cat`` along a position axis is ``sum_k M_k x_k`` with ``M_k`` the placement of
part ``k`` (a fixed linear map of positions whose rows outside part ``k`` are 0,
``ops/positions.py``), and ``torch.stack`` is that after an ``unsqueeze``: a stacked
sequence's covariance at positions ``(s, t)`` is ``E[x_s x'_t]`` of the vectors placed
there, every pair included (the parts are different vectors, not independent ones).

A nonlinearity of a stack of H-vars goes inside the placements, which fill every
position once: ``phi(sum_k M_k h_k + r) = sum_k M_k phi(h_k + R_k r)`` (``R_k`` reads
``r`` at part ``k``'s positions), so ``tanh(torch.stack(hs, 1) + b)`` is a stack of
H-vars again.  And a sum of maps of H-vars with H-atoms writes each H-atom as the
identity map of its positions (the planner pairs maps with maps).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..errors import WidthInferenceError
from ..ir import HAtom, PositionMap
from .blocks import slice_width
from .positions import GPosMap, index_width, map_positions, map_vec, reshape_unit_axes


def align_maps(lw, vec):
    """A sum of maps of H-vars (position maps of non-Gaussian vectors) and H-atoms, with each
    H-atom ``h`` written as the identity map ``I h`` of its positions: the planner pairs a
    map only with a map (or a Gaussian), so ``seq.mean(1) + h`` is a sum of maps."""
    b, pieces, changed = lw.b, [], False
    for frac, var in vec.pieces:
        if any(isinstance(a, GPosMap) and not a.gaussian for _, a in var.terms):
            terms = []
            for c, a in var.terms:
                if isinstance(a, HAtom) and a.gargs:
                    pos = lw.positions(a)
                    same = PositionMap.make(pos, pos, np.eye(math.prod(pos)), "identity")
                    a, changed = b.make(GPosMap, same, b.single(b.atom_var(a))), True
                terms.append((c, a))
            var = b.var(terms)
        pieces.append((frac, var))
    return b.vec(pieces) if changed else vec


def through_placements(lw, vec, fn):
    """``fn(vec)`` for an elementwise ``fn`` (Vec -> Vec) of a sum of placements (a stack, a
    concatenation along positions) of H-vars, pushed inside them:
    ``phi(sum_i P_i h_i + r) = sum_i P_i phi(h_i + R_i r)``, ``R_i`` reading ``r`` at the
    positions part ``i`` fills; None unless the placements fill every position once."""
    if len(vec.pieces) != 1:
        return None
    b, var = lw.b, vec.pieces[0][1]
    parts = [(c, a) for c, a in var.terms if isinstance(a, GPosMap) and not a.gaussian and a.map.place is not None]
    if not parts:
        return None
    out = parts[0][1].map.out_shape
    cover = np.zeros(math.prod(out), dtype=int)
    for _, a in parts:
        place = np.array(a.map.place)
        read = place[place >= 0]
        if a.map.out_shape != out or len(set(read.tolist())) != len(read) or len(read) != math.prod(a.map.in_shape):
            return None
        cover += place >= 0
    if not (cover == 1).all():
        return None
    rest = b.single(b.var([(c, a) for c, a in var.terms if all(a is not p for _, p in parts)]))
    terms = []
    for c, a in parts:
        back = np.zeros((math.prod(a.map.in_shape), len(cover)))
        for s, i in enumerate(a.map.place):
            if i >= 0:
                back[i, s] = 1.0
        r = map_vec(lw, PositionMap.make(out, a.map.in_shape, back, f"part of {a.map.label}"), rest)
        y = fn(b.lincomb([(c, a.arg), (b.sconst(1.0), r)]))
        terms.append((b.sconst(1.0), map_vec(lw, a.map, y)))
    return b.lincomb(terms)


def cat_positions(lw, node, xs, dim):
    """``torch.cat(xs, dim)`` of width vectors along a position axis: ``sum_k M_k x_k``."""
    ref = xs[0]
    axes = ref.axes
    role = axes[dim]
    for x in xs:
        other = tuple(n for k, n in enumerate(x.positions) if k != role)
        if x.axes != axes or x.size != ref.size or other != tuple(
                n for k, n in enumerate(ref.positions) if k != role):
            raise lw.error(node, "concatenating width vectors whose other axes differ (sizes "
                           f"{[x.size for x in xs]}, positions {[x.positions for x in xs]})", WidthInferenceError)
    total = sum(x.positions[role] for x in xs)
    parts, offset = [], 0
    for x in xs:
        n = x.positions[role]
        place = np.zeros((total, n))
        place[offset:offset + n] = np.eye(n)
        part = map_positions(lw, node, x, {role: place}, f"placed at [{offset}:{offset + n}] of axis {role}", {})
        parts.append((lw.b.sconst(1.0), part.vec))
        offset += n
    return lw.width(node, lw.b.lincomb(parts), ref.size, part.positions, layout=part.layout)


def stack_widths(lw, node, xs, dim, before=None):
    """``torch.stack(xs, dim)`` of width vectors (each of tensor shape ``before``): each gets a
    new position axis, then they are concatenated along it (every pair of stacked vectors
    covaries)."""
    if before is None:
        before = tuple(lw.shape(node.args[0][0]))
    d = dim % (len(before) + 1)
    after = before[:d] + (1,) + before[d:]
    parts = [reshape_unit_axes(lw, node, x, before, after) for x in xs]
    if any(p is None for p in parts):
        raise lw.unsupported(node, "stacking width vectors of different layouts")
    return cat_positions(lw, node, parts, d)


def split_width(lw, node, x, before, after):
    """A view that splits the width axis into ``(k, m)``: ``k`` blocks of the width stacked
    along a new position axis (core ATen writes ``torch.stack(hs, 1)`` as ``cat`` then ``view``);
    None if the view does something else."""
    w = x.axes.index("w")
    if not (len(after) == len(before) + 1 and after[:w] == before[:w] and after[w + 2:] == before[w + 1:]
            and after[w] > 1 and after[w] * after[w + 1] == before[w]):
        return None
    k, m = after[w], after[w + 1]
    parts = [slice_width(lw, node, x, j * m, (j + 1) * m) for j in range(k)]
    return stack_widths(lw, node, parts, w, before[:w] + (m,) + before[w + 1:])


def merge_positions(lw, node, x, before, after):
    """A view that merges the position axes just before the width axis into it (a sequence
    ``(N, T, n)`` flattened to ``(N, T n)``): the positions concatenated along the width;
    None if the view does something else."""
    axes = x.axes
    w = axes.index("w")
    r = w
    while r > 0 and isinstance(axes[r - 1], int):
        r -= 1
        if before[:r] + (math.prod(before[r:w + 1]),) + before[w + 1:] == tuple(after):
            break
    else:
        return None
    pieces = []
    for combo in itertools.product(*[range(n) for n in before[r:w]]):
        idx = tuple(combo[d - r] if r <= d < w else slice(None) for d in range(len(axes)))
        part = index_width(lw, node, x, idx)
        pieces += part.vec.pieces
    count = math.prod(before[r:w])
    vec = lw.b.vec([(frac / count, var) for frac, var in pieces])
    return lw.width(node, vec, x.size * count, part.positions, layout=part.layout)
