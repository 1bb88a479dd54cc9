"""Fixed spatial axes: convolution stencils on covariance arrays (tensor_programs.md Sec. 5).

A width vector of a convolutional network has fixed positions ``P`` (e.g.
``(H, W)``).  Kernel arrays then carry them:

* cross-input arrays ``(N1, N2, *P, *P)``: every pair of positions;
* same-input arrays ``(N, *P)``: one position with itself (the variances that
  V-transforms need; a convolution only ever pairs position ``s+k`` with
  ``t+k``, so these never need other pairs).

A convolution with offsets ``k`` maps ``C`` to
``C'(s, t) = (W_std^2/|K|) sum_k C(s*stride + k*dil - pad, t*stride + k*dil - pad)``
(zero padding drops out-of-range terms); the backward covariance uses the
adjoint stencil.  These are the runtime helpers the generated code calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir.geometry import ConvGeometry
from . import bands, fused
from .compat import compiling


def _pad(a, g: ConvGeometry, groups: int):
    """Zero-pad the last ``groups * nd`` axes (``groups`` spatial groups) by the padding."""
    pads = []
    for _ in range(groups):
        for p in reversed(g.padding):
            pads += [p, p]
    return F.pad(a, pads) if any(g.padding) else a


def patches(x, g: ConvGeometry):
    """``(N, C, *S) -> (N, C*|K|, prod(P))``: the input under every kernel tap."""
    xp = _pad(x, g, 1)
    nd = len(g.kernel)
    taps = [xp[(Ellipsis,) + g.window(o)] for o in g.offsets()]
    out = torch.stack(taps, dim=2)           # (N, C, |K|, *P)
    return out.reshape(x.shape[0], -1, math.prod(g.out_shape)) if nd else out


def positions(t, shape, groups, side=0):
    """Unflatten the last ``groups`` axes (each ``prod(shape)`` long) into ``shape`` each.

    Input covariances are contracted over the patch axis as ``(..., prod(P))``
    (``codegen.Source.contract``); the kernel arrays carry positions as ``*P``.
    """
    band = bands.active()
    if band is not None and groups == 2:
        return bands.positions(t, shape, bands.frame(band, side))
    return t.reshape(*t.shape[:t.ndim - groups], *(tuple(shape) * groups))


def group_patches(pa, shape, group, side=0):
    """The patches of one side (position ``group`` 0 or 1) of a Gram over pairs of positions:
    all of them, or the current band's rows (``kernels.bands``; ``side`` 1 or 2: of one
    input with itself, both groups at that side's rows)."""
    band = bands.active()
    return pa if band is None else bands.group_patches(pa, shape, group, bands.frame(band, side))


def stencil_same(a, g: ConvGeometry):
    """``(N, *S) -> (N, *P)``: ``(1/|K|) sum_k a(s*stride + k)``; constants stay constants."""
    nd = len(g.kernel)
    if a.ndim == 1:   # constant over positions: padding still makes the border differ
        a = a.reshape(a.shape[0], *([1] * nd)).expand(a.shape[0], *g.in_shape)
    out = fused.window_same(a, g)
    return _pool_last(a, g) if out is None else out


def stencil_pair(a, g: ConvGeometry, side=0):
    """``(N1, N2, *S, *S) -> (N1, N2, *P, *P)``, the same tap on both position groups
    (``side``: of one input with itself, for its band's rows when banded)."""
    band = bands.active()
    if band is not None:
        return bands.stencil_pair(a, g, bands.frame(band, side))
    nd = len(g.kernel)
    if a.ndim == 2:   # constant over positions
        a = a.reshape(*a.shape, *([1] * 2 * nd)).expand(*a.shape, *g.in_shape, *g.in_shape)
    out = fused.window_pair(a, g)
    if out is not None:
        return out
    ap = _pad(a, g, 2)
    return _window_mean([ap[(Ellipsis,) + g.window(o) * 2] for o in g.offsets()], g.size)


