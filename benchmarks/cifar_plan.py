"""Plan a CNN-GAP kernel of CIFAR-sized inputs: time it on a slice, extrapolate the whole.

The classic infinite-width benchmark is the CNN-GAP NTK of CIFAR-10 (Arora et al. 2019,
Novak et al. 2019): a global-average-pooled CNN needs every pair of positions of every
pair of inputs, ``(32 * 32)^2`` entries per pair of images.  This script compiles
``depth`` x [Conv2d 3x3 SAME, ReLU] + global average pooling + Linear, times kernels on a
slice of random 3x32x32 inputs (the time does not depend on the values) on this machine,
and extrapolates to ``N`` inputs:

* per pair of inputs: a cross tile ``kfn(a, b)`` of ``slice x slice`` inputs (warm, best of
  ``--repeats``), divided by ``slice^2``;
* the whole kernel against itself computes ``N (N + 1) / 2`` pairs (tiles on and above the
  diagonal), so its time is that many times the per-pair time;
* memory: the two ``N x N`` float64 outputs, plus one tile's work (``kfn``'s estimate).

Run ``python benchmarks/cifar_plan.py`` (``--help`` for the options); it prints one table
and, with ``--json PATH``, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

import ntkcompile


def model(depth: int, width: int = 64) -> nn.Module:
    layers, c = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def plan(depth: int, n: int, side: int, repeats: int, size: int, seed: int) -> dict:
    kfn = ntkcompile.compile(model(depth), W_std=1.4, b_std=0.1, input_shape=(3, size, size))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(side, 3, size, size, generator=g, dtype=torch.float64)
    b = torch.randn(side, 3, size, size, generator=g, dtype=torch.float64)
    kfn(a[:1], b[:1], progress=False)                       # render and warm up
    cross = _best(lambda: kfn(a, b, progress=False), repeats)
    per_pair = cross / side ** 2
    pairs = n * (n + 1) // 2
    total = per_pair * pairs
    out_bytes = 2 * n * n * 8
    return {
        "depth": depth, "image": f"3x{size}x{size}", "n": n, "slice": side, "threads": torch.get_num_threads(),
        "cross_tile_s": cross, "per_pair_s": per_pair, "pairs": pairs, "total_s": total,
        "total_days": total / 86400, "output_gib": out_bytes / 2 ** 30,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="3", help="comma-separated CNN depths (default 3)")
    p.add_argument("--n", type=int, default=10_000, help="inputs of the kernel to extrapolate to")
    p.add_argument("--slice", type=int, default=4, help="inputs per side of the timed cross tile")
    p.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = [plan(int(d), args.n, args.slice, args.repeats, args.size, args.seed) for d in args.depths.split(",")]
    print(f"{'depth':>5} {'image':>9} {'slice':>5} {'cross tile':>11} {'per pair':>10} {'pairs':>12} "
          f"{'extrapolated':>14} {'outputs':>9}")
    for r in rows:
        print(f"{r['depth']:>5} {r['image']:>9} {r['slice']:>5} {r['cross_tile_s']:>10.2f}s {r['per_pair_s']:>9.3f}s "
              f"{r['pairs']:>12,} {r['total_days']:>10.1f} days {r['output_gib']:>7.2f}GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
