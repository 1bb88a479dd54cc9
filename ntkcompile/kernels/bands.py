"""Position bands: the position-pair work of a pooled CNN in bounded memory.

A global-average-pooled CNN needs every pair of positions ``(s, t)`` of its feature
maps: arrays ``(*batch, *P, *P)``, ``|P|^2`` entries per pair of inputs (two 96x96
images: 85M entries per array).  Both of its kernels are *sums* over the readout's
positions ``s`` (the first input's) and ``t`` (the second's): the global mean, and the
NTK's ``spatial_sum`` terms, which the backward pass reaches from the readout's seeds at
``(s, t)``.  So they split over *bands*: a band is a range of rows (the first position
axis) of ``s`` and one of ``t``; its share is the same generated kernel run on arrays
whose position groups hold only the rows that band needs, ``(*batch, rows1, *P[1:],
rows2, *P[1:])``, and the kernels are the sum over bands (less the constant terms, which
every band counts).  Bands are square (as many rows of ``s`` as of ``t``), so their memory
is bounded at any number of rows; their height is the one that costs least (``Split.plan``).

Rows needed.  A convolution's output rows ``[lo, hi)`` read the input rows
``[lo*stride - pad, (hi-1)*stride + (k-1)*dil - pad]`` (its footprint); elementwise
steps and sums read the same rows.  ``regions`` propagates that from the readout's
rows down the program, and keeps one box of rows per position *shape* (the hull of
every vector's need at that shape): all arrays of a shape then share their layout.
A vector computed on more rows than it needs has inexact rows at the box's edges
(its stencils read zeros beyond the box); those rows are never read where it
matters: every exact row's footprint lies in the box below it, and the backward
pass, seeded only on the band's rows (``mean_seeds``), reaches only the rows each
vector needs, where the forward values are exact (the other rows get a zero gradient
times a finite value).

The runtime helpers of ``kernels.spatial`` read the current band (``active()``, per
thread, set by ``using``) and take this module's banded forms; with no band they are
unchanged.  ``constant_parts`` refuses plans whose outputs are not affine in position
sums or that use a step with no banded form (maps of positions, attention, Monte Carlo),
and ``regions`` models with a vector that mixes positions otherwise than by a window map
(an op's ``window_geometry``: convolutions, average poolings).

Average pooling needs the variances of the pooled vector, from arrays of one input with
itself over all pairs of positions (``"f1"``/``"f2"``).  Banded, those arrays hold both
position groups at the rows of their side's band (``frame``), so the pooled variances are
exact at that side's rows only (``pool_same``: 0 elsewhere, which nothing exact reads); a
kernel against itself, whose two sides would share them, then runs as a cross kernel.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

from . import spatial      # (spatial imports this module too: only its attributes are read, at call time)

_STATE = threading.local()


class NotBandable(Exception):
    """The plan has a step that banding does not cover (the message says which)."""


def active():
    """The current band (a pair of ``{position shape: (lo, hi)}``, rows of axis 0 of each
    position group), or None."""
    return getattr(_STATE, "boxes", None)


@contextlib.contextmanager
def using(band):
    """Run the generated kernel on one band (in this thread)."""
    before = active()
    _STATE.boxes = band
    try:
        yield
    finally:
        _STATE.boxes = before


def _rows(band, group, shape):
    """The rows ``(lo, hi)`` of ``shape``'s feature maps that position group ``group`` (0: the
    first input's positions, 1: the second's) holds in ``band``."""
    box = band[group].get(tuple(shape))
    if box is None:
        raise NotBandable(f"no band rows for positions {tuple(shape)}")
    return box


# --------------------------------------------------------------------------- #
# Banded runtime helpers (called by kernels.spatial when a band is active).  A band is a
# pair of dicts, one per position group: {shape: (lo, hi), "readout": (lo, hi)}; pair
# arrays are (*batch, rows1, *P[1:], rows2, *P[1:]).
# --------------------------------------------------------------------------- #

def frame(band, side):
    """The band of arrays of one input with itself (``side`` 1 or 2; average pooling's
    same-input variances): both groups at that side's rows; ``side`` 0: the band itself."""
    return band if not side else (band[side - 1], band[side - 1])


