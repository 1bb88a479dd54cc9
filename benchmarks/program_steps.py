"""What the steps of a fused program cost (``ntkcompile/kernels/program.py``), per entry.

    python benchmarks/program_steps.py [--entries 262144] [--repeats 20]

Each row is a small program over float64 arrays of ``--entries`` entries (2 MiB each by
default: the size of a default tile's pair arrays), timed on one thread three ways in the
same process: the C program, the same steps as one fused rule at a time (what the default
path ran before programs), and the same steps as torch ops (``fused.disabled()``).  The
ratios are against the program.  The last row is one layer of a relu MLP's pair chain as
codegen writes it (angle, V-transform, affine map, the derivative's V-transform, the NTK
update).
"""
from __future__ import annotations

import argparse
import time

import torch

from ntkcompile.kernels import fused, program
from ntkcompile.ops.activations import _relu_family


def _best(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def programs():
    relu = _relu_family("relu", torch.relu, 1.0, 0.0)
    k11, k12, k22, ntk = (("leaf", i) for i in range(4))
    th = ("step", 0)
    layer = [("angle", (k11, k12, k22)), ("rule", (k11, k12, k22, th), relu.vt_angle),
             ("mul", (2.25, ("step", 1))), ("add", (("step", 2), 0.0025)),
             ("rule", (k11, k12, k22, th), relu.dvt_angle), ("mul", (2.25, ntk, ("step", 4))),
             ("add", (("step", 3), ("step", 5)))]
    return {
        "load and store": [("add", (k12, 0.5))],
        "8 sums": [("add", (k12, 0.5))] + [("add", (("step", i), 0.5)) for i in range(7)],
        "angle": [("angle", (k11, k12, k22))],
        "angle + relu": layer[:2],
        "angle + relu + step": [layer[0], layer[1], layer[4], ("add", (("step", 1), ("step", 2)))],
        "one relu MLP layer (pair chain)": layer,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1 << 18)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not fused.available():
        raise SystemExit(f"the fused kernels are unavailable: {fused.status()}")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = args.entries
    k11, k22 = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    k12 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * (k11 * k22).sqrt()
    leaves = [k11, k12, k22, torch.rand(n, generator=gen, dtype=torch.float64)]
    print(f"{n} entries per array, float64, one thread; ns per entry")
    print(f"{'program':34s} {'C program':>10s} {'rule by rule':>13s} {'torch ops':>10s}")
    for name, steps in programs().items():
        prog = program.Program(steps, len(leaves), [len(steps) - 1])
        t_prog = _best(lambda: program.run(prog, k11, *leaves), args.repeats)
        t_rules = _best(lambda: program._torch(prog, k11, leaves), args.repeats)
        with fused.disabled():
            t_torch = _best(lambda: program._torch(prog, k11, leaves), args.repeats)
        ns = lambda t: t / n * 1e9  # noqa: E731
        print(f"{name:34s} {ns(t_prog):10.2f} {ns(t_rules):7.2f} ({t_rules / t_prog:4.1f}x) "
              f"{ns(t_torch):5.2f} ({t_torch / t_prog:4.1f}x)")


if __name__ == "__main__":
    main()
