"""How much of the machine a kernel call uses: its array traffic and flops against the
machine's measured memory bandwidth and float64 matmul rate.

* ``machine_peaks()``: the bandwidth of ``out = a + b`` over 256 MiB float64 arrays
  (3 arrays' bytes per pass, as STREAM's "add"), and the flop rate of a 2048 x 2048
  float64 matmul, each the best of a few runs, with every torch thread.
* ``traffic(kfn, x)``: the bytes every torch op (views excluded) and every fused kernel
  (``ntkcompile.kernels.fused``) of one call reads and writes (inputs and outputs, as if none stayed in cache: more than the DRAM traffic,
  since the tiles are sized for cache) and the flops of its matmuls and einsums
  (``torch.utils.flop_counter``), counted in one tile-at-a-time call (dispatch modes are
  per thread).
"""
import contextlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ntkcompile import tiling
from ntkcompile.kernels import fused


def machine_peaks(repeats: int = 5) -> dict:
    n = 2 ** 25                                   # 256 MiB per float64 array
    a, b = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    out = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 3 * n * 8 / best
    m = torch.rand(2048, 2048, dtype=torch.float64)
    m @ m
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        m @ m
        best = min(best, time.perf_counter() - t0)
    return {"bandwidth_Bps": bandwidth, "flops_per_s": 2 * 2048 ** 3 / best}


class _Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):       # a view moves no data
            return out
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes += t.numel() * t.element_size()
        return out


@contextlib.contextmanager
def one_tile_at_a_time(on: bool = True):
    """ntkcompile's earlier CPU path (``on``): tiles one after another, each op split over
    the cores by torch, instead of a tile per core (``tiling._tile_workers``)."""
    original = tiling._tile_workers
    if on:
        tiling._tile_workers = lambda *args: 1
    try:
        yield
    finally:
        tiling._tile_workers = original


def traffic(kfn, x) -> dict:
    with one_tile_at_a_time():       # dispatch modes see only their own thread's ops
        counter, flops = _Bytes(), FlopCounterMode(display=False)
        with counter, flops, fused.metered() as meter:
            kfn(x, progress=False)
        return {"bytes": counter.bytes + meter.bytes, "flops": flops.get_total_flops()}


def fractions(work: dict, seconds: float, peaks: dict) -> str:
    bw = work["bytes"] / seconds / peaks["bandwidth_Bps"]
    fl = work["flops"] / seconds / peaks["flops_per_s"]
    return (f"{work['bytes'] / 2**30:.1f} GiB read and written by its ops, {bw:.2f}x the DRAM add "
            f"bandwidth (cache-sized tiles); {work['flops'] / 1e9:.2f} GFLOP in matmuls/einsums, "
            f"{fl:.1%} of the matmul rate")
