"""Tiles per core against ops split over the cores, on an idle and on a busy machine.

ntkcompile's default CPU path computes one tile per core, each tile's ops on one
thread (``tiling._in_parallel``).  The peer, in the same process on the same inputs,
is the previous default: one tile at a time, every op split over all cores by torch.
Each is timed with the machine idle and while other processes keep every core about
half busy (one process per core, spinning ``--duty`` of every 10 ms), the condition
under which splitting each op over the cores degraded worst (issue 12: 34x on
cnn3_gap).  Both paths must give the same kernels; the script checks it.

    python benchmarks/bench_threads.py [--repeats 3] [--duty 0.5] [--cases mlp8_relu,cnn3_gap,mlp4_tanh]
"""
import argparse
import os
import sys
import time

import torch

import ntkcompile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _load import Busy  # noqa: E402
from _roofline import one_tile_at_a_time  # noqa: E402
from bench_vs_neural_tangents import CASES, build_torch_model, make_inputs  # noqa: E402


def cases(names):
    """The cases of bench_vs_neural_tangents.py (same models, inputs and W_std, b_std)."""
    out = {}
    for name in names:
        spec = CASES[name]
        torch.manual_seed(0)
        x = torch.as_tensor(make_inputs(name, 0), dtype=torch.float64)
        out[name] = (build_torch_model(name), x, dict(W_std=spec["W_std"], b_std=spec["b_std"]))
    return out


def timed(kfn, x, per_op):
    """Seconds of one call ``kfn(x)``; ``per_op``: the peer path (one tile at a time)."""
    with one_tile_at_a_time(per_op):
        t0 = time.perf_counter()
        k = kfn(x, progress=False)
        return time.perf_counter() - t0, k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duty", type=float, default=0.5)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    print(f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; best of {args.repeats} warm calls, "
          f"the two paths interleaved; busy = {os.cpu_count()} processes each spinning {args.duty:.0%} of the time")
    print(f"{'case':<10} {'condition':<6} {'ops split (old)':>16} {'tile per core':>14} {'speed-up':>9}")
    for name, (model, x, kw) in cases(args.cases.split(",")).items():
        kfn = ntkcompile.compile(model, **kw)
        _, ref = timed(kfn, x, True)
        _, new = timed(kfn, x, False)
        diff = max(float((getattr(ref, k) - getattr(new, k)).abs().max() / getattr(ref, k).abs().max())
                   for k in ("nngp", "ntk"))
        best = {}
        for cond in ("idle", "busy"):
            times = {True: [], False: []}
            with Busy(args.duty if cond == "busy" else 0.0):
                for _ in range(args.repeats):
                    for per_op in (True, False):
                        times[per_op].append(timed(kfn, x, per_op)[0])
            best[cond] = (min(times[True]), min(times[False]))
            print(f"{name:<10} {cond:<6} {best[cond][0]:>14.3f} s {best[cond][1]:>12.3f} s "
                  f"{best[cond][0] / best[cond][1]:>8.2f}x", flush=True)
        print(f"{'':<10} busy/idle slow-down: ops split {best['busy'][0] / best['idle'][0]:.2f}x, tile per core "
              f"{best['busy'][1] / best['idle'][1]:.2f}x; kernels differ by {diff:.1e} (relative max)")


if __name__ == "__main__":
    main()
