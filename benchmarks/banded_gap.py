"""Global-average-pooled CNN kernels of large images in bands of positions (issue 9).

A CNN-GAP kernel needs every pair of positions of its feature maps: two 96x96 images
are 85M position pairs per array and pair of inputs, about 40 GiB of work for the
three pairs of a self kernel of two images.  ``kernels.bands`` splits that work into
bands of rows of the readout's positions when it does not fit the memory available.

The script
1. computes the kernel of 4 images of ``--check-size``^2 whole and banded (the memory
   available forced low), and prints the largest difference and both times;
2. caps the process's anonymous memory with ``RLIMIT_DATA`` (``--cap-gib``), which
   ``resources.available_memory`` honours, and computes the self kernel of two
   ``--size``^2 images in bands, printing the time, the number of bands and the peak
   anonymous resident memory against the whole work's size.

    python benchmarks/banded_gap.py [--size 96] [--cap-gib 3] [--check-size 40] [--myrtle]

``--myrtle``: a Myrtle-5-like network instead (average poolings inside, 4 convolutions).
"""
import argparse
import resource
import time

import torch
from torch import nn

import ntkcompile
from ntkcompile import tiling
from ntkcompile.kernels import bands

from large_conv import PeakAnon


def model(myrtle=False):
    if myrtle:      # Myrtle-5-like: average poolings inside
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.AvgPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 1))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 1))


def _bands_used():
    used = []
    plan = bands.Split.plan

    def spy(*a):
        split = plan(*a)
        used.append((len(split.boxes), split.entries))
        return split
    bands.Split.plan = staticmethod(spy)
    return used


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--check-size", type=int, default=40)
    ap.add_argument("--cap-gib", type=float, default=3.0)
    ap.add_argument("--myrtle", action="store_true", help="average poolings inside the network")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    used = _bands_used()

    s = args.check_size
    kfn = ntkcompile.compile(model(args.myrtle), W_std=1.4, b_std=0.1)
    x = torch.randn(4, 3, s, s, dtype=torch.float64)
    t = time.perf_counter()
    whole = kfn(x, x if args.myrtle else None, progress=False)   # banded Myrtle runs as a cross kernel
    t_whole = time.perf_counter() - t
    live = kfn._function(True, True)[0].live_arrays
    real = tiling.available_memory
    tiling.available_memory = lambda: kfn._pair_entries() * 8 * live     # the budget: half of one pair's work
    t = time.perf_counter()
    banded = kfn(x, progress=False)
    t_banded = time.perf_counter() - t
    tiling.available_memory = real
    diff = max(float((getattr(banded, n) - getattr(whole, n)).abs().max()) for n in ("nngp", "ntk"))
    print(f"check {s}x{s}, 4 images: whole {t_whole:.2f} s, {used[-1][0]} bands {t_banded:.2f} s "
          f"({t_banded / t_whole:.2f}x), largest difference {diff:.2e}")

    n = args.size
    kfn = ntkcompile.compile(model(args.myrtle), W_std=1.4, b_std=0.1)
    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    cap = int(args.cap_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.RLIM_INFINITY))
    peak = PeakAnon()
    peak.start()
    t = time.perf_counter()
    out = kfn(x, progress=True)
    elapsed = time.perf_counter() - t
    peak.running = False
    peak.join()
    live = kfn._function(True, True)[0].live_arrays
    naive = kfn._pair_entries() * 8 * live * 3
    print(f"{n}x{n}, 2 images (3 pairs): {elapsed:.1f} s in {used[-1][0]} bands; peak anonymous memory "
          f"{peak.peak / 2**30:.2f} GiB under a {args.cap_gib:g} GiB cap; whole work {naive / 2**30:.1f} GiB")
    print("ntk:", out.ntk.numpy())


if __name__ == "__main__":
    main()
