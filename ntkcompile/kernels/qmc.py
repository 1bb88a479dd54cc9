"""Quasi-Monte Carlo for N-D expectations whose slots fall into independent groups.

The N-D evaluator's slot covariance is block diagonal whenever slots come from different
matrices: a post-activation residual chain ``relu(z_0 + relu(z_1 + ...))`` on a pair of
inputs has one 2x2 block per matrix (the pair's two sides), and the planner writes the
zero blocks as the constant ``0.0``.  ``blocks`` finds the groups from those constants;
``expect_blocks`` then draws each group from its own factor (a 2x2 block in closed form, a
larger one by ``eigh``), where ``quadrature.expect_nd`` eigendecomposed the whole ``D x D``
matrix per entry (twice, with the rank test) and multiplied ``D x r`` per point: the same
law, far less work.

**One net per position pair.** ``expect_nd`` gives every entry of the batch the same
points, so the errors of entries with similar covariances are alike, and sums over
positions (a global average pool, a convolution's window) do not average them away.  Here
the points are ``K`` disjoint consecutive runs of one scrambled Sobol sequence (each run of
``2^m`` points is itself a scrambled net, unbiased), and an entry's run is chosen by its
position indices (the trailing ``positions`` axes of the batch, never split by tiles, so
tiles of any size give the same values).  Each entry is the same unbiased estimate as
before; entries at different positions now have nearly independent errors, which a pooled
readout averages down (measured in ``benchmarks/resnet_v1.py``).

**One C pass per call.**  Where the planner could write the integrand as a
``pointwise.Program`` (piecewise polynomial functions of linear combinations with constant
coefficients: the residual chains), ``expect_blocks`` runs it in C (``_fused``): compiled
to one loop over a block of points (``native``), else interpreted by ``sampling.c``; z and
every intermediate stay in registers or L1, the same operations in the same order as the
torch form, so the values agree with it to rounding.  The torch form remains for other
integrands, other devices and without a C compiler.  The calls of one layer pass the same
covariance arrays; ``prepare_shared`` factors them once.

**One pass per covariance.**  A residual block's ``E[h h']`` and the chains of its
derivatives (five integrands over the same eight slots in the last block of a 3-block
ResNet v1) are one ``pointwise.Family``: one compiled program that computes their common
chain once and adds up every member's outputs on the same points (``expect_family``),
2.3x faster on that network.  Members share their points, so their errors correlate, and
where two were multiplied their product would be biased by the covariance of their errors
(an NTK term multiplies a block's derivatives with the expectations of the blocks below,
other families).  Measured on 4 inputs of 3x8x8 through that ResNet: the mean NTK of 8
seeds is as close to a 65536-point reference as with a stream per call (rms 1.22 against
1.21 of its standard errors).
"""
from __future__ import annotations

import ctypes
import math
import threading
import weakref
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import fused, native
from . import quadrature as quad

# Disjoint runs of the point sequence (nets) the positions of a batch are spread over.
MAX_NETS = 256
# Entries of ``z`` per chunk of points: the integrand is a chain of torch ops on ``(chunk, batch)``
# arrays, whose Python overhead (and GIL, with tiles on two threads) outweighs cache misses below
# about this size.
CHUNK_ENTRIES = 2**20
# Same-input entries (the variances, ``(N, *P)``: few) take this many times the points.
SAME_INPUT_BOOST = 8

_F64 = torch.float64
_points_lock = threading.Lock()
_points_cache: dict = {}           # (n, K, dims, seed) -> (dims, n, K) normal points
_CACHED_BYTES = 256 << 20          # the cache's size (the sets of a few replicates' calls)
# Points in all the nets of one call at most (``nets`` shrinks for many points per entry).
MAX_NET_POINTS = 1 << 20


def _zero(e) -> bool:
    return isinstance(e, (int, float)) and e == 0.0