def group_patches(pa, shape, group, band):
    """Patches ``(N, C|K|, prod(P))`` at the band's rows of ``P`` in ``group`` (one side of a Gram)."""
    lo, hi = _rows(band, group, shape)
    r = math.prod(shape[1:])
    return pa[..., lo * r:hi * r]


def positions(t, shape, band):
    """``(..., rows1*rest, rows2*rest) -> (..., rows1, *P[1:], rows2, *P[1:])``."""
    (l1, h1), (l2, h2) = _rows(band, 0, shape), _rows(band, 1, shape)
    return t.reshape(*t.shape[:-2], h1 - l1, *shape[1:], h2 - l2, *shape[1:])


def rows_of(t, group, side=0):
    """A per-input array ``(N, *P)`` at the current band's rows of ``group`` (lifted into that
    group; ``side``: see ``frame``), or as it is when no band is active."""
    band = active()
    if band is None or not torch.is_tensor(t) or t.ndim < 2:
        return t
    box = frame(band, side)[group].get(tuple(t.shape[1:]))
    return t if box is None else t[:, box[0]:box[1]]


def with_diagonal_packed(packed, same, diag, band):
    """``spatial.with_diagonal_packed`` on banded packed pairs: the same positions of both
    groups' rows."""
    shape = tuple(same.shape[1:])
    (l1, h1), (l2, h2) = _rows(band, 0, shape), _rows(band, 1, shape)
    lo, hi = max(l1, l2), min(h1, h2)
    if lo >= hi:
        return packed
    r, pt = math.prod(shape[1:]), math.prod(shape)
    view = packed.reshape(packed.shape[0], (h1 - l1) * r, (h2 - l2) * r)
    p = torch.arange(lo * r, hi * r, device=packed.device)
    view[diag[:, None], (p - l1 * r)[None, :], (p - l2 * r)[None, :]] = same.reshape(-1, pt)[:, lo * r:hi * r]
    return view.reshape(packed.shape)


def _footprint(lo, hi, g):
    """Input rows (unclipped) that output rows ``[lo, hi)`` of axis 0 read: ``[start, end)``."""
    s, k, dl, pd = g.stride[0], g.kernel[0], g.dilation[0], g.padding[0]
    return lo * s - pd, (hi - 1) * s + (k - 1) * dl - pd + 1


def _group_pads(g, rows, sign=1):
    """``F.pad`` widths for one position group ``(rows, *S[1:])``, last axis first: its other
    axes by ``sign`` times the padding, its rows by ``rows = (front, back)`` (negative: crop)."""
    pads = []
    for p in reversed(g.padding[1:]):
        pads += [sign * p, sign * p]
    return pads + list(rows)


def _pads(g, rows1, rows2, sign=1):
    """``F.pad`` widths for ``(*batch, rows1, *S[1:], rows2, *S[1:])`` (``_group_pads`` of each)."""
    return _group_pads(g, rows2, sign) + _group_pads(g, rows1, sign)


def _window(g, o, rows):
    """Slices of one group's padded input read by tap ``o`` for ``rows`` output rows."""
    return tuple(slice(a, a + s * (n - 1) + 1, s)
                 for a, s, n in zip(o, g.stride, (rows, *g.out_shape[1:])))


def _windows(g, o, n1, n2):
    return _window(g, o, n1) + _window(g, o, n2)


def stencil_pair(a, g, band):
    """``spatial.stencil_pair`` from the input's band rows to the output's (both groups)."""
    nd = len(g.kernel)
    (li1, hi1), (li2, hi2) = _rows(band, 0, g.in_shape), _rows(band, 1, g.in_shape)
    (lo1, ho1), (lo2, ho2) = _rows(band, 0, g.out_shape), _rows(band, 1, g.out_shape)
    if a.ndim == 2:            # constant over positions
        a = a.reshape(*a.shape, *([1] * 2 * nd))
    a = torch.broadcast_to(a, (*a.shape[:a.ndim - 2 * nd], hi1 - li1, *g.in_shape[1:], hi2 - li2, *g.in_shape[1:]))
    (s1, e1), (s2, e2) = _footprint(lo1, ho1, g), _footprint(lo2, ho2, g)
    ap = F.pad(a, _pads(g, (li1 - s1, e1 - hi1), (li2 - s2, e2 - hi2)))     # rows start at s1, s2
    return spatial._window_mean([ap[(Ellipsis,) + _windows(g, o, ho1 - lo1, ho2 - lo2)] for o in g.offsets()],
                                g.size)


