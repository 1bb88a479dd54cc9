"""A CNN kernel of N = 20,000 images of 3x8x8 under a memory cap (issue 9's acceptance).

The network: [Conv2d 3x3 SAME, ReLU] x 2, flatten, Linear (NTK parametrization,
W_std 1.4, b_std 0.1), NNGP + NTK of the images against themselves, float64.  A
flatten readout needs aligned positions only: 64 per pair of images.

The two 20,000^2 kernels (3.2 GB each) are written tile by tile into ``out=``
``numpy.memmap`` files in ``--dir``, and the process's *anonymous* memory is capped
with ``RLIMIT_DATA`` (``--cap-gib``; file-backed pages of the memmaps do not count,
and the kernel writes them back and reclaims them).  For comparison the script
prints the naive size: every pair's aligned position arrays alive at once.  A
sampler thread reports the peak anonymous resident memory (``RssAnon``), and
random blocks of the result are checked against direct cross kernels.

    python benchmarks/large_conv.py [--n 20000] [--cap-gib 2] [--dir /tmp] [--keep]
"""
import argparse
import os
import resource
import threading
import time

import numpy as np
import torch
from torch import nn

import ntkcompile


def _rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon(threading.Thread):
    """Samples ``RssAnon`` every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss_anon(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--cap-gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the .npy files")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 1))
    x = torch.randn(args.n, 3, 8, 8, dtype=torch.float64)
    kfn = ntkcompile.compile(model, W_std=1.4, b_std=0.1)
    kfn(x[:2])                      # lowers the program for this input shape
    live = max(kfn._function(mode, True)[0].live_arrays for mode in (True, False))
    naive = args.n ** 2 * kfn._pair_entries() * 8 * live
    paths = {name: os.path.join(args.dir, f"large_conv_{name}.npy") for name in ("nngp", "ntk")}
    out = {name: np.lib.format.open_memmap(p, mode="w+", dtype=np.float64, shape=(args.n, args.n))
           for name, p in paths.items()}
    cap = int(args.cap_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    print(f"N = {args.n} images of 3x8x8, {torch.get_num_threads()} threads; outputs 2 x {args.n ** 2 * 8 / 2**30:.2f} "
          f"GiB memmaps; naive work (every pair's {kfn._pair_entries()} aligned positions x {live} live arrays): "
          f"{naive / 2**30:.0f} GiB; anonymous memory capped at {args.cap_gib:g} GiB (RLIMIT_DATA)", flush=True)
    sampler = PeakAnon()
    sampler.start()
    t0 = time.perf_counter()
    kfn(x, out=out)
    took = time.perf_counter() - t0
    sampler.running = False
    sampler.join()
    print(f"computed in {took:.0f} s ({took / (args.n * (args.n + 1) / 2) * 1e6:.2f} us per pair); "
          f"peak anonymous resident memory {sampler.peak / 2**30:.2f} GiB", flush=True)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        i, j = (int(v) for v in rng.integers(0, args.n - 200, 2))
        direct = kfn(x[i:i + 200], x[j:j + 200])
        for name in ("nngp", "ntk"):
            ref = getattr(direct, name).numpy()
            worst = max(worst, float(np.abs(out[name][i:i + 200, j:j + 200] - ref).max() / np.abs(ref).max()))
    print(f"3 random 200 x 200 blocks against direct cross kernels: max relative difference {worst:.1e}")
    if not args.keep:
        del out
        for p in paths.values():
            for f in (p, p + ".tiles.json"):
                if os.path.exists(f):
                    os.remove(f)


if __name__ == "__main__":
    main()