def blocks(entries) -> List[List[int]]:
    """The groups of slots with no constant-zero covariance between them (connected
    components of the nonzero pattern), each sorted, in the order of their first slot."""
    d = len(entries)
    parent = list(range(d))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(d):
        for j in range(i + 1, d):
            if not (_zero(entries[i][j]) and _zero(entries[j][i])):
                parent[find(i)] = find(j)
    groups: dict = {}
    for i in range(d):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _factor(sub: Tensor) -> Tuple[Tensor, Tensor]:
    """``(factor (*batch, m, m), eigenvalues (*batch, m))`` of a PSD block ``(*batch, m, m)``:
    ``z = factor @ eps``.  A 2x2 block in closed form: its correlation clamped to ``[-1, 1]``,
    so a block made slightly indefinite by rounding (or by Monte Carlo inputs) keeps its
    variances exactly."""
    m = sub.shape[-1]
    if m == 1:
        v = sub[..., 0, 0].clamp_min(0.0)
        return v.sqrt()[..., None, None], v[..., None]
    if m == 2:
        (f00, f10, f11), (lo, hi) = _factor2(sub[..., 0, 0], sub[..., 0, 1], sub[..., 1, 1])
        factor = torch.stack([torch.stack([f00, torch.zeros_like(f00)], -1), torch.stack([f10, f11], -1)], -2)
        return factor, torch.stack([lo, hi], -1)
    evals, evecs = quad._eigh(sub)
    return evecs * evals.sqrt().unsqueeze(-2), evals


def _factor2(a: Tensor, b: Tensor, c: Tensor, stats: bool = False):
    """``_factor`` of the 2x2 blocks ``[[a, b], [b, c]]`` as arrays: the factor's entries
    ``(f00, f10, f11)`` (``f01 = 0``) and the eigenvalues ``(lo, hi)``; one C pass
    (``sampling.c``) for 1-D float64 CPU arrays, the torch form's operations (the two agree
    to a few ulps: torch's vectorized loops round some steps differently).  With ``stats``
    also the largest squared norms of the two columns and of ``hi``, and whether ``f00``,
    ``f10``, ``f11`` are nonzero anywhere (floats)."""
    lib = fused._load() if not fused._off and a.dim() == 1 else None
    if lib is not None and fused._applicable([a, b, c]):
        a, b, c = (x.contiguous() for x in torch.broadcast_tensors(a, b, c))
        out = [torch.empty_like(a) for _ in range(5)]
        st = (ctypes.c_double * 6)()
        lib.ntk_factor2(*(x.data_ptr() for x in (a, b, c, *out)), a.numel(), st)
        return (tuple(out[:3]), tuple(out[3:])) + ((tuple(st),) if stats else ())
    f, ev = _factor2_torch(a, b, c)
    if not stats:
        return f, ev
    big = [float(x.amax()) if x.numel() else 0.0 for x in (f[0] ** 2 + f[1] ** 2, f[2] ** 2, ev[1])]
    return f, ev, (*big, *(float(bool((x != 0).any())) for x in f))


def _factor2_torch(a: Tensor, b: Tensor, c: Tensor):
    a, c = a.clamp_min(0.0), c.clamp_min(0.0)
    sa, sc = a.sqrt(), c.sqrt()
    s = sa * sc
    rho = torch.where(s > 0, b / torch.where(s > 0, s, 1.0), 0.0).clamp(-1.0, 1.0)
    half, gap = 0.5 * (a + c), (0.25 * (a - c) ** 2 + (rho * s) ** 2).sqrt()
    return (sa, rho * sc, sc * (1.0 - rho * rho).clamp_min(0.0).sqrt()), ((half - gap).clamp_min(0.0),
                                                                          (half + gap).clamp_min(0.0))