def _window_mean(views, size):
    """``sum(views) / size``, accumulated in place in one buffer (the same sums, in the
    same order, as ``(v0 + v1 + ...) / size``, without a temporary per tap)."""
    total = views[0].clone(memory_format=torch.contiguous_format)
    for v in views[1:]:
        total.add_(v)
    return total.div_(size)


def _adjoint_windows(d, g: ConvGeometry, groups: int):
    """Adjoint of a window sum over ``groups`` position groups (same tap on every group).

    Eager: a scatter-add (fastest in PyTorch's eager kernels).  Under torch.compile:
    the equivalent gather, which fuses; a strided scatter-add does not (it took 100 s
    to compile and ran 50x slower).
    """
    if compiling():
        return _adjoint_gather(d, g, groups)
    nd = len(g.kernel)
    nb = d.ndim - groups * nd
    padded = tuple(s + 2 * p for s, p in zip(g.in_shape, g.padding))
    out = d.new_zeros((*d.shape[:nb], *(padded * groups)))
    for o in g.offsets():
        out[(Ellipsis,) + g.window(o) * groups] += d
    crop = tuple(slice(p, p + s) for p, s in zip(g.padding, g.in_shape))
    return out[(Ellipsis,) + crop * groups] / g.size


def _adjoint_gather(d, g: ConvGeometry, groups: int):
    """Adjoint of a window sum over ``groups`` position groups, written as a gather.

    For ``y[i] = sum_k x[i*stride + k*dil - pad]`` the adjoint is
    ``xbar[j] = sum_k' z[j + pad + k'*dil]`` where ``z`` is ``ybar`` with ``stride - 1``
    zeros inserted between entries and ``dil*(K-1)`` zeros in front (the usual
    transposed convolution).
    """
    nd = len(g.kernel)
    nb = d.ndim - groups * nd
    if any(st > 1 for st in g.stride):
        dilated = tuple((p - 1) * st + 1 for p, st in zip(g.out_shape, g.stride))
        z = d.new_zeros((*d.shape[:nb], *(dilated * groups)))
        z[(Ellipsis,) + tuple(slice(None, None, st) for st in g.stride) * groups] = d
        d = z
    pads = []
    for _ in range(groups):
        for s_in, p_out, st, k, dl, pd in reversed(list(zip(g.in_shape, g.out_shape, g.stride, g.kernel,
                                                             g.dilation, g.padding))):
            right = max(0, s_in + pd - (p_out - 1) * st - 1)
            pads += [dl * (k - 1), right]
    zp = F.pad(d, pads)
    views = [zp[(Ellipsis,) + tuple(slice(pd + oo, pd + oo + s_in) for pd, oo, s_in
                                     in zip(g.padding, o, g.in_shape)) * groups] for o in g.offsets()]
    return _window_mean(views, g.size)


def stencil_pair_adjoint(d, g: ConvGeometry, batch_shape):
    """Adjoint of ``stencil_pair``: ``(*batch, *P, *P) -> (*batch, *S, *S)``."""
    band = bands.active()
    if band is not None:
        return bands.stencil_pair_adjoint(d, g, batch_shape, band)
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    d = torch.broadcast_to(d, (*batch_shape, *g.out_shape, *g.out_shape))
    out = fused.window_pair(d, g, adjoint=True)
    return _adjoint_windows(d, g, 2) if out is None else out


def lift1(t, k):
    """A side-1 array ``(N1, *P)`` (or ``(N1,)``) in the layout ``(N1, N2, *P, *P)``."""
    if not torch.is_tensor(t):
        return t
    t = bands.rows_of(t, 0)
    sp = t.shape[1:]
    return t.reshape(t.shape[0], 1, *sp, *([1] * k)) if sp else t.reshape(t.shape[0], 1, *([1] * 2 * k))


def lift2(t, k):
    if not torch.is_tensor(t):
        return t
    t = bands.rows_of(t, 1)
    sp = t.shape[1:]
    return t.reshape(1, t.shape[0], *([1] * k), *sp) if sp else t.reshape(1, t.shape[0], *([1] * 2 * k))


