"""Position bands: the position-pair work of a pooled CNN in bounded memory.

A global-average-pooled CNN needs every pair of positions ``(s, t)`` of its feature
maps: arrays ``(*batch, *P, *P)``, ``|P|^2`` entries per pair of inputs (two 96x96
images: 85M entries per array).  Both of its kernels are *sums* over the first
position ``s`` of the readout's feature map (the global mean, and the NTK's
``spatial_sum`` terms, which the backward pass reaches from the readout's seeds at
``s``).  So they split over *bands* of rows of ``s`` (the first position axis):
a band's kernels are the same program run on arrays whose first position group holds
only the rows that band needs, ``(*batch, rows, *P[1:], *P)``, and the kernels are the
sum over bands (less the constant terms counted once per band).

Rows needed.  A convolution's output rows ``[lo, hi)`` read the input rows
``[lo*stride - pad, (hi-1)*stride + (k-1)*dil - pad]`` (its footprint); elementwise
steps and sums read the same rows.  ``regions`` propagates that from the readout's
band down the program, and keeps one box of rows per position *shape* (the hull of
every vector's need at that shape): all arrays of a shape then share their layout.
A vector computed on more rows than it needs has inexact rows at the box's edges
(its stencils read zeros beyond the box); those rows are never read where it
matters: every exact row's footprint lies in the box below it, and the backward
pass, seeded only on the band, reaches only the rows each vector needs, where both
forward values are exact (the other rows get a zero gradient times a finite value).

The runtime helpers of ``kernels.spatial`` read the current band's boxes
(``active()``, per thread, set by ``using``) and take this module's banded forms;
with no band they are unchanged.  ``check_plan`` refuses plans whose outputs are
not affine in position sums, or that use a step with no banded form (average
pooling's same-input all-pairs arrays, maps of positions, attention, Monte Carlo).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

_STATE = threading.local()


class NotBandable(Exception):
    """The plan has a step that banding does not cover (the message says which)."""


def active():
    """The current band's boxes ``{position shape: (lo, hi)}`` (rows of axis 0), or None."""
    return getattr(_STATE, "boxes", None)


@contextlib.contextmanager
def using(boxes):
    """Run the generated kernel on one band (in this thread)."""
    before = active()
    _STATE.boxes = boxes
    try:
        yield
    finally:
        _STATE.boxes = before


def _rows(boxes, shape):
    box = boxes.get(tuple(shape))
    if box is None:
        raise NotBandable(f"no band rows for positions {tuple(shape)}")
    return box


# --------------------------------------------------------------------------- #
# Banded runtime helpers (called by kernels.spatial when a band is active)
# --------------------------------------------------------------------------- #

def first_group(pa, shape, boxes):
    """Patches ``(N, C|K|, prod(P))`` at the band's rows of ``P`` only (side 1 of a Gram)."""
    lo, hi = _rows(boxes, shape)
    r = math.prod(shape[1:])
    return pa[..., lo * r:hi * r]


def positions(t, shape, boxes):
    """``(..., rows*rest, prod(P)) -> (..., rows, *P[1:], *P)``."""
    lo, hi = _rows(boxes, shape)
    return t.reshape(*t.shape[:-2], hi - lo, *shape[1:], *shape)


def first_rows(t, boxes):
    """A per-input array ``(N, *P)`` at the band's rows (lifted into the first group)."""
    if not torch.is_tensor(t) or t.ndim < 2:
        return t
    box = boxes.get(tuple(t.shape[1:]))
    return t if box is None else t[:, box[0]:box[1]]


def with_diagonal_packed(packed, same, diag, boxes):
    """``spatial.with_diagonal_packed`` on banded packed pairs ``(T, rows, *P[1:], *P)``."""
    shape = tuple(same.shape[1:])
    lo, hi = _rows(boxes, shape)
    r, pt = math.prod(shape[1:]), math.prod(shape)
    view = packed.reshape(packed.shape[0], (hi - lo) * r, pt)
    p = torch.arange(lo * r, hi * r, device=packed.device)
    view[diag[:, None], (p - lo * r)[None, :], p[None, :]] = same.reshape(-1, pt)[:, lo * r:hi * r]
    return view.reshape(packed.shape)