def stencil_pair_adjoint(d, g, batch_shape, band):
    """The adjoint of ``stencil_pair``: the output's band rows back to the input's."""
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    (li1, hi1), (li2, hi2) = _rows(band, 0, g.in_shape), _rows(band, 1, g.in_shape)
    (lo1, ho1), (lo2, ho2) = _rows(band, 0, g.out_shape), _rows(band, 1, g.out_shape)
    d = torch.broadcast_to(d, (*batch_shape, ho1 - lo1, *g.out_shape[1:], ho2 - lo2, *g.out_shape[1:]))
    (s1, e1), (s2, e2) = _footprint(lo1, ho1, g), _footprint(lo2, ho2, g)
    padded = tuple(s + 2 * p for s, p in zip(g.in_shape, g.padding))
    out = d.new_zeros((*batch_shape, e1 - s1, *padded[1:], e2 - s2, *padded[1:]))
    for o in g.offsets():
        out[(Ellipsis,) + _windows(g, o, ho1 - lo1, ho2 - lo2)] += d
    out = F.pad(out, _pads(g, (s1 - li1, hi1 - e1), (s2 - li2, hi2 - e2), sign=-1))
    return out.div_(g.size)


def _pool_last(a, g, rows_in, rows_out):
    """Average over windows on the last ``nd`` axes (one position group), from its rows
    ``rows_in`` to ``rows_out`` (``spatial._pool_last`` at a band's rows)."""
    (li, hi), (lo, ho) = rows_in, rows_out
    s, e = _footprint(lo, ho, g)
    ap = F.pad(a, _group_pads(g, (li - s, e - hi)))
    return spatial._window_mean([ap[(Ellipsis,) + _window(g, o, ho - lo)] for o in g.offsets()], g.size)


def _pool_last_adjoint(d, g, rows_in, rows_out):
    (li, hi), (lo, ho) = rows_in, rows_out
    s, e = _footprint(lo, ho, g)
    nd = len(g.kernel)
    padded = tuple(n + 2 * p for n, p in zip(g.in_shape, g.padding))
    out = d.new_zeros((*d.shape[:d.ndim - nd], e - s, *padded[1:]))
    for o in g.offsets():
        out[(Ellipsis,) + _window(g, o, ho - lo)] += d
    return F.pad(out, _group_pads(g, (s - li, hi - e), sign=-1)).div_(g.size)


def _swap(a, nd):
    nb = a.ndim - 2 * nd
    return a.permute(*range(nb), *range(nb + nd, nb + 2 * nd), *range(nb, nb + nd))


def pool_pair(a, g, band):
    """``spatial.pool_pair`` from the input's band rows to the output's: each group averaged
    over its windows (every pair of taps)."""
    nd = len(g.kernel)
    rin = _rows(band, 0, g.in_shape), _rows(band, 1, g.in_shape)
    rout = _rows(band, 0, g.out_shape), _rows(band, 1, g.out_shape)
    b = _pool_last(a, g, rin[1], rout[1])
    return _swap(_pool_last(_swap(b, nd), g, rin[0], rout[0]), nd)


def pool_pair_adjoint(d, g, batch_shape, band):
    """The adjoint of ``pool_pair`` at a band's rows."""
    nd = len(g.kernel)
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    rin = _rows(band, 0, g.in_shape), _rows(band, 1, g.in_shape)
    rout = _rows(band, 0, g.out_shape), _rows(band, 1, g.out_shape)
    d = torch.broadcast_to(d, (*batch_shape, rout[0][1] - rout[0][0], *g.out_shape[1:],
                               rout[1][1] - rout[1][0], *g.out_shape[1:]))
    b = _swap(_pool_last_adjoint(_swap(d, nd), g, rin[0], rout[0]), nd)
    return _pool_last_adjoint(b, g, rin[1], rout[1])