def unit_positions(x, k):
    """A per-input array without positions ``(N,)`` as ``(N, 1, ..., 1)`` (``k`` unit axes)."""
    return x.reshape(x.shape[0], *([1] * k)) if torch.is_tensor(x) and x.ndim == 1 else x


def position_mean(x, k):
    """The mean of a per-input array ``(N, *P)`` over its ``k`` position axes."""
    return x.mean(dim=tuple(range(x.ndim - k, x.ndim))) if torch.is_tensor(x) and x.ndim >= k else x


def eye_pairs(c, positions, like):
    """``c [s = t]`` over all pairs of positions ``(*P, *P)`` (no batch axes: the same for all inputs)."""
    n = math.prod(positions)
    return (c * torch.eye(n, dtype=like.dtype, device=like.device)).reshape((*positions, *positions))


def same_position_sum(d, batch, positions, aligned):
    """``sum_s d[..., s, s]`` of an all-pairs array ``(*batch, *P, *P)`` (aligned: ``(*batch, *P)``)."""
    n = math.prod(positions)
    if not torch.is_tensor(d) or d.ndim == 0:
        return d * n
    d = torch.broadcast_to(d, (*batch, *positions) if aligned else (*batch, *positions, *positions))
    if aligned:
        return d.reshape((*batch, n)).sum(-1)
    return torch.diagonal(d.reshape((*batch, n, n)), dim1=-2, dim2=-1).sum(-1)


def spatial_sum(t, batch, spatial):
    """Sum of ``t`` broadcast to ``(*batch, *spatial)`` over the position axes ``spatial``."""
    band = bands.active()
    if band is not None:
        return bands.spatial_sum(t, batch, spatial, band)
    shape = tuple(batch) + tuple(spatial)
    t = torch.broadcast_to(t, shape)
    return t.sum(dim=tuple(range(len(batch), len(shape))))


def global_mean(a, spatial, batch):
    """``E[mean_s u_s mean_t v_t']`` from ``(*batch, *P, *P)``."""
    band = bands.active()
    if band is not None:
        return bands.global_mean(a, spatial, batch, band)
    if not torch.is_tensor(a):
        return a
    full = torch.broadcast_to(a, tuple(batch) + tuple(spatial) + tuple(spatial))
    return full.mean(dim=tuple(range(len(batch), len(batch) + 2 * len(spatial))))


def mean_seeds(c, spatial, like):
    """The backward seeds ``c`` of a global-mean readout at every position (a constant), or
    at the current band's rows only (``kernels.bands``)."""
    band = bands.active()
    if band is None:
        return torch.tensor(c, dtype=like.dtype, device=like.device)
    return bands.mean_seeds(c, spatial, like, band)


def aligned_mean(a, spatial, batch):
    """``mean_s E[u_s v_s']`` (a flatten readout) from the aligned layout ``(*batch, *P)``."""
    if not torch.is_tensor(a):
        return a
    full = torch.broadcast_to(a, tuple(batch) + tuple(spatial))
    return full.mean(dim=tuple(range(len(batch), len(batch) + len(spatial))))


def diagonal_mean(a, spatial, batch):
    """``mean_s E[u_s v_s']`` (a flatten readout) from the all-pairs layout ``(*batch, *P, *P)``."""
    if not torch.is_tensor(a):
        return a
    n = math.prod(spatial)
    a = torch.broadcast_to(a, tuple(batch) + tuple(spatial) + tuple(spatial)).reshape(*batch, n, n)
    return torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)


def identity_pairs(spatial, like):
    """``delta_{st}`` as ``(*P, *P)``: the backward covariance of a flatten readout (all-pairs layout)."""
    n = math.prod(spatial)
    return torch.eye(n, dtype=like.dtype, device=like.device).reshape(*spatial, *spatial)


# A readout at every position: the backward arrays carry the pair of output positions
# (s, s') as leading axes, ``(*P, *P, *batch, ...)`` (broadcasting against the forward's
# ``(*batch, ...)``); the kernels are ``(*batch, *P, *P)``.

