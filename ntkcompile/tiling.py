"""Evaluating a compiled kernel on batches: tiles, output arrays, memory, and checks.

``CompiledKernel.__call__`` validates its arguments and calls ``evaluate``, which

* computes the ``N1 x N2`` kernels tile by tile (against itself only the tiles on
  and above the diagonal), into arrays it allocates or the caller gives (``out=``:
  torch tensors or numpy arrays, a ``numpy.memmap`` included);
* checks memory before allocating: the output against the memory available, one
  tile's work (the most pair arrays alive at once, times the tile's entries)
  against it too, and picks tile sizes within both;
* evaluates positively homogeneous models (``passes.homogeneity``) on inputs
  rescaled by a power of two, which is exact, so that inputs of any magnitude
  keep finite intermediates;
* checks every tile for NaN and inf; a value that is not finite re-runs the tile
  with checking code and raises ``NonFiniteKernelError`` naming the first array
  that went wrong, the model nodes and source lines it comes from, and the likely
  cause (``diagnose``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Optional

import numpy as np
import torch

from . import diagnose, resources
from .codegen import NonFiniteValue
from .errors import KernelMemoryError, NonFiniteKernelError
from .kernels import bands, quadrature
from .kernels.spatial import swap_position_pairs
from .progress import Progress as _Progress
from .resources import available_memory

_GETS = ("nngp", "ntk")
_F64_BYTES = 8


def _bytes(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _transposed(block, k):
    """The ``(j, i)`` block of a kernel against itself from its ``(i, j)`` block: with ``k``
    output-position axes (a per-position readout, ``(n1, n2, *P, *P)``) the position pairs
    swap too."""
    return swap_position_pairs(block.transpose(0, 1), k)


def _outputs(out, get, n1, n2, dtype, device, extra=()):
    """The arrays results are written into: the caller's (``out``) or new ones, each
    ``(n1, n2, *extra)`` (``extra``: the output pairs' positions of a per-position readout)."""
    shape = (n1, n2, *extra)
    if out is None:
        need = math.prod(shape) * len(get) * torch.finfo(dtype).bits // 8
        have = available_memory()
        if have is not None and need > have:
            raise KernelMemoryError(
                f"the kernels need {_bytes(need)} ({len(get)} x {' x '.join(map(str, shape))} "
                f"{str(dtype).split('.')[-1]}) but "
                f"{_bytes(have)} of memory are available. Pass out= arrays to write them into, e.g. "
                f"numpy.memmap files on disk (out={{'ntk': numpy.lib.format.open_memmap('ntk.npy', 'w+', "
                f"shape={shape})}}), ask for fewer kernels (get='ntk'), or fewer inputs.")
        return {name: torch.empty(shape, dtype=dtype, device=device) for name in get}
    if not isinstance(out, dict):
        if len(get) != 1:
            raise TypeError(f"out must be a dict {{name: array}} for the kernels {get}, got {type(out).__name__}")
        out = {get[0]: out}
    missing = [g for g in get if g not in out]
    extra = [k for k in out if k not in get]
    if missing or extra:
        raise ValueError(f"out must hold exactly the kernels asked for {get}, got {sorted(out)}")
    for name, arr in out.items():
        if not (torch.is_tensor(arr) or isinstance(arr, np.ndarray)):
            raise TypeError(f"out[{name!r}] must be a torch.Tensor or a numpy array (or memmap), "
                            f"got {type(arr).__name__}")
        if tuple(arr.shape) != shape:
            raise ValueError(f"out[{name!r}] has shape {tuple(arr.shape)}, expected {shape}")
        kind = arr.dtype.is_floating_point if torch.is_tensor(arr) else np.issubdtype(arr.dtype, np.floating)
        if not kind:
            raise TypeError(f"out[{name!r}] must have a floating dtype, got {arr.dtype}")
    return out


def _write(arr, rows, cols, block):
    if torch.is_tensor(arr):
        arr[rows, cols] = block.to(arr.dtype)
    else:
        arr[rows, cols] = block.detach().cpu().numpy().astype(arr.dtype, copy=False)


def _scale_exponent(kfn, x1, x2) -> int:
    """``e`` such that inputs times ``2^-e`` are of order 1, for homogeneous models whose
    inputs are far from it (0 otherwise: no rescaling)."""
    if not kfn._homogeneous:
        return 0
    m = max(float(x.abs().max()) if x.numel() else 0.0 for x in (x1, x2) if x is not None)
    if m == 0.0 or 2.0 ** -60 < m < 2.0 ** 60:
        return 0
    return math.frexp(m)[1]


def _replicates(fn, args, kfn):
    """The tile's kernels; where Monte Carlo was used, the mean of ``kfn.mc_replicates``
    independent evaluations and the standard error of each entry (their spread)."""
    reps = max(1, kfn.mc_replicates)
    samples = kfn.mc_samples // reps
    seeds = [kfn.seed * 1_000_003 + r for r in range(reps)]
    nngp, ntk, errors = fn(*args, MC=(samples if reps > 1 else kfn.mc_samples, seeds[0]))
    if reps == 1 or not any(kind == "mc" for kind, _ in errors):
        return {"nngp": nngp, "ntk": ntk}, {}, errors
    runs = [(nngp, ntk)]
    for seed in seeds[1:]:
        a, b, errs = fn(*args, MC=(samples, seed))
        runs.append((a, b))
        errors = errors + errs
    values, stderr = {}, {}
    for i, name in enumerate(("nngp", "ntk")):
        if runs[0][i] is None:
            continue
        stack = torch.stack([r[i] for r in runs])
        values[name] = stack.mean(0)
        stderr[name] = stack.std(0, unbiased=True) / math.sqrt(reps)
    return values, stderr, [(k, e) for k, e in errors if k != "mc"]


def _cross_block(fn, n):
    """``fn`` (a kernel against itself) on ``cat(a, b)``, cut to the ``a`` x ``b`` block."""
    def block(x, MC):
        nngp, ntk, errors = fn(x, MC=MC)
        cut = lambda k: None if k is None else k[:n, n:]  # noqa: E731
        return cut(nngp), cut(ntk), errors
    return block


def _joint_cross(kfn, x1, x2, get, progress, outputs):
    """``x1`` against ``x2`` as the off-diagonal block of the kernel of ``cat(x1, x2)``."""
    n = x1.shape[0]
    both, stderr, worst = evaluate(kfn, torch.cat([x1, x2]), None, get, None, progress, None)
    for name in outputs:
        _write(outputs[name], slice(None), slice(None), both[name][:n, n:])
    return outputs, {name: se[:n, n:] for name, se in stderr.items()}, worst


class _Journal:
    """The tiles already written into disk-backed outputs (``out=`` numpy memmaps): a file
    ``<the first output's file>.tiles.json`` beside them with the layout (sizes, tile side,
    kernels) and the finished tiles, rewritten atomically after each tile is flushed to
    disk (every ``EVERY`` seconds, and at the end).  ``resume=True`` skips the tiles it
    lists (an interrupted run continues where it stopped); a journal of another layout is
    an error, not silently mixed."""

    def __init__(self, outputs, layout: dict, resume: bool):
        arrays = [outputs[name] for name in sorted(outputs)]
        files = [getattr(a, "filename", None) for a in arrays]
        self.path = None
        self.arrays, self.layout, self.done = arrays, dict(layout), set()
        self.pending, self.saved_at = [], time.monotonic()
        if not all(isinstance(a, np.memmap) and f for a, f in zip(arrays, files)):
            if resume:
                raise ValueError("resume=True needs out= arrays that are numpy memmaps (files on disk, e.g. "
                                 "numpy.lib.format.open_memmap(path, 'w+' or 'r+', ...)): tiles of other arrays "
                                 "do not survive an interruption")
            return
        self.path = str(files[0]) + ".tiles.json"
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("layout") != self.layout:
                raise ValueError(f"resume=True: the journal {self.path} was written for another computation "
                                 f"({saved.get('layout')}), not this one ({self.layout}); delete it to start over")
            self.done = {tuple(t) for t in saved.get("done", [])}
        else:
            self._save()

    @staticmethod
    def saved_tile(outputs) -> Optional[int]:
        """The tile side of an existing journal of ``outputs`` (so a resumed run tiles alike)."""
        filename = getattr(outputs[sorted(outputs)[0]], "filename", None)
        path = None if filename is None else str(filename) + ".tiles.json"
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f).get("layout", {}).get("tile")

    # Seconds between journal updates: each flushes the whole mapped files to disk (an
    # msync that scans them, 0.5 s for two 12.8 GB files), so it is not done per tile; an
    # interruption loses at most this much work.
    EVERY = 10.0

    def finished(self, tile) -> bool:
        return tile in self.done

    def mark(self, tile, force=False):
        if self.path is None:
            return
        self.pending.append(tile)
        if force or time.monotonic() - self.saved_at >= self.EVERY:
            self.close()

    def close(self):
        """Flush the outputs, then record the tiles written since the last update."""
        if self.path is None or not self.pending:
            return
        for a in self.arrays:
            a.flush()
        self.done.update(self.pending)
        self.pending = []
        self._save()

    def _save(self):
        self.saved_at = time.monotonic()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"layout": self.layout, "done": sorted(self.done)}, f)
        os.replace(tmp, self.path)