def pool_same(a, g, band):
    """``spatial.pool_same`` of one input's arrays at its band's rows ``(N, rows, *S[1:], rows,
    *S[1:])``: the pooled variances, exact at the band's rows of the output, 0 at the others
    (which nothing exact reads: ``regions``)."""
    p = pool_pair(a, g, band)
    lo, ho = _rows(band, 0, g.out_shape)
    n, r = p.shape[0], (ho - lo) * math.prod(g.out_shape[1:])
    out = p.new_zeros((n, *g.out_shape))
    out[:, lo:ho] = torch.diagonal(p.reshape(n, r, r), dim1=-2, dim2=-1).reshape(n, ho - lo, *g.out_shape[1:])
    return out


def _readout_rows(band, spatial):
    """Index of the readout band's rows within the box of rows its feature map is computed
    on, for ``(rows1, *P[1:], rows2, *P[1:])``."""
    index = ()
    for group in (0, 1):
        blo, _ = _rows(band, group, spatial)
        lo, hi = band[group]["readout"]
        index += (slice(lo - blo, hi - blo),) + (slice(None),) * (len(spatial) - 1)
    return index


def global_mean(a, spatial, batch, band):
    """The band's part of ``spatial.global_mean``: the sum over the readout band's rows (of the
    rows its feature map is computed on) over the mean's count."""
    count = math.prod(spatial) ** 2
    if not torch.is_tensor(a):
        rows = [band[g]["readout"][1] - band[g]["readout"][0] for g in (0, 1)]
        return a * rows[0] * rows[1] * math.prod(spatial[1:]) ** 2 / count
    (l1, h1), (l2, h2) = _rows(band, 0, spatial), _rows(band, 1, spatial)
    k, nb = len(spatial), len(batch)
    full = torch.broadcast_to(a, (*batch, h1 - l1, *spatial[1:], h2 - l2, *spatial[1:]))
    full = full[(slice(None),) * nb + _readout_rows(band, spatial)]
    return full.sum(dim=tuple(range(nb, nb + 2 * k))) / count


def mean_seeds(c, spatial, like, band):
    """The backward seeds of a global-mean readout: ``c`` at the readout band's rows, 0 at the
    other rows its feature map is computed on, ``(rows1, *P[1:], rows2, *P[1:])``."""
    (l1, h1), (l2, h2) = _rows(band, 0, spatial), _rows(band, 1, spatial)
    seeds = torch.zeros((h1 - l1, *spatial[1:], h2 - l2, *spatial[1:]), dtype=like.dtype, device=like.device)
    seeds[_readout_rows(band, spatial)] = c
    return seeds


def spatial_sum(t, batch, spatial, band):
    """The band's part of ``spatial.spatial_sum`` over pairs of positions ``(*P, *P)``."""
    h = len(spatial) // 2
    if 2 * h != len(spatial) or tuple(spatial[:h]) != tuple(spatial[h:]):
        raise NotBandable(f"a sum over positions {spatial} that are not pairs of one feature map")
    (l1, h1), (l2, h2) = _rows(band, 0, spatial[:h]), _rows(band, 1, spatial[:h])
    shape = (*batch, h1 - l1, *spatial[1:h], h2 - l2, *spatial[1:h])
    return torch.broadcast_to(t, shape).sum(dim=tuple(range(len(batch), len(shape))))


# --------------------------------------------------------------------------- #
# Planning: the rows each band needs, and whether a plan can be banded
# --------------------------------------------------------------------------- #

