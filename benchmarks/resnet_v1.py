"""Time the kernels of a post-activation ResNet (ResNet v1 blocks, no BatchNorm): issue 12, item 3.

``relu(x + conv(relu(conv(x))))`` makes block ``l``'s output an H-var of ``l + 1`` G-vars, so
its pair expectations go to the N-D evaluator (quasi-Monte Carlo: scrambled Sobol points,
``mc_samples`` split into ``mc_replicates`` independent replicates whose spread is the
reported standard error).  The peer, in the same process and on the same inputs, is the same
compiled kernel with the Sobol points replaced by independent normal draws (what the
evaluator used before): for each sampler the run reports the time of the first call and the
largest standard error, relative to the entry (NNGP and NTK).  ``(se_iid / se_sobol)^2`` is
how many more independent draws would give the Sobol points' error.

    python benchmarks/resnet_v1.py [--cases 2x4x3,4x6x3] [--samples 32768] [--threads 2]

A case ``NxHxB`` is N inputs of 3 x H x H through a stem convolution, B blocks and global
average pooling (16 channels; the width does not change the infinite-width kernels).
"""
import argparse
import time

import torch
from torch import nn

import ntkcompile
from ntkcompile.kernels import quadrature


class ResNetV1(nn.Module):
    def __init__(self, blocks, c=3, n=16):
        super().__init__()
        self.stem = nn.Conv2d(c, n, 3, padding=1)
        self.a = nn.ModuleList([nn.Conv2d(n, n, 3, padding=1) for _ in range(blocks)])
        self.b = nn.ModuleList([nn.Conv2d(n, n, 3, padding=1) for _ in range(blocks)])
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for a, b in zip(self.a, self.b):
            h = torch.relu(h + b(torch.relu(a(h))))
        return self.out(h.mean(dim=(2, 3)))


def _independent(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(case, samples):
    n, h, blocks = (int(v) for v in case.split("x"))
    x = torch.randn(n, 3, h, h, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    sobol = quadrature.normal_points
    for name, points in (("sobol", sobol), ("iid", _independent)):
        quadrature.normal_points = points
        try:
            kfn = ntkcompile.compile(ResNetV1(blocks), mc_samples=samples)
            t = time.perf_counter()
            k = kfn(x, progress=False)
            seconds = time.perf_counter() - t
        finally:
            quadrature.normal_points = sobol
        rel = [float((getattr(k, f"{m}_stderr") / getattr(k, m).abs()).max()) for m in ("nngp", "ntk")]
        out[name] = (seconds, rel, k)
        print(f"{case} {name:5s}: {seconds:7.1f} s, largest standard error / entry: NNGP {rel[0]:.1e}, "
              f"NTK {rel[1]:.1e}", flush=True)
    (ts, rs, ks), (ti, ri, ki) = out["sobol"], out["iid"]
    z = max(float(((getattr(ks, m) - getattr(ki, m)).abs()
                   / (getattr(ks, f"{m}_stderr") ** 2 + getattr(ki, f"{m}_stderr") ** 2).sqrt()).max())
            for m in ("nngp", "ntk"))
    print(f"{case}: iid / sobol standard error NNGP {ri[0] / rs[0]:.1f}x, NTK {ri[1] / rs[1]:.1f}x "
          f"(as many more draws: {(ri[0] / rs[0]) ** 2:.0f}x, {(ri[1] / rs[1]) ** 2:.0f}x); time {ti / ts:.2f}x; "
          f"largest difference {z:.1f} combined standard errors")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="2x4x3,4x6x3")
    p.add_argument("--samples", type=int, default=32768)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        run(case, args.samples)


if __name__ == "__main__":
    main()
