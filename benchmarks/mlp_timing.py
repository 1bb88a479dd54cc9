"""Time the compiled NNGP+NTK of a 10-layer MLP on 500 inputs (issue 2's figure).

Reports the first call (tracing, planning, codegen included) and the best of 3
warm calls, for ReLU (closed forms) and tanh (2-D trapezoidal rule, 96 x 96
nodes per input pair plus the error estimate, so it runs on --n-tanh inputs) activations,
next to a peer in the same process: the empirical NTK of the same MLP at width
256 via torch.func on the same inputs.

    python benchmarks/mlp_timing.py [--n 500] [--depth 10]
"""
import argparse
import time

import torch
from torch import nn

import ntkcompile
from ntkcompile.empirical import empirical_ntk


def mlp(d, n, depth, act):
    layers, fan = [], d
    for _ in range(depth):
        layers += [nn.Linear(fan, n), act()]
        fan = n
    return nn.Sequential(*layers, nn.Linear(fan, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--n-tanh", type=int, default=100)
    args = ap.parse_args(argv)
    x = torch.randn(args.n, args.d, dtype=torch.float64)
    print(f"{args.depth}-layer MLP, {args.n} inputs of dim {args.d}, NNGP+NTK x vs x, float64, "
          f"{torch.get_num_threads()} threads")
    times = {}
    for act, n in ((nn.ReLU, args.n), (nn.Tanh, args.n_tanh)):
        xa = x[:n]
        t0 = time.perf_counter()
        kfn = ntkcompile.compile(mlp(args.d, 64, args.depth, act), W_std=1.5, b_std=0.1)
        kfn(xa)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            kfn(xa)
            warm.append(time.perf_counter() - t0)
        times[act.__name__] = min(warm)
        print(f"  {act.__name__:<5} ({n} inputs) compiled kernel: first call {cold:.3f} s, warm best of 3 {min(warm):.3f} s")
    torch.manual_seed(0)
    net = ntkcompile.ntk_parametrize(mlp(args.d, 256, args.depth, nn.ReLU).double(), W_std=1.5, b_std=0.1)
    t0 = time.perf_counter()
    empirical_ntk(net, x)
    emp = time.perf_counter() - t0
    print(f"  peer: empirical NTK (torch.func) of the ReLU MLP at width 256: {emp:.3f} s "
          f"(ratio empirical/compiled = {emp / times['ReLU']:.1f}x)")


if __name__ == "__main__":
    main()