def regions(program, lo, hi):
    """``{position shape: (lo, hi)}``: the rows of every feature map that the readout's rows
    ``[lo, hi)`` need (the hull over the vectors of each shape); see the module."""
    from ..ir import nodes as irn
    from ..ir.walk import postorder

    def window(n):        # a convolution or an average pooling: the ops' window_geometry
        return getattr(n, "window_geometry", None)

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
        if window(n) is not None:
            return [n.arg]
        if isinstance(n, (irn.GBias, irn.GInput)) or not pos(n):
            return []
        what = n.describe(lambda _: "...").split("#")[0].strip()
        name = program.names.get(n)
        raise NotBandable(f"{what}{f' ({name})' if name else ''}: bands cover convolutions, average poolings, "
                          "elementwise steps and sums of feature maps only")

    def hull(a, b):
        return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))

    need = {id(r.vec): (lo, hi)}
    boxes: dict = {"readout": (lo, hi)}
    for node in reversed(postorder([r.vec], kids)):
        box = need.get(id(node))
        if box is None:
            continue
        shape = tuple(pos(node))
        boxes[shape] = hull(boxes.get(shape), box)
        for child in kids(node):
            cshape = tuple(pos(child))
            if not cshape:
                continue
            if window(node) is not None:
                g = window(node)
                start, end = _footprint(*box, g)
                cbox = (max(0, start), min(g.in_shape[0], end))
            elif cshape == shape:
                cbox = box
            else:
                raise NotBandable(f"a {type(node).__name__} of positions {shape} reading positions {cshape}")
            need[id(child)] = hull(need.get(id(child)), cbox)
    return boxes


def _sums():
    return spatial.global_mean, spatial.spatial_sum


def _allowed(fn) -> bool:
    """Runtime helpers with a banded form, or elementwise on the arrays they are given."""
    if getattr(fn, "__module__", None) == spatial.__name__:
        return fn in _sums() or fn.__name__ in (
            "patches", "positions", "group_patches", "stencil_pair", "stencil_same", "stencil_pair_adjoint",
            "pool_pair", "pool_pair_adjoint", "pool_same", "unit_positions", "position_mean", "mean_seeds")
    module = getattr(fn, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] in ("expect", "nonlinear", "piecewise", "piecewise_expr", "quadrature")


def constant_parts(plan, names=("nngp", "ntk")):
    """``(constants, pooled)``: each output's constant term (what it is with every position
    sum 0), after checking that the plan can be banded: every step has a banded form, and
    each output is an affine function (sums and constant multiples) of position sums;
    ``pooled``: True if an average pooling's same-input variances are banded (``pool_same``:
    exact at its side's band rows only), which then must not be shared by both sides, nor
    reduced over positions."""
    from .. import plan as P

    outputs = [plan.outputs.get(n) for n in names]
    reached = P.reachable(outputs)
    pooled = any(isinstance(n, P.Call) and n.fn is spatial.pool_same for n in reached)
    for n in reached:
        if isinstance(n, (P.Loop, P.LoopVar, P.LoopOut)):
            raise NotBandable("a loop over steps")
        if pooled and isinstance(n, P.Call) and n.fn is spatial.position_mean:
            raise NotBandable("a mean over positions of an average-pooled vector's variances")
        if isinstance(n, P.Env) and n.name in ("mc", "dbatch"):
            raise NotBandable("Monte Carlo or N-D expectations" if n.name == "mc" else "a readout at every position")
        if isinstance(n, P.Call) and not _allowed(n.fn):
            raise NotBandable(f"the step {getattr(n.fn, '__name__', n.fn)!r}")
        if isinstance(n, P.Contract) and len(n.equation.split("->")[1]) >= 4:
            if not all(isinstance(x, P.Call) and x.fn is spatial.group_patches for x in n.operands):
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
        if isinstance(v, P.Call) and v.fn in _sums():
            return 0.0
        raise NotBandable("an output that is not a sum over positions (a step after the pooling)")

    return {name: const(v) for name, v in zip(names, outputs)}, pooled


# Entries of a band's largest array per pair of inputs (16 MiB in float64) above which an
# entry is counted as twice as costly when choosing bands (``Split.plan``).  Measured on two
# images of 48x48 and 96x96 through three 3x3 convolutions: bands of 8-12 rows (arrays of a
# few MiB) ran as fast as the whole kernel or faster, despite the rows their windows add;
# bands of 5 rows of one group with the other's whole (78 MiB arrays) took 1.8x as long as
# square bands of 6 rows (10 MiB), and bands of 3 rows (12 rows of arrays) 2.4x the whole.
BAND_ENTRIES = 2 ** 21


