"""Time the kernels of a post-activation ResNet (ResNet v1 blocks, no BatchNorm): issue 12, item 3.

``relu(x + conv(relu(conv(x))))`` makes block ``l``'s output an H-var of ``l + 1`` G-vars, so
its pair expectations go to the N-D evaluator (quasi-Monte Carlo, ``kernels.qmc``:
``mc_samples`` split into ``mc_replicates`` independent replicates whose spread is the
reported standard error), which runs the expectations over one covariance (a block's
``E[h h']`` and the chains of its derivatives) as one C pass (``sampling.c``).

Peers, in the same process and on the same inputs:

* ``torch``: the same compiled kernel with the fused pass off (each integrand's torch form
  on the same points; the kernels agree to rounding, which the run checks);
* ``common`` (with ``--common``): every entry on the same points (``qmc.MAX_NETS = 1``: the
  evaluator before each position pair had a net of its own), to show what the nets buy.

For each the run reports the time of a warm call and the largest standard error relative to
the entry (NNGP and NTK).  With ``--reference N`` it also computes the kernel at ``N``
points and reports each run's largest error against it, and the root mean square of the
errors in combined standard errors (about 1 when the standard errors are honest, larger
where a bias is not in them).

    python benchmarks/resnet_v1.py [--cases 4x4x3,4x8x3] [--samples 1024] [--replicates 4]
                                   [--reference 131072] [--threads 2] [--common] [--no-torch]

A case ``NxHxB`` is N inputs of 3 x H x H through a stem convolution, B blocks and global
average pooling (16 channels; the width does not change the infinite-width kernels).
"""
import argparse
import time

import torch
from torch import nn

import ntkcompile
from ntkcompile.kernels import fused, native, qmc


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


def _kernel(blocks, x, samples, replicates, nets=None, fused_pass=True, seed=0):
    old, real = qmc.MAX_NETS, qmc._fused
    qmc.MAX_NETS = nets or old
    if not fused_pass:
        qmc._fused = lambda *args: None              # the torch form of every integrand
    try:
        kfn = ntkcompile.compile(ResNetV1(blocks), mc_samples=samples, mc_replicates=replicates, seed=seed)
        kfn(x[:1], progress=False)                     # trace and plan outside the timing
        t = time.perf_counter()
        k = kfn(x, progress=False)
        return time.perf_counter() - t, k
    finally:
        qmc.MAX_NETS, qmc._fused = old, real


def _worst(k):
    return [float((getattr(k, f"{m}_stderr") / getattr(k, m).abs()).max()) for m in ("nngp", "ntk")]


def run(case, samples, replicates, reference, peers):
    n, h, blocks = (int(v) for v in case.split("x"))
    x = torch.randn(n, 3, h, h, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = None
    if reference:
        seconds, ref = _kernel(blocks, x, reference, 8, seed=12345)
        rel = _worst(ref)
        print(f"{case} reference ({reference} points, 8 replicates): {seconds:.1f} s, standard error "
              f"NNGP {rel[0]:.1e}, NTK {rel[1]:.1e}", flush=True)
    out = {}
    for name in ("fused",) + peers:
        seconds, k = _kernel(blocks, x, samples, replicates, nets=1 if name == "common" else None,
                             fused_pass=name != "torch")
        rel = _worst(k)
        out[name] = (seconds, rel, k)
        line = (f"{case} {name:6s} ({samples} points, {replicates} replicates): {seconds:7.1f} s, largest "
                f"standard error / entry: NNGP {rel[0]:.1e}, NTK {rel[1]:.1e}")
        if ref is not None:
            for m in ("nngp", "ntk"):
                v, r = getattr(k, m), getattr(ref, m)
                z = (v - r) / (getattr(k, f"{m}_stderr") ** 2 + getattr(ref, f"{m}_stderr") ** 2).sqrt()
                line += (f"; {m.upper()} error {float(((v - r) / r.abs()).abs().max()):.1e}, "
                         f"rms {float(z.pow(2).mean().sqrt()):.2f} se")
        print(line, flush=True)
    tf, rf, kf = out["fused"]
    if "torch" in out:
        tt, _, kt = out["torch"]
        diff = max(float(((getattr(kf, m) - getattr(kt, m)) / getattr(kt, m).abs()).abs().max())
                   for m in ("nngp", "ntk"))
        print(f"{case}: fused pass {tt / tf:.1f}x faster than the torch form, same points: kernels differ by "
              f"{diff:.1e} (relative)")
    if "common" in out:
        tc, rc, _ = out["common"]
        print(f"{case}: common / nets standard error NNGP {rc[0] / rf[0]:.1f}x, NTK {rc[1] / rf[1]:.1f}x "
              f"(as many more points: {(rc[0] / rf[0]) ** 2:.0f}x, {(rc[1] / rf[1]) ** 2:.0f}x); "
              f"time {tc / tf:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="4x4x3,4x8x3")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--replicates", type=int, default=4)
    p.add_argument("--reference", type=int, default=0, help="points of a reference kernel (0: none)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--common", action="store_true", help="also time every entry on the same points")
    p.add_argument("--no-torch", action="store_true", help="skip the torch form (slow on many inputs)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = ("torch",) * (not args.no_torch) + ("common",) * args.common
    print(f"fused kernels: {fused.status()}; N-D integrands: {native.status()}")
    for case in args.cases.split(","):
        run(case, args.samples, args.replicates, args.reference, peers)


if __name__ == "__main__":
    main()