def seed_pairs(spatial, like, batch):
    """``[p = s][q = s']`` as ``(*P, *P, *1s of batch, *P, *P)``: the readout's backward
    covariance for the output pair (s, s') (both vectors are the readout ``v``)."""
    n = math.prod(spatial)
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    seeds = eye[:, None, :, None] * eye[None, :, None, :]          # [s, s', p, q]
    return seeds.reshape(*spatial, *spatial, *([1] * len(batch)), *spatial, *spatial)


def to_seeds(a, batch, k):
    """``(*batch, *P, *P)`` (``k`` axes of output positions) -> ``(*P, *P, *batch)``."""
    nb = len(batch)
    if a.ndim == 0:          # a constant broadcasts to any layout
        return a
    a = torch.broadcast_to(a, (*batch, *a.shape[a.ndim - k:])) if a.ndim < nb + k else a
    return a.permute(*range(nb, nb + k), *range(nb))


def from_seeds(a, dbatch, k):
    """``(*P, *P, *batch)`` (``dbatch = (*P, *P, *batch)``) -> ``(*batch, *P, *P)``."""
    a = torch.broadcast_to(a, tuple(dbatch))
    nb = a.ndim - k
    return a.permute(*range(k, k + nb), *range(k))


def swap_position_pairs(a, k):
    """``a[..., s, s']`` -> ``a[..., s', s]`` over its last ``k`` axes (two groups of ``k/2``
    output positions): the entry of the other input of a pair."""
    nb, h = a.ndim - k, k // 2
    return a.permute(*range(nb), *range(nb + h, nb + k), *range(nb, nb + h))


def unpack_seeds(packed, i, j, n, k):
    """Packed pairs ``(T, *P, *P)`` -> ``(N, N, *P, *P)``, the entry ``(j, i)`` the
    transpose over positions of ``(i, j)``: ``K[j, i, s, s'] = K[i, j, s', s]``."""
    swapped = swap_position_pairs(packed, k)
    out = packed.new_empty((n, n, *packed.shape[1:]))
    out[i, j] = packed
    out[j, i] = swapped
    d = i == j          # an input with itself: symmetric over the pair of positions, exactly
    out[i[d], i[d]] = (packed[d] + swapped[d]) / 2
    return out


def stencil_same_adjoint(d, g: ConvGeometry, batch_shape):
    """Adjoint of ``stencil_same``: ``(*batch, *P) -> (*batch, *S)`` (scatter-add)."""
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    return _pool_last_adjoint(torch.broadcast_to(d, (*batch_shape, *g.out_shape)), g)


def pair_gram(x, y):
    """``sum_c x[a, s, c] y[c, b, t]`` as ``(a, b, s, t)``: a Gram of two batches' patches over
    pairs of positions, as one GEMM ``(a s, c) @ (c, b t)`` whose result is copied into the
    order the programs read (0.42-0.52 ms for 8 x 64 x 27 patches a side, one thread, against
    0.71-0.77 for the batched matmul ``x[:, None] @ y[None]`` that writes it directly)."""
    a, s, c = x.shape
    b, t = y.shape[1:]
    g = torch.matmul(x.reshape(a * s, c), y.reshape(c, b * t))
    return g.view(a, s, b, t).permute(0, 2, 1, 3).contiguous()


# Packed layout of x1 against itself: only pairs i <= j, ``(T, *P, *P)`` with
# ``T = N(N+1)/2`` (rows I, columns J of torch.triu_indices): half the work.

def pair_indices(n, device):
    """``(I, J, DIAG)``: row/column of every packed pair and the packed positions of ``i == j``."""
    ij = torch.triu_indices(n, n, device=device)
    r = torch.arange(n, device=device)
    return ij[0], ij[1], r * n - r * (r - 1) // 2    # row i starts after sum_{q<i} (n - q) pairs


def pack(full, i, j):
    """``(N, N, ...) -> (T, ...)``."""
    out = fused.gather(full, i, j)
    return full[i, j] if out is None else out


