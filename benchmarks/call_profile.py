"""Where a warm kernel call's time goes, helper by helper and program by program.

    python benchmarks/call_profile.py [--case cnn3_gap] [--threads 1] [--repeats 3]

Compiles a case of ``bench_vs_neural_tangents.py`` (same model, same inputs), makes one
warm call, then times the next calls with every runtime helper of the generated code
wrapped (``stencil_pair``, ``program``, ``global_mean``, ...; ``torch.einsum`` and the inline
torch ops are the rest) and every fused program timed on its own, with its cost per entry.
One thread by default: per-entry costs then do not mix with the second core's contention
(two tiles on two cores each ran 1.2-1.45x slower than one alone here).  The best of
``--repeats`` calls is shown.

``--isolated N``: then runs each distinct program once more on the inputs of its first
large call (>= 100k entries), N times in a row, and shows the best: a per-program cost that
the rest of the call does not disturb (within 2-3% between runs on this noisy VM, where
whole calls move by 15%), for A/B runs of a change to fused.c against another checkout
(``PYTHONPATH=<checkout> python <checkout>/benchmarks/call_profile.py --isolated 15``).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ntkcompile  # noqa: E402
from ntkcompile.kernels import fused  # noqa: E402
from bench_vs_neural_tangents import CASES, build_torch_model, make_inputs  # noqa: E402


def _timed(fn, acc, key):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[key] += time.perf_counter() - t
        return out
    return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="cnn3_gap", choices=sorted(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isolated", type=int, default=0, metavar="N",
                        help="also time each program alone, best of N runs on its first large call's inputs")
    args = parser.parse_args(argv)
    spec = CASES[args.case]
    torch.manual_seed(0)
    kfn = ntkcompile.compile(build_torch_model(args.case), W_std=spec["W_std"], b_std=spec["b_std"])
    x = torch.as_tensor(make_inputs(args.case, 0), dtype=torch.float64)
    kfn(x, progress=False)

    helpers: dict = collections.defaultdict(float)
    for fn, _ in kfn._fns.values():
        names = fn.__globals__
        for name, value in list(names.items()):
            if callable(value) and not isinstance(value, type) and not name.startswith("_") \
                    and not (name[:4] == "prog" and name[4:].isdigit()) and not name.startswith("geom"):
                names[name] = _timed(value, helpers, name)
    programs: dict = collections.defaultdict(lambda: [0.0, 0])
    run = fused.program

    first: dict = {}      # program -> (leaves, shape) of its first large call

    def program(prog, leaves, shape):
        if shape.numel() >= 100_000 and prog not in first:
            first[prog] = (list(leaves), shape)
        t = time.perf_counter()
        out = run(prog, leaves, shape)
        cost = programs[prog]
        cost[0] += time.perf_counter() - t
        cost[1] += shape.numel()
        return out

    fused.program = program
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        best = None
        for _ in range(args.repeats):
            helpers.clear()
            programs.clear()
            t = time.perf_counter()
            kfn(x, progress=False)
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, dict(helpers), {p: tuple(c) for p, c in programs.items()})
    finally:
        fused.program = run
        torch.set_num_threads(threads)
    total, helpers, programs = best
    print(f"{args.case}: warm call {total:.3f} s on {args.threads} thread(s); helpers {sum(helpers.values()):.3f} s")
    for name, t in sorted(helpers.items(), key=lambda kv: -kv[1]):
        if t >= 0.001:
            print(f"  {name:28s} {t:7.3f} s")
    print("fused programs (steps, inputs, outputs): time, per entry")
    for prog, (t, n) in sorted(programs.items(), key=lambda kv: -kv[1][0]):
        if t >= 0.001:
            print(f"  ({len(prog.steps):2d}, {prog.n_leaves:2d}, {len(prog.outputs)})  {t:7.3f} s  "
                  f"{t * 1e9 / max(n, 1):6.2f} ns over {n:,} entries")
    if args.isolated:
        print(f"each program alone, best of {args.isolated} runs on its first large call's inputs:")
        torch.set_num_threads(args.threads)
        try:
            for prog, (leaves, shape) in first.items():
                best = min(_alone(run, prog, leaves, shape) for _ in range(args.isolated))
                print(f"  ({len(prog.steps):2d}, {prog.n_leaves:2d}, {len(prog.outputs)})  {tuple(shape)}  "
                      f"{best * 1e9 / shape.numel():6.2f} ns per entry")
        finally:
            torch.set_num_threads(threads)


def _alone(run, prog, leaves, shape) -> float:
    t = time.perf_counter()
    run(prog, leaves, shape)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