def _footprint(lo, hi, g):
    """Input rows (unclipped) that output rows ``[lo, hi)`` of axis 0 read: ``[start, end)``."""
    s, k, dl, pd = g.stride[0], g.kernel[0], g.dilation[0], g.padding[0]
    return lo * s - pd, (hi - 1) * s + (k - 1) * dl - pd + 1


def _pads(g, front, back):
    """``F.pad`` widths for ``(*batch, rows, *S[1:], *S)``: the second group and the first's
    other axes by the padding, the first group's rows by ``front``/``back`` (negative: crop)."""
    pads = []
    for p in reversed(g.padding):
        pads += [p, p]
    for p in reversed(g.padding[1:]):
        pads += [p, p]
    return pads + [front, back]


def _windows(g, o, rows):
    first = (slice(o[0], o[0] + g.stride[0] * (rows - 1) + 1, g.stride[0]),)
    rest = tuple(slice(a, a + s * (n - 1) + 1, s) for a, s, n in zip(o[1:], g.stride[1:], g.out_shape[1:]))
    return first + rest + g.window(o)


def stencil_pair(a, g, boxes):
    """``spatial.stencil_pair`` from the input's band rows to the output's."""
    nd = len(g.kernel)
    lo_i, hi_i = _rows(boxes, g.in_shape)
    lo_o, hi_o = _rows(boxes, g.out_shape)
    full = (hi_i - lo_i, *g.in_shape[1:], *g.in_shape)
    if a.ndim == 2:            # constant over positions
        a = a.reshape(*a.shape, *([1] * 2 * nd))
    a = torch.broadcast_to(a, (*a.shape[:a.ndim - 2 * nd], *full))
    start, end = _footprint(lo_o, hi_o, g)
    ap = F.pad(a, _pads(g, lo_i - start, end - hi_i))      # row 0 is input row `start`
    views = [ap[(Ellipsis,) + _windows(g, o, hi_o - lo_o)] for o in g.offsets()]
    total = views[0].clone(memory_format=torch.contiguous_format)
    for v in views[1:]:
        total.add_(v)
    return total.div_(g.size)


def stencil_pair_adjoint(d, g, batch_shape, boxes):
    """The adjoint of ``stencil_pair``: the output's band rows back to the input's."""
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    lo_i, hi_i = _rows(boxes, g.in_shape)
    lo_o, hi_o = _rows(boxes, g.out_shape)
    d = torch.broadcast_to(d, (*batch_shape, hi_o - lo_o, *g.out_shape[1:], *g.out_shape))
    start, end = _footprint(lo_o, hi_o, g)
    padded = tuple(s + 2 * p for s, p in zip(g.in_shape, g.padding))
    out = d.new_zeros((*batch_shape, end - start, *padded[1:], *padded))
    for o in g.offsets():
        out[(Ellipsis,) + _windows(g, o, hi_o - lo_o)] += d
    out = F.pad(out, [-p for p in _pads(g, 0, 0)[:-2]] + [start - lo_i, hi_i - end])
    return out.div_(g.size)


def global_mean(a, spatial, batch, boxes):
    """The band's part of ``spatial.global_mean``: the sum over the band's rows (of the box
    of rows its feature map is computed on) over the mean's count."""
    blo, bhi = _rows(boxes, spatial)
    lo, hi = boxes["readout"]
    count = math.prod(spatial) ** 2
    if not torch.is_tensor(a):
        return a * (hi - lo) * math.prod(spatial[1:]) * math.prod(spatial) / count
    k, nb = len(spatial), len(batch)
    full = torch.broadcast_to(a, (*batch, bhi - blo, *spatial[1:], *spatial))[(slice(None),) * nb + (slice(lo - blo, hi - blo),)]
    return full.sum(dim=tuple(range(nb, nb + 2 * k))) / count


def mean_seeds(c, spatial, like, boxes):
    """The backward seeds of a global-mean readout: ``c`` at the band's rows, 0 at the other
    rows of the box its feature map is computed on, ``(rows, *P[1:], *P)``."""
    blo, bhi = _rows(boxes, spatial)
    lo, hi = boxes["readout"]
    seeds = torch.zeros((bhi - blo, *spatial[1:], *spatial), dtype=like.dtype, device=like.device)
    seeds[lo - blo:hi - blo] = c
    return seeds