def gather(x, idx):
    """``x[idx]`` along the first axis (a per-input array lifted to the packed pairs)."""
    out = fused.gather(x, idx)
    return x.index_select(0, idx) if out is None else out      # index_select: 2x faster than x[idx]


def unpack(packed, i, j, n):
    """``(T,) -> (N, N)`` symmetric."""
    out = fused.unpack(packed, i, j, n)
    if out is not None:
        return out
    out = torch.empty((n, n), dtype=packed.dtype, device=packed.device)
    out[i, j] = packed
    out[j, i] = packed
    return out


def liftp(t, idx, k, right):
    """A same-input array ``(N, *P)`` in the packed layout ``(T, *P, *P)`` (left or right group)."""
    if not torch.is_tensor(t):
        return t
    t = bands.rows_of(t, int(right))
    g = gather(t, idx)
    sp = g.shape[1:]
    if not sp:
        return g.reshape(g.shape[0], *([1] * 2 * k))
    return g.reshape(g.shape[0], *([1] * k), *sp) if right else g.reshape(g.shape[0], *sp, *([1] * k))


def with_diagonal_aligned(packed, same, diag):
    """Packed aligned-position array ``(T, *P)`` with its ``i == j`` entries set to ``same``."""
    packed[diag] = same
    return packed


def with_diagonal_packed(packed, same, diag):
    """Packed ``x1``-against-itself array with its ``i == j``, same-position entries set to ``same``."""
    if packed.ndim == 1:
        packed[diag] = same
        return packed
    band = bands.active()
    if band is not None:
        return bands.with_diagonal_packed(packed, same, diag, band)
    pt = same[0].numel()
    view = packed.reshape(packed.shape[0], pt, pt)
    p = torch.arange(pt, device=packed.device)
    view[diag[:, None], p[None, :], p[None, :]] = same.reshape(-1, pt)
    return view.reshape(packed.shape)



# Average pooling: a fixed average over windows, mixing *all* pairs of positions of
# two windows: E[y_s y'_t] = (1/|K|^2) sum_{k,l} E[x_{s+k} x'_{t+l}].

def _pool_last(a, g: ConvGeometry):
    """Average over windows on the last ``nd`` axes (zero padding counted)."""
    ap = _pad(a, g, 1)
    return _window_mean([ap[(Ellipsis,) + g.window(o)] for o in g.offsets()], g.size)


def _swap_groups(a, nd):
    nb = a.ndim - 2 * nd
    perm = list(range(nb)) + list(range(nb + nd, nb + 2 * nd)) + list(range(nb, nb + nd))
    return a.permute(*perm)


def pool_pair(a, g: ConvGeometry, side=0):
    """``(*batch, *S, *S) -> (*batch, *P, *P)``: both position groups averaged over windows."""
    band = bands.active()
    if band is not None:
        return bands.pool_pair(a, g, bands.frame(band, side))
    nd = len(g.kernel)
    b = _pool_last(a, g)                                   # right group pooled
    return _swap_groups(_pool_last(_swap_groups(b, nd), g), nd)


def pool_same(a, g: ConvGeometry, side=0):
    """Same-input variances of the pooled vector from ``(N, *S, *S)``: ``(N, *P)`` (when banded:
    exact at the rows of ``side``'s band, 0 at the others)."""
    band = bands.active()
    if band is not None:
        return bands.pool_same(a, g, bands.frame(band, side))
    p = pool_pair(a, g)
    n, pt = p.shape[0], math.prod(g.out_shape)
    return torch.diagonal(p.reshape(n, pt, pt), dim1=-2, dim2=-1).reshape(n, *g.out_shape)


def _pool_last_adjoint(d, g: ConvGeometry):
    return _adjoint_windows(d, g, 1)


def pool_pair_adjoint(d, g: ConvGeometry, batch_shape):
    """Adjoint of ``pool_pair``: ``(*batch, *P, *P) -> (*batch, *S, *S)``."""
    band = bands.active()
    if band is not None:
        return bands.pool_pair_adjoint(d, g, batch_shape, band)
    nd = len(g.kernel)
    d = torch.as_tensor(d) if not torch.is_tensor(d) else d
    d = torch.broadcast_to(d, (*batch_shape, *g.out_shape, *g.out_shape))
    b = _pool_last_adjoint(d, g)
    return _swap_groups(_pool_last_adjoint(_swap_groups(b, nd), g), nd)