def add_blocks(total, blocks):
    """``total[name] += blocks[name]`` for each kernel block (in place; the first is kept)."""
    for name, block in blocks.items():
        if block is not None:
            total[name] = block if name not in total else total[name].add_(block)
    return total


class Split:
    """A kernel's pair work split into bands of rows of the readout's positions: ``boxes``
    (one band per entry, a pair of dicts for ``using``: rows of the first position group,
    rows of the second), ``entries`` (the most pair-array entries per pair of inputs of any
    band), ``constants`` (each output's constant term, counted once), ``cost`` (``plan``'s
    estimate of the work, to compare splits)."""

    def __init__(self, boxes, entries, constants, cost=0, cross=False):
        self.boxes, self.entries, self.constants, self.cost = boxes, entries, constants, cost
        # average pooling's banded same-input variances are exact at one side's rows only:
        # a kernel against itself, whose two sides share them, runs as a cross kernel
        self.cross = cross

    @staticmethod
    def plan(kfn, bytes_per_entry, budget) -> "Split":
        """Square bands (as many rows of each group; memory per band bounded at any number of
        rows) that fit ``budget`` bytes per pair of inputs, of the height that costs least:
        the entries of all bands' arrays (the rows their windows add are computed once per
        band that needs them), twice for bands beyond ``BAND_ENTRIES``.  ``NotBandable`` if
        the kernel cannot be banded or one row of each group does not fit."""
        if kfn.jit:
            raise NotBandable("jit=True (banding is eager only)")
        program = kfn._program
        regions(program, 0, 1)            # the model's reason first, if any
        constants, pooled = constant_parts(kfn._plan)
        rows = program.readout.positions[0]

        def bands_of(h):
            """The bands of height ``h``, their largest array's entries, and the cost of all."""
            boxes = [regions(program, lo, min(rows, lo + h)) for lo in range(0, rows, h)]
            most, total = {}, {}
            for b in boxes:
                for shape, (lo, hi) in b.items():
                    if shape != "readout":
                        most[shape] = max(most.get(shape, 0), hi - lo)
                        total[shape] = total.get(shape, 0) + hi - lo
            entries = max(m * m * math.prod(s[1:]) ** 2 for s, m in most.items())
            cost = sum(t * t * math.prod(s[1:]) ** 2 for s, t in total.items())
            return boxes, entries, cost * (2 if entries > BAND_ENTRIES else 1)

        heights = sorted({min(rows, round(1.5 ** i)) for i in range(64) if 1.5 ** i < 2 * rows})
        options = [o for o in map(bands_of, heights) if o[1] * bytes_per_entry <= budget]
        if not options:
            need = bands_of(1)[1] * bytes_per_entry
            raise NotBandable(f"even one row of each feature map per band needs {need / 2**30:.3g} GiB per pair")
        boxes, entries, cost = min(options, key=lambda o: o[2])
        return Split([(a, b) for a in boxes for b in boxes], entries, constants, cost, pooled)

    def run(self, evaluate, report=None, part=(0, 1)):
        """The sum over bands of ``evaluate()`` (a tile's ``(blocks, stderr, errors)``), with
        each output's constant term counted once; ``report()`` after each band.
        ``part = (p, parts)``: only every ``parts``-th band from the ``p``-th (the parts of a
        tile computed at once sum to the whole, the constant term counted in part 0)."""
        total, errors = {}, []
        mine = self.boxes[part[0]::part[1]]
        for boxes in mine:
            with using(boxes):
                blocks, _, errs = evaluate()
            if report is not None:
                report()
            errors += errs
            add_blocks(total, blocks)
        extra = len(mine) - (part[0] == 0)
        for name in total:      # blocks are nngp and ntk
            total[name].sub_(extra * self.constants[name])
        return total, {}, errors