def spatial_sum(t, batch, spatial, boxes):
    """The band's part of ``spatial.spatial_sum`` over pairs of positions ``(*P, *P)``."""
    h = len(spatial) // 2
    if 2 * h != len(spatial) or tuple(spatial[:h]) != tuple(spatial[h:]):
        raise NotBandable(f"a sum over positions {spatial} that are not pairs of one feature map")
    lo, hi = _rows(boxes, spatial[:h])
    shape = (*batch, hi - lo, *spatial[1:])
    return torch.broadcast_to(t, shape).sum(dim=tuple(range(len(batch), len(shape))))


# --------------------------------------------------------------------------- #
# Planning: the rows each band needs, and whether a plan can be banded
# --------------------------------------------------------------------------- #

def regions(program, lo, hi):
    """``{position shape: (lo, hi)}``: the rows of every feature map that the readout's rows
    ``[lo, hi)`` need (the hull over the vectors of each shape); see the module."""
    from ..ir import nodes as irn
    from ..ir.walk import postorder

    def conv(n):          # a convolution (ops/conv.py's GConv): a matmul with a window geometry
        return isinstance(n, irn.GMatMul) and getattr(n.param, "geometry", None) is not None

    r = program.readout
    if r.pool != "gap":
        raise NotBandable("the readout does not read a global mean of a feature map directly (layers after "
                          "the pooling, or no pooling): bands need the kernel to be a sum over positions"
                          if r.pool is None else f"a readout of kind {r.pool!r}: bands need a global mean")
    pos = program.positions

    def kids(n):
        if isinstance(n, irn.Vec):
            return [v for _, v in n.pieces]
        if isinstance(n, irn.Var):
            return [a for _, a in n.terms]
        if isinstance(n, irn.HAtom):
            return list(n.gargs)
        if conv(n):
            return [n.arg]
        if isinstance(n, (irn.GBias, irn.GInput)) or not pos(n):
            return []
        what = n.describe(lambda _: "...").split("#")[0].strip()
        name = program.names.get(n)
        raise NotBandable(f"{what}{f' ({name})' if name else ''} mixes positions; bands cover convolutions, "
                          "elementwise steps and sums of feature maps")

    need = {id(r.vec): (lo, hi)}
    boxes: dict = {"readout": (lo, hi)}
    for node in reversed(postorder([r.vec], kids)):
        box = need.get(id(node))
        if box is None:
            continue
        shape = tuple(pos(node))
        have = boxes.get(shape)
        boxes[shape] = box if have is None else (min(have[0], box[0]), max(have[1], box[1]))
        for child in kids(node):
            cshape = tuple(pos(child))
            if not cshape:
                continue
            if conv(node):
                g = node.param.geometry
                start, end = _footprint(*box, g)
                cbox = (max(0, start), min(g.in_shape[0], end))
            elif cshape == shape:
                cbox = box
            else:
                raise NotBandable(f"a {type(node).__name__} of positions {shape} reading positions {cshape}")
            had = need.get(id(child))
            need[id(child)] = cbox if had is None else (min(had[0], cbox[0]), max(had[1], cbox[1]))
    return boxes


_SUMS = ("global_mean", "spatial_sum")


def _allowed(fn) -> bool:
    """Runtime helpers with a banded form, or elementwise on the arrays they are given."""
    from . import spatial
    if getattr(fn, "__module__", None) == spatial.__name__:
        return fn.__name__ in ("patches", "positions", "first_group", "stencil_pair", "stencil_same",
                               "stencil_pair_adjoint", "unit_positions", "position_mean", "mean_seeds") + _SUMS
    module = getattr(fn, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] in ("expect", "nonlinear", "piecewise", "piecewise_expr", "quadrature")