def liftf(t, k, right, side=0):
    """A same-input array ``(N, *P)`` of ``side`` in the same-input all-pairs layout ``(N, *P, *P)``."""
    if not torch.is_tensor(t):
        return t
    t = bands.rows_of(t, int(right), side)
    sp = t.shape[1:]
    if not sp:
        return t.reshape(t.shape[0], *([1] * 2 * k))
    return t.reshape(t.shape[0], *([1] * k), *sp) if right else t.reshape(t.shape[0], *sp, *([1] * k))


# Fixed linear maps of positions (ops/positions.py): ``y_s = sum_a M[s, a] x_a`` over
# positions flattened in C order; ``m`` is an ``ir.PositionMap``.

def _matrix(m, like):
    return torch.tensor(m.matrix, dtype=like.dtype, device=like.device)


def _padded(shapes):
    """Position groups as the planner lays them out: every group of a pair has ``k`` axes
    (the most of any group); a vector without positions has ``k`` axes of size 1."""
    k = max(len(s) for s in shapes)
    return [tuple(s) if s else (1,) * k for s in shapes]


def _groups(a, shapes):
    """``a`` with its trailing position groups (``shapes``, one per group) each flattened,
    broadcast over the positions (an array constant over positions has size-1 axes)."""
    shapes = _padded(shapes)
    nd = sum(len(s) for s in shapes)
    lead = a.shape[:max(a.ndim - nd, 0)]
    full = torch.broadcast_to(a, (*lead, *[n for s in shapes for n in s]))
    return full.reshape((*lead, *[math.prod(s) for s in shapes])), lead


def map_pair(a, ma, mb):
    """``E[(M_a x)_s (M_b y)'_t] = sum_{a,b} M_a[s,a] M_b[t,b] E[x_a y'_b]``:
    ``(*lead, *P, *P) -> (*lead, *Q_a, *Q_b)`` (no lead for a constant)."""
    ia, ib = _padded((ma.in_shape, mb.in_shape))
    if a.ndim < len(ia) + len(ib):          # constant over positions and inputs
        a = torch.broadcast_to(a, (*ia, *ib))
    x, lead = _groups(a, (ma.in_shape, mb.in_shape))
    if ma.select is not None and mb.select is not None:
        ia = torch.as_tensor(ma.select, device=a.device)
        ib = torch.as_tensor(mb.select, device=a.device)
        y = x.index_select(-2, ia).index_select(-1, ib)
    else:
        y = _matrix(ma, a) @ x @ _matrix(mb, a).T
    return y.reshape((*lead, *[n for s in _padded((ma.out_shape, mb.out_shape)) for n in s]))


def map_same(d, m):
    """Same-input variances of a selection: ``(*lead, *P) -> (*lead, *Q)``."""
    if not torch.is_tensor(d) or d.ndim == 0:
        return d
    x, lead = _groups(d, (m.in_shape,))
    return x.index_select(-1, torch.as_tensor(m.select, device=d.device)).reshape((*lead, *m.out_shape))


def _per_input(y, ref, shape):
    """``y`` of shape ``(N, *shape)``: a constant (no batch axis) gets the batch of ``ref``, an
    array of the same side's inputs (per-input arrays are indexed by input)."""
    return y if y.ndim > len(shape) else torch.broadcast_to(y, (ref.shape[0], *shape))


def map_diagonal(f, ma, mb, ref):
    """Same-input variances of a map that mixes positions, from all pairs ``(*lead, *P, *P)``."""
    y = map_pair(f, ma, mb)
    q = math.prod(ma.out_shape)
    lead = y.shape[:y.ndim - 2 * len(ma.out_shape)]
    d = torch.diagonal(y.reshape((*lead, q, q)), dim1=-2, dim2=-1).reshape((*lead, *ma.out_shape))
    return _per_input(d, ref, ma.out_shape)