def _ranks(distributed):
    """``(rank, world size)`` of the ``torch.distributed`` process group the tiles are
    spread over, or ``(0, 1)``."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group "
                           "(torchrun, then torch.distributed.init_process_group('gloo' or 'nccl'))")
    return dist.get_rank(), dist.get_world_size()


def _gather(outputs, stderr, out, world):
    """Every rank's tiles into every rank's result: a sum of the disjoint tiles written into
    zeros (in memory), or a barrier after each rank flushed its tiles into the shared files."""
    if world == 1:
        return
    import torch.distributed as dist
    if out is not None and all(isinstance(a, np.memmap) for a in outputs.values()):
        for a in outputs.values():
            a.flush()
        dist.barrier()
    else:
        for a in list(outputs.values()):
            if not torch.is_tensor(a):
                raise ValueError("distributed=True writes into torch tensors or numpy memmaps (a file every "
                                 "rank shares), not into other numpy arrays")
            dist.all_reduce(a)
    like = next(iter(outputs.values()))
    device = like.device if torch.is_tensor(like) else torch.device("cpu")      # NCCL reduces on the GPU
    flag = torch.tensor([float(bool(stderr))], device=device)     # a rank without Monte Carlo tiles has none yet
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not stderr:
        for name in outputs:
            stderr[name] = torch.zeros(tuple(like.shape), dtype=torch.float64, device=device)
    for name in sorted(stderr):
        dist.all_reduce(stderr[name])


def evaluate(kfn, x1, x2, get, tile_size, progress, out, resume=False, distributed=False):
    """The kernels of ``x1`` against ``x2`` (``x2 is None``: against itself), their
    Monte Carlo standard errors (empty when none was used), and the worst error
    estimate of each kind; see the module.  ``distributed``: this process computes every
    ``world``-th tile of the same list (``torch.distributed``), and all get the whole result."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    dtype = kfn.dtype
    if x1.device.type == "cpu":
        resources.keep_heap()        # tiles reuse freed arrays instead of faulting in new pages
    extra = tuple(kfn.output_positions or ()) * 2
    outputs = _outputs(out, get, n1, n2, dtype, x1.device, extra)
    stderr: dict = {}
    if n1 == 0 or n2 == 0:
        return outputs, stderr, {}
    bs = tile_size
    if kfn._joint and not tile_size:
        # Sampled jointly: the more inputs one sample covers the fewer samples in all.  A
        # cross kernel that fits is a block of one kernel of both batches together; else
        # tiles of half the side, since a cross tile samples its two batches together.
        side = kfn._joint_side(n1 + (0 if x2 is None else n2))
        if x2 is not None and n1 + n2 <= side:
            return _joint_cross(kfn, x1, x2, get, progress, outputs)
        bs = n1 if x2 is None and n1 <= side else max(1, side // 2)
    e = _scale_exponent(kfn, x1, x2)
    if e:
        x1 = torch.ldexp(x1, torch.tensor(-e))
        x2 = None if x2 is None else torch.ldexp(x2, torch.tensor(-e))
    want_ntk = "ntk" in get
    live = max(kfn._function(mode, want_ntk)[0].live_arrays for mode in (True, False))
    if resume and bs is None and out is not None:
        bs = _Journal.saved_tile(outputs)           # resume with the interrupted run's tiles
    cores = _tile_workers(kfn, x1.device)
    if not bs:
        bs = kfn._auto_tile(max(n1, n2), x1.device)
        if cores > 1 and (n1 * n2 * kfn._pair_work() >= _SPLIT_WORK or _count_tiles(bs, n1, n2, x2 is None) > 1):
            # N-D quasi-Monte Carlo: each tile redoes its inputs' same-input expectations (at
            # qmc.SAME_INPUT_BOOST times the points), so one tile per worker
            per_worker = 1 if kfn._nd_calls() else _TILES_PER_WORKER
            bs = _enough_tiles(bs, n1, n2, x2 is None, per_worker * cores)
    bs, fit, split = _fit_memory(kfn, bs, live, tile_size is not None, cores)
    tiles = [(i, j) for i in range(0, n1, bs) for j in range(0, n2, bs) if x2 is not None or j >= i]
    rank, world = _ranks(distributed)
    if world > 1 and resume:
        raise ValueError("resume=True with distributed=True: resume an interrupted computation in one process")
    journal = _Journal(outputs, {"n1": n1, "n2": n2, "tile": bs, "get": sorted(get), "self": x2 is None},
                       resume) if out is not None and world == 1 else None
    skipped = [t for t in tiles if journal is not None and journal.finished(t)]
    tiles = [t for t in tiles if journal is None or not journal.finished(t)]
    if world > 1:
        for a in outputs.values():       # each rank's tiles are summed into the others' zeros
            if torch.is_tensor(a):
                a.zero_()
        tiles = tiles[rank::world]
    # bands of few tiles are shared out, so that every core has work: unit (tile, part)
    parts = max(1, min(len(split.boxes), -(-cores // max(1, len(tiles))))) if split is not None else 1
    units = [(t, p) for t in tiles for p in range(parts)]
    workers = min(fit, len(units))
    if workers > 1:     # largest first, so that the last tiles to finish are small ones
        units.sort(key=lambda u: -_tile_work(u[0], bs, n1, n2, x2 is None))

    def compute(unit):
        tile, part = unit
        i, j = tile
        a = x1[i:i + bs]
        self_tile = x2 is None and i == j
        b = None if self_tile else (x1 if x2 is None else x2)[j:j + bs]
        args = (a,) if self_tile else (a, b)
        fn = kfn._function(self_tile or kfn._joint, want_ntk)[0]
        if self_tile and split is not None and split.cross:     # (kernels.bands.Split)
            fn, args = kfn._function(False, want_ntk)[0], (a, a)
        if kfn._joint and not self_tile:      # sampled jointly: a block of both batches' kernel
            fn, args = _cross_block(fn, a.shape[0]), (torch.cat([a, b]),)
        quadrature.PROGRESS.hook = bar.within(tile)
        try:
            with torch.no_grad():                 # grad mode is per thread
                if split is not None:             # in bands of positions (kernels.bands)
                    return tile, self_tile, args, split.run(lambda: _replicates(fn, args, kfn),
                                                            lambda: bar.add(tile, 1 / len(split.boxes)),
                                                            (part, parts))
                return tile, self_tile, args, _replicates(fn, args, kfn)
        finally:
            quadrature.PROGRESS.hook = None

    errors = []
    bar = _Progress(len(tiles), progress, kfn._nd_calls(), split is not None)
    results = _in_parallel(compute, units, workers)
    partial: dict = {}         # tile -> [parts received, their blocks summed]
    with torch.no_grad(), contextlib.closing(results):
        for (i, j), self_tile, args, (blocks, errs_se, errs) in results:
            errors += errs     # (kind, 0-d tensor) pairs, converted once at the end
            if parts > 1:
                got = partial.setdefault((i, j), [0, {}])
                got[0] += 1
                bands.add_blocks(got[1], blocks)
                if got[0] < parts:
                    continue
                blocks = partial.pop((i, j))[1]
            for name, se in errs_se.items():
                if name in outputs:
                    if name not in stderr:
                        stderr[name] = torch.zeros((n1, n2, *extra), dtype=torch.float64, device=x1.device)
                    se = torch.ldexp(se, torch.tensor(2 * e)) if e else se
                    stderr[name][i:i + bs, j:j + bs] = se
                    if x2 is None and i != j:
                        stderr[name][j:j + bs, i:i + bs] = _transposed(se, len(extra))
            for name in ("nngp", "ntk"):
                block = blocks.get(name)
                if name not in outputs:
                    continue
                if e:
                    block = torch.ldexp(block, torch.tensor(2 * e))    # exact: a power of two
                if not _finite(block):
                    raise _non_finite(kfn, name, (self_tile and len(args) == 1) or kfn._joint, want_ntk, args, e,
                                      x1, x2, split)
                if dtype != torch.float64 and not _finite(block.to(dtype)):
                    raise NonFiniteKernelError(
                        f"the {name} kernel overflows {dtype}: its largest entry is {float(block.abs().max()):.3g}; "
                        "compute it in float64 (the default dtype)")
                # closed forms and quadrature run in float64; float32 is rounded here
                _write(outputs[name], slice(i, i + bs), slice(j, j + bs), block)
                if x2 is None and i != j:
                    _write(outputs[name], slice(j, j + bs), slice(i, i + bs), _transposed(block, len(extra)))
            if journal is not None:
                journal.mark((i, j))
            bar.step((i, j))
    bar.close()
    if journal is not None:
        journal.close()
    _gather(outputs, stderr, out, world)
    for name in stderr:             # tiles written by an earlier run: their errors are not known here
        for i, j in skipped:
            stderr[name][i:i + bs, j:j + bs] = math.nan
            stderr[name][j:j + bs, i:i + bs] = math.nan
    return outputs, stderr, worst_errors(errors)


def worst_errors(errors) -> dict:
    """The worst error estimate of each kind among ``(kind, 0-d tensor)`` pairs (a non-finite
    one wins: it must be reported, not maxed away)."""
    worst = {}
    for kind, err in errors:
        err = float(err)
        worst[kind] = err if not math.isfinite(err) else max(worst.get(kind, 0.0), err)
    return worst


def _fit_memory(kfn, bs, live, given, workers=1, bandable=True):
    """A tile side whose work (``live`` pair arrays) fits in the memory available, how
    many of up to ``workers`` such tiles fit at once (one always does), and the split of
    each pair's work into bands of positions when one pair's does not fit (else None)."""
    have = available_memory()
    if have is None:
        return bs, workers, None
    per_pair = kfn._pair_entries() * _F64_BYTES * live
    budget = have // 2                      # leave room for the output, quadrature grids, torch
    split = None
    if per_pair > budget:
        try:
            if not bandable:
                raise bands.NotBandable("the examples are coupled")
            split = _bands(kfn, live, budget, workers)
        except bands.NotBandable as why:
            raise KernelMemoryError(
                f"one pair of inputs needs about {_bytes(per_pair)} of work ({live} arrays of "
                f"{kfn._pair_entries()} position pairs), more than the {_bytes(budget)} ntkcompile allows "
                f"itself of the {_bytes(have)} available, and it cannot be split into bands of positions "
                f"({why}). Use smaller images, a flatten readout (which needs only aligned positions), or "
                f"pooling earlier in the network.") from None
        per_pair = split.entries * _F64_BYTES * live
    fits = max(1, int(math.sqrt(budget / per_pair)))
    if bs > fits:
        if given:
            raise KernelMemoryError(
                f"tile_size={bs} needs about {_bytes(per_pair * bs * bs)} of work per tile, more than "
                f"{_bytes(budget)}; use tile_size={fits} or less (or leave it unset)")
        bs = fits
    return bs, int(max(1, min(workers, budget // (per_pair * bs * bs)))), split


def _bands(kfn, live, budget, workers):
    """The split into bands of positions that takes least time: bands small enough for every
    worker to compute one at once, or larger ones one at a time (fewer rows recomputed at
    their edges); ``kernels.bands.NotBandable`` if neither fits."""
    best, why = None, None
    for w in sorted({max(1, workers), 1}):
        try:
            split = bands.Split.plan(kfn, _F64_BYTES * live, budget // w)
        except bands.NotBandable as e:
            why = e
            continue
        if best is None or split.cost / w < best[0]:
            best = (split.cost / w, split)
    if best is None:
        raise why
    return best[1]


def _tile_workers(kfn, device) -> int:
    """How many tiles to compute at once: one per intra-op thread on a CPU, each tile
    single-threaded (``_in_parallel``); one at a time on other devices, for ``jit=True``
    (compiled functions are not called from several threads) and for joint Monte Carlo
    models (whose tiles are sized to take the memory by themselves)."""
    if device.type != "cpu" or kfn.jit or kfn._joint:
        return 1
    return max(1, torch.get_num_threads())


def _tile_work(tile, bs, n1, n2, self_kernel) -> int:
    """The input pairs a tile computes: a diagonal tile of a self kernel, its packed half."""
    i, j = tile
    rows, cols = min(bs, n1 - i), min(bs, n2 - j)
    return rows * (rows + 1) // 2 if self_kernel and i == j else rows * cols


def _count_tiles(bs, n1, n2, self_kernel) -> int:
    k1, k2 = -(-n1 // bs), -(-n2 // bs)
    return k1 * (k1 + 1) // 2 if self_kernel else k1 * k2


# Entries a kernel must evaluate (``CompiledKernel._pair_work`` per pair) before it is
# split into a tile per core: below it, tiles' Python overhead, which threads do not
# share, costs more than a core gives (tens of milliseconds of work).
_SPLIT_WORK = 2 ** 22


def balanced(n, side) -> int:
    """The side of equal tiles, at most ``side``, covering ``n`` inputs in as few tiles
    (2000 inputs at side 512 -> 4 x 500 rather than 3 x 512 + 464)."""
    return -(-n // -(-n // side))


# Tiles per worker that a kernel split over several is cut into at least: the cores then
# finish together (largest tiles first; the last ones small).  Two cores, two workers:
# mlp8_relu 6 -> 10 tiles, median 56.4 -> 54.3 ms; mlp4_tanh (100 inputs, quadrature)
# 3 -> 10 tiles, 1.52 -> 1.33 s; cnn3_gap's 21 tiles are enough.  Not for N-D quasi-Monte Carlo
# (a 3-block ResNet v1 on 4 inputs of 3x8x8, 512 points: 10 tiles 16.3 s, 3 tiles 11.4 s).
_TILES_PER_WORKER = 4


def _enough_tiles(bs, n1, n2, self_kernel, want) -> int:
    """The automatic tile side, shrunk one tile a side at a time (balanced) until there
    are ``want`` tiles: a kernel of few inputs whose pairs are expensive (quadrature, whose
    nodes the tile size does not count) then still runs on every core."""
    n = max(n1, n2)
    k = -(-n // bs)
    while bs > 1 and _count_tiles(bs, n1, n2, self_kernel) < want:
        k += 1
        bs = -(-n // k)
    return bs


def _in_parallel(compute, tiles, workers):
    """``compute(tile)`` for every tile, yielded as each finishes (in order when
    ``workers == 1``).

    With ``workers > 1`` that many tiles run at once in threads, and every torch op runs
    on one thread (``torch.set_num_threads(1)``, restored afterwards).  The tiles' ops are
    small (cache-sized arrays), so splitting each op over the cores costs a
    synchronization per op; whole tiles per core need none.  Measured on the 2-core
    machine (benchmarks/bench_threads.py): as fast when idle (0.95-1.37x), and 1.5-2.2x
    faster when other processes keep both cores half busy (splitting each op then waits
    at every op for its descheduled thread).  At most ``2 * workers`` tiles are in flight,
    so the results waiting to be written stay a few tiles.
    """
    if workers <= 1:
        for t in tiles:
            yield compute(t)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ntkcompile-tile")
    try:
        todo = iter(tiles)
        pending = {pool.submit(compute, t) for t in itertools.islice(todo, 2 * workers)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for t in itertools.islice(todo, len(done)):
                pending.add(pool.submit(compute, t))
            for f in done:
                yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _finite(t) -> bool:
    """Every entry of ``t`` finite: one pass (the sum) when so, four (``isfinite``) only when the
    sum is not (a NaN or inf, or finite entries whose sum overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _non_finite(kfn, name, self_tile, want_ntk, args, e, x1, x2, split=None):
    """The error for a tile whose kernel ``name`` is not finite (re-run with checking code,
    band by band when its positions are split: ``kernels.bands``)."""
    x_max = max(float(x.abs().max()) for x in (x1, x2) if x is not None) * 2.0 ** e
    try:
        with torch.no_grad():
            for band in (split.boxes if split is not None else [None]):
                with bands.using(band):
                    kfn._function(self_tile, want_ntk, check=True)[0](*args)
    except NonFiniteValue as failure:
        return NonFiniteKernelError(diagnose.explain(kfn._program, failure, name, x_max))
    if e:
        return NonFiniteKernelError(
            f"the {name} kernel exceeds the range of float64: it scales with |x|^2 and the inputs are of "
            f"scale {x_max:.3g}; rescale them")
    return NonFiniteKernelError(f"the {name} kernel has NaN or inf entries, and no intermediate array does: "
                                "please report this")


def warn_about(worst, degree, nd_degree):
    """Warn when an error estimate is large (or NaN), naming the knob that helps."""
    nd = nd_degree or max(16, degree // 3)
    for kind, knob, value in (("quad", "quadrature_degree", degree), ("quad_nd", "nd_degree", nd)):
        q = worst.get(kind)
        if q is not None and not q <= QUAD_WARN:
            now = f"{value}" if kind == "quad" or nd_degree else f"{value} (in 3 dimensions)"
            bigger = f"e.g. {2 * value}"
            warnings.warn(
                f"ntkcompile: estimated quadrature error {q:.1e} (relative), from the change between "
                f"{now} nodes per dimension and half as many, after refinement; steep activations at "
                f"large pre-activation variances need more nodes: compile with a larger {knob}, {bigger}. "
                "Kernels.quad_error reports the estimate.",
                RuntimeWarning, stacklevel=3)


# Quadrature error estimate above which a call warns.  The estimate is conservative
# (true errors measured 30-250x smaller on tanh nets), so this means errors ~1e-6.
QUAD_WARN = 1e-4