def normal_nets(n: int, nets: int, dims: int, seed: int, by_net: bool = False) -> Tensor:
    """``(dims, n, nets)``: ``nets`` consecutive runs of ``n`` points of one scrambled Sobol
    sequence (``quadrature.normal_points``), the first ``dims`` coordinates of a sequence of
    ``dims`` rounded up to 8, cached: a replicate's calls, of 3 to 8 slots, share one set."""
    width = 8 * -(-dims // 8)
    key = (n, nets, width, seed, by_net)
    with _points_lock:
        hit = _points_cache.get(key)
    if hit is None:
        hit = quad.normal_points(n * nets, width, seed).reshape(nets, n, width)
        hit = (hit.permute(2, 0, 1) if by_net else hit.permute(2, 1, 0)).contiguous()
        with _points_lock:
            while _points_cache and sum(v.nbytes for v in _points_cache.values()) + hit.nbytes > _CACHED_BYTES:
                _points_cache.pop(next(iter(_points_cache)))
            _points_cache[key] = hit
    return hit[:dims]


def _mix(*values: int) -> int:
    """One seed from several integers, within what ``torch.Generator.manual_seed`` takes."""
    h = 0
    for v in values:
        h = (h * 1_000_003 + int(v)) % (1 << 61)
    return h


def _nets_of(t: int, nets: int, seed: int, stream: int, device) -> Tensor:
    """The net of each of ``t`` position entries: a pseudo-random function of the position
    index and the call's ``stream`` alone (not of the tile)."""
    g = torch.Generator().manual_seed(_mix(seed, stream, 12345))
    return (torch.randperm(t, generator=g) % nets).to(device)


class Groups(list):
    """``prepare``'s groups; ``packed`` keeps their coefficients in ``_fused``'s layout for the
    calls that share them."""
    packed = None


def prepare(entries, like) -> Tuple[torch.Size, int, list, list]:
    """The batch shape, the number of slots, ``[(columns, [(slot, column, coefficient (B,))])]``
    per group (the factor's nonzero entries; columns that vanish on the whole batch dropped)
    and the eigenvalues of the whole block-diagonal covariance, ``D`` arrays ``(B,)``."""
    flat = [quad._f64(e)[0] if torch.is_tensor(e) else torch.as_tensor(float(e), dtype=_F64, device=like.device)
            for row in entries for e in row]
    flat = torch.broadcast_tensors(*flat)
    d = len(entries)
    batch = flat[0].shape
    # per group: its slots and the factor's columns [([(row, (B,), nonzero anywhere)], largest squared norm)]
    groups, evals, top = [], [], 0.0
    for slots in blocks(entries):
        if len(slots) == 2:            # the common case (a residual chain on a pair): no stacking
            i, j = slots
            (f00, f10, f11), ev, st = _factor2(flat[i * d + i].reshape(-1), (0.5 * (flat[i * d + j] + flat[j * d + i])
                                                                             ).reshape(-1), flat[j * d + j].reshape(-1),
                                               stats=True)
            groups.append((slots, [([(0, f00, st[3]), (1, f10, st[4])], st[0]), ([(1, f11, st[5])], st[1])]))
            evals += ev
            top = max(top, st[2])
            continue
        sub = torch.stack([flat[i * d + j].reshape(-1) for i in slots for j in slots], -1)
        sub = sub.reshape(-1, len(slots), len(slots))
        factor, ev = _factor(0.5 * (sub + sub.transpose(-1, -2)))
        groups.append((slots, [([(r, factor[:, r, k], bool((factor[:, r, k] != 0).any())) for r in range(len(slots))],
                                float(factor[:, :, k].pow(2).sum(-1).amax())) for k in range(len(slots))]))
        evals += ev.unbind(-1)
        top = max([top] + [float(ev.amax())] * (ev.numel() > 0))
    kept = Groups()
    for slots, columns in groups:
        # columns that vanish on the whole batch dropped, the others renumbered
        columns = [c for c, norm in columns if norm > quad._RANK_RTOL * top]
        terms = [(slots[r], k, f) for k, c in enumerate(columns) for r, f, nonzero in c if nonzero]
        kept.append((len(columns), sorted(terms, key=lambda t: (t[0], t[1]))))
    return batch, d, kept, evals


_prepared = threading.local()      # per tile thread: {key: (weak references, versions, prepare's value, bytes)}
PREPARED_BYTES = 128 << 20         # the factors kept per thread at most


def prepare_shared(entries, like):
    """``prepare`` and the covariance's ``rank``, shared by the calls that pass the same
    covariance arrays (unchanged: same objects, same versions), as the expectations of one
    layer do (``E[h h']``, ``E[h' h'']``, ...): four of each on a 3-block ResNet v1.  A kept
    value goes when one of its arrays does (the generated code deletes each after its last
    use), or when the least recently used values are over ``PREPARED_BYTES``."""
    tensors = [e for row in entries for e in row if torch.is_tensor(e)]
    key = tuple(id(e) if torch.is_tensor(e) else e for row in entries for e in row)
    kept = getattr(_prepared, "items", None)
    if kept is None:
        kept = _prepared.items = {}
    hit = kept.pop(key, None)
    if hit is not None and all(r() is t and t._version == v for r, t, v in zip(hit[0], tensors, hit[1])):
        kept[key] = hit                                  # the most recently used last
        return hit[2]
    value = prepare(entries, like)
    value = (*value, rank(value[3]))
    size = 2 * sum(8 * c.numel() for _, terms in value[2] for _, _, c in terms)     # and their packed copy
    if tensors and size <= PREPARED_BYTES:
        while kept and sum(v[3] for v in kept.values()) + size > PREPARED_BYTES:
            kept.pop(next(iter(kept)))
        kept[key] = ([weakref.ref(t) for t in tensors], [t._version for t in tensors], value, size)
        for t in {id(t): t for t in tensors}.values():
            weakref.finalize(t, kept.pop, key, None)
    return value


def expect_blocks(f: Callable, batch, d: int, groups, samples: int, seed: int,
                  positions: int = 0, stream: int = 0, program=None) -> Tuple[Tensor, Tensor, list]:
    """``E f(z)``, its standard error (as for independent draws, an upper bound) and the means
    of the further arrays ``f`` returns (if it returns a tuple, on the same points) over
    ``samples`` points per entry, for the groups of ``prepare``; ``positions``: the trailing
    batch axes the nets are spread over (``MAX_NETS`` at most, one per position pair when
    there are fewer, and ``MAX_NET_POINTS`` points in all); ``stream``: the call's number in
    the program (without positions, its own scramble); ``program``: ``f`` as a
    ``pointwise.Program``, run by the fused C pass where it applies (``_fused``)."""
    B = math.prod(batch)
    device, dims, t, nets, points_seed, net = _layout(batch, groups, samples, seed, positions, stream)
    if program is not None and device.type == "cpu":
        out = _fused(program, batch, d, groups, samples, nets, dims, net, t, points_seed)
        if out is not None:
            quad._tick(samples, samples)
            return out[0][0], out[1][0], out[0][1:]
    pts = normal_nets(samples, nets, max(1, dims), points_seed).to(device)
    chunk = max(1, CHUNK_ENTRIES // max(1, B * d))
    shift, extra = None, None
    acc, acc2 = (torch.zeros(B, dtype=_F64, device=device) for _ in range(2))
    for start in range(0, samples, chunk):
        c = min(chunk, samples - start)
        # (dims, c, 1, t): each position's net, broadcast over the pairs of inputs
        eps = (pts[:, start:start + c].index_select(2, net) if net is not None else pts[:, start:start + c])
        eps = eps.reshape(dims, c, 1, -1)
        z = torch.zeros(d, c, B // t, t, dtype=_F64, device=device)
        col = 0
        for cols, terms in groups:
            for slot, j, coef in terms:
                z[slot].addcmul_(coef.view(B // t, t), eps[col + j])
            col += cols
        vals = f(z.reshape(d, c, *batch).movedim(0, -1))
        if isinstance(vals, tuple):
            vals, more = vals[0], [v.reshape(c, B).sum(0) for v in vals[1:]]
            extra = more if extra is None else [a + b for a, b in zip(extra, more)]
        if tuple(vals.shape) != (c, *batch):
            raise ValueError(f"expect_blocks: f must map z of shape {(c, *batch, d)} to {(c, *batch)}, "
                             f"got {tuple(vals.shape)}")
        vals = vals.reshape(c, B)
        if shift is None:
            shift = vals.mean(0)
        dv = vals - shift
        acc, acc2 = acc + dv.sum(0), acc2 + (dv * dv).sum(0)
        quad._tick(start + c, samples)
    mean = acc / samples
    var = ((acc2 - samples * mean * mean) / max(1, samples - 1)).clamp_min(0.0)
    extra = [(e / samples).reshape(batch) for e in extra or ()]
    return (shift + mean).reshape(batch), (var / samples).sqrt().reshape(batch), extra


def _layout(batch, groups, samples: int, seed: int, positions: int, stream: int):
    """``(device, dims, t, nets, points_seed, net)`` of ``expect_blocks``: the position entries
    ``t``, the nets, the seed of the points and each position's net."""
    device = next((t[2].device for _, terms in groups for t in terms), torch.device("cpu"))
    positions = min(positions, len(batch))
    t = math.prod(batch[len(batch) - positions:]) if positions else 1
    nets = max(1, min(MAX_NETS, t, MAX_NET_POINTS // samples))
    # one set of points per replicate, shared by its calls; each call spreads its entries over
    # the nets in its own order (``stream``), so that two expectations multiplied together (an NTK
    # term ``D * E[x x']``) have independent errors, and their product no bias
    net = _nets_of(t, nets, seed, stream, device) if nets > 1 else None
    return device, sum(cols for cols, _ in groups), t, nets, _mix(seed) if nets > 1 else _mix(seed, stream), net


def expect_family(program, batch, d: int, groups, samples: int, seed: int, positions: int = 0,
                  stream: int = 0) -> Optional[list]:
    """``expect_blocks`` of each member of ``program`` (``pointwise.build_family``: integrands
    that share the covariance) on the same points, in one compiled pass: per member its
    ``(mean, stderr, further means)``; None where the pass does not apply (not compiled, not
    on the CPU), and each member then runs alone, on the same points (``stream``) and so
    with the same values to rounding."""
    device, dims, t, nets, points_seed, net = _layout(batch, groups, samples, seed, positions, stream)
    if device.type != "cpu":
        return None
    out = _fused(program, batch, d, groups, samples, nets, dims, net, t, points_seed)
    if out is None:
        return None
    quad._tick(samples, samples)
    means, errs = out
    return [(means[first], errs[first], means[first + 1:first + count]) for first, count in program.members]


def rank(evals) -> int:
    """The numerical rank (largest over the batch) of the block-diagonal covariance from its
    eigenvalues (``prepare``'s ``D`` arrays ``(B,)``, or one array ``(B, D)``): one C pass
    (``sampling.c``), else ``quadrature``'s."""
    cols = list(evals.unbind(-1)) if torch.is_tensor(evals) else list(evals)
    if not cols:
        return 0
    lib = fused._load() if not fused._off else None
    if lib is None or not fused._applicable(cols) or any(c.dim() != 1 for c in cols):
        return quad._rank_from_eigenvalues(torch.stack([c.reshape(-1) for c in cols], -1))
    cols = [c.contiguous() for c in cols]
    return int(lib.ntk_rank((ctypes.c_void_p * len(cols))(*[c.data_ptr() for c in cols]), len(cols),
                            cols[0].numel(), quad._RANK_RTOL))


def samples_for(samples: int, same_input: bool) -> int:
    return samples * SAME_INPUT_BOOST if same_input else samples


def _fused(program, batch, d, groups, samples, nets, dims, net, t, seed):
    """``expect_blocks``'s values by ``sampling.c`` (``program``'s outputs over the same points,
    ``(dims, nets, n)``), or None where the fused path does not apply."""
    lib = fused._load() if not fused._off else None
    coefs = [coef for _, terms in groups for _, _, coef in terms]
    if lib is None or not fused._applicable(coefs) or program.slots != d:
        return None
    B = math.prod(batch)
    slot_of, col_of, coefs, col = [], [], [], 0
    for cols, terms in groups:
        for slot, j, coef in terms:
            coefs.append(coef.reshape(B))
            slot_of.append(slot)
            col_of.append(col + j)
        col += cols
    n_terms = len(coefs)
    # the compiled body where no slot has more terms than it reads (2 x 2 blocks), else the interpreter
    fits = all(slot_of.count(s) <= k for s, k in enumerate(program.terms))     # as many terms as the body reads
    # compiled once a call is worth the compiler's run (about 1 s a model), or when it is already
    body = (program.body or (native.body(program) if B * samples >= native.WORTH else None)) if fits else None
    if body is None and program.squared != (0,):
        return None                   # the interpreter gives the standard error of output 0 alone
    pts = normal_nets(samples, nets, max(1, dims), seed, by_net=True)
    # (t, rows, terms): the coefficients in the order sampling.c takes the entries, one row apart;
    # made once for the calls that share the groups (prepare_shared)
    packed = groups.packed[1] if isinstance(groups, Groups) and groups.packed and groups.packed[0] == t else None
    if packed is None:
        packed = torch.empty(max(1, B * n_terms), dtype=_F64)
        if coefs:
            coefs = [c.contiguous() for c in coefs]
            lib.ntk_pack((ctypes.c_void_p * n_terms)(*[c.data_ptr() for c in coefs]), n_terms, B // t, t,
                         packed.data_ptr())
        if isinstance(groups, Groups):
            groups.packed = (t, packed)
    if program._c is None:
        program._c = ((ctypes.c_int32 * (5 * len(program.code)))(*[v for ins in program.code for v in ins]),
                      (ctypes.c_double * max(1, len(program.consts)))(*program.consts))
    code, consts = program._c
    means = [torch.empty(B, dtype=_F64) for _ in range(program.outputs)]
    errs = {q: torch.empty(B, dtype=_F64) for q in program.squared}
    c_means = (ctypes.c_void_p * program.outputs)(*[m.data_ptr() for m in means])
    c_errs = (ctypes.c_void_p * program.outputs)(*[errs[q].data_ptr() if q in errs else None
                                                   for q in range(program.outputs)])
    c_slot = (ctypes.c_int32 * max(1, n_terms))(*slot_of)
    c_col = (ctypes.c_int32 * max(1, n_terms))(*col_of)
    net_of = net.to(torch.int64).contiguous() if net is not None else None

    def part(lo, hi):
        regs = torch.empty(max(program.registers, program.outputs) * 256, dtype=_F64)
        rc = lib.ntk_qmc(code, len(program.code), consts, program.registers, d, n_terms, c_slot, c_col,
                         packed.data_ptr(), pts.data_ptr(), samples, nets,
                         None if net_of is None else net_of.data_ptr(), t, B // t,
                         program.outputs, c_means, c_errs, regs.data_ptr(), lo, hi, body)
        if rc < 0:
            raise RuntimeError(f"fused quasi-Monte Carlo failed (code {rc})")

    if B:
        fused._parallel(part, B, B * samples)
    # written position by position (sampling.c's order): back to the batch's, rows x positions
    def back(x):
        return x.view(t, B // t).t().reshape(batch)

    return [back(m) for m in means], {q: back(e) for q, e in errs.items()}