def constant_parts(plan, names=("nngp", "ntk")) -> dict:
    """Each output's constant term (what it is with every position sum 0), after checking
    that the plan can be banded: every step has a banded form, and each output is an
    affine function (sums and constant multiples) of position sums."""
    from .. import plan as P
    from . import spatial

    outputs = [plan.outputs.get(n) for n in names]
    for n in P.reachable(outputs):
        if isinstance(n, (P.LiftAll, P.Loop, P.LoopVar, P.LoopOut)):
            raise NotBandable(f"a {type(n).__name__} step (average pooling, or a loop)")
        if isinstance(n, P.Env) and n.name in ("mc", "dbatch"):
            raise NotBandable("Monte Carlo or N-D expectations" if n.name == "mc" else "a readout at every position")
        if isinstance(n, P.Call) and not _allowed(n.fn):
            raise NotBandable(f"the step {getattr(n.fn, '__name__', n.fn)!r}")
        if isinstance(n, P.Contract) and len(n.equation.split("->")[1]) >= 4:
            first = n.operands[0]
            if not (isinstance(first, P.Call) and first.fn is spatial.first_group):
                raise NotBandable(f"a contraction {n.equation!r} over pairs of positions")

    def const(v):
        if v is None:
            return 0.0
        if isinstance(v, float):
            return v
        if isinstance(v, P.Add):
            return sum(const(t) for t in v.terms)
        if isinstance(v, P.Mul):
            nodes = [f for f in v.factors if not isinstance(f, float)]
            if len(nodes) != 1:
                raise NotBandable("a product of position sums")
            return math.prod(f for f in v.factors if isinstance(f, float)) * const(nodes[0])
        if isinstance(v, P.Call) and v.fn.__name__ in _SUMS and getattr(v.fn, "__module__", "") == spatial.__name__:
            return 0.0
        raise NotBandable("an output that is not a sum over positions (a step after the pooling)")

    return {name: const(v) for name, v in zip(names, outputs)}


class Split:
    """A kernel's pair work split into bands of rows of the readout's positions: ``boxes``
    (one dict per band, for ``using``), ``entries`` (the most pair-array entries per pair of
    inputs of any band), ``constants`` (each output's constant term, counted once)."""

    def __init__(self, boxes, entries, constants):
        self.boxes, self.entries, self.constants = boxes, entries, constants

    @staticmethod
    def plan(kfn, bytes_per_entry, budget) -> "Split":
        """The fewest bands whose pair work per pair of inputs fits ``budget`` bytes;
        ``NotBandable`` if the kernel cannot be banded or one row per band does not fit."""
        if kfn.jit:
            raise NotBandable("jit=True (banding is eager only)")
        program = kfn._program
        regions(program, 0, 1)            # the model's reason first, if any
        constants = constant_parts(kfn._plan)
        rows = program.readout.positions[0]

        def bands_of(h):
            boxes = [regions(program, lo, min(rows, lo + h)) for lo in range(0, rows, h)]
            entries = max((hi - lo) * math.prod(shape[1:]) * math.prod(shape)
                          for b in boxes for shape, (lo, hi) in b.items() if shape != "readout")
            return boxes, entries

        lo, hi = 1, rows          # the largest band height that fits: bisect (fitting is monotone)
        best = bands_of(1)
        if best[1] * bytes_per_entry > budget:
            raise NotBandable(f"even one row per band needs {best[1] * bytes_per_entry / 2**30:.3g} GiB per pair")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = bands_of(mid)
            if trial[1] * bytes_per_entry <= budget:
                lo, best = mid, trial
            else:
                hi = mid - 1
        return Split(best[0], best[1], constants)

    def run(self, evaluate, report=None):
        """The sum over bands of ``evaluate()`` (a tile's ``(blocks, stderr, errors)``), with
        each output's constant term counted once; ``report(fraction)`` after each band."""
        total, errors = {}, []
        for b, boxes in enumerate(self.boxes):
            with using(boxes):
                blocks, _, errs = evaluate()
            if report is not None:
                report((b + 1) / len(self.boxes))
            errors += errs
            for name, block in blocks.items():
                if block is not None:
                    total[name] = block if name not in total else total[name].add_(block)
        extra = len(self.boxes) - 1
        for name in total:
            total[name].sub_(extra * self.constants[name])
        return total, {}, errors