def map_mean(mean, m, ref):
    """``E[(M x)_s] = sum_a M[s, a] E[x_a]``: ``(*lead, *P) -> (*lead, *Q)`` (``ref``: an array of
    the side's inputs, for a constant's batch axis)."""
    if not torch.is_tensor(mean) or mean.ndim == 0:        # constant over inputs and positions
        rows = m.matrix.sum(axis=1)
        if bool((rows == rows[0]).all()):
            return mean * float(rows[0]) if rows[0] != 1.0 else mean
        return _per_input(mean * _matrix(m, ref).sum(1).reshape(m.out_shape), ref, m.out_shape)
    x, lead = _groups(mean, (m.in_shape,))
    return (x @ _matrix(m, x).T).reshape((*lead, *m.out_shape))


def map_adjoint(d, mu, mw):
    """The backward covariance through two maps: ``M_u^T D M_w``,
    ``(*lead, *Q_u, *Q_w) -> (*lead, *P, *P)`` (no lead for a constant)."""
    qu, qw = _padded((mu.out_shape, mw.out_shape))
    if d.ndim < len(qu) + len(qw):
        d = torch.broadcast_to(d, (*qu, *qw))
    x, lead = _groups(d, (mu.out_shape, mw.out_shape))
    y = _matrix(mu, x).T @ x @ _matrix(mw, x)
    return y.reshape((*lead, *[n for s in _padded((mu.in_shape, mw.in_shape)) for n in s]))


def map_adjoint_side(d, m, side, batch):
    """``M^T`` on one side's positions of a cross array, the other side's positions as they
    are: ``(*lead, *Q, *R) -> (*lead, *P, *R)`` (``side`` 1) or ``(*lead, *R, *Q) -> (*lead, *R,
    *P)`` (2), the ``lead`` axes those of ``batch`` (seeds, then the packed pairs against
    itself or the two inputs of a cross kernel); a vector read off beside a map of positions
    (``h + roll(h)``, a bias read at every position)."""
    lead = len(batch)
    k = len(m.out_shape)
    if d.ndim < lead + k:                       # constant: broadcast over both sides
        d = d.reshape(*([1] * lead), *([1] * 2 * k)) if d.ndim == 0 else d
        d = torch.broadcast_to(d, (*d.shape[:lead], *m.out_shape, *d.shape[lead + k:]))
    rest = d.shape[lead + k:] if side == 1 else d.shape[lead:d.ndim - k]
    if side == 1:
        x = d.reshape(*d.shape[:lead], math.prod(m.out_shape), -1)
        y = _matrix(m, x).T @ x
        return y.reshape(*d.shape[:lead], *m.in_shape, *rest)
    x = d.reshape(*d.shape[:lead], -1, math.prod(m.out_shape))
    y = x @ _matrix(m, x)
    return y.reshape(*d.shape[:lead], *rest, *m.in_shape)


def map_place_same(d, ma, mb, ref):
    """Same-input variances ``E[(M_a x)_s (M_b y)_s]`` of two maps that read the same input
    position wherever both are nonzero (``PositionMap.place``): ``(*lead, *P) -> (*lead, *Q)``,
    0 where either map is 0 (a stack or a concatenation along positions)."""
    rows = [s for s, (i, j) in enumerate(zip(ma.place, mb.place)) if i >= 0 and j >= 0]
    src = torch.as_tensor([ma.place[s] for s in rows], device=d.device)
    d = _per_input(d, ref, ()) if d.ndim == 0 else d       # a constant: one per input of the side
    if d.ndim < len(ma.in_shape) + 1:                       # constant over positions
        d = d.reshape(d.shape[0], *([1] * len(ma.in_shape)))
    x, lead = _groups(d, (ma.in_shape,))
    out = x.new_zeros((*lead, math.prod(ma.out_shape)))
    out[..., torch.as_tensor(rows, device=d.device)] = x.index_select(-1, src)
    return out.reshape((*lead, *ma.out_shape))

