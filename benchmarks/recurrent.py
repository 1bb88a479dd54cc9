"""Time the compiled NTK of an LSTM on 64 sequences (issue 13's figure).

For each sequence length T (default 50 and 200): ``compile`` (tracing, planning,
code generation), the first kernel call (64 x 64 NTK, joint Monte Carlo), and the
kernel's standard error (median over entries, relative to the mean diagonal),
next to a peer in the same process: the empirical NTK (torch.func) of one
width-1024 LSTM in NTK parametrization on the same sequences, and its relative
Frobenius distance to the compiled kernel.

The joint Monte Carlo's work is ``(sequences x T)^2 x samples`` (every pair of
time steps of every pair of sequences, per sample), so the default samples are
fewer than the compiler's default 4096 x 8 replicates; the standard error is
reported so that the figures can be read together.  At T = 200 the 64 sequences
are 12800 rows, more than one joint sample covers (4096), so the kernel is tiled.
The peer runs up to ``--peer-max-length`` (torch.func's Jacobians of the LSTM at
T = 200 did not fit in 24 GB).

    python benchmarks/recurrent.py [--lengths 50 200] [--n 64] [--samples 512] [--replicates 4]
"""
import argparse
import time

import torch
from torch import nn

import ntkcompile
from ntkcompile.empirical import empirical_ntk


class LSTMLast(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.rnn, self.out = nn.LSTM(d, n, batch_first=True), nn.Linear(n, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--n", type=int, default=64, help="sequences")
    ap.add_argument("--d", type=int, default=8, help="features per step")
    ap.add_argument("--samples", type=int, default=512, help="joint_samples per replicate")
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--width", type=int, default=1024, help="width of the empirical peer")
    ap.add_argument("--peer-max-length", type=int, default=50,
                    help="longest T with the empirical peer (at T=200 torch.func's Jacobians of a width-1024 "
                         "LSTM on 64 sequences took more than 24 GB and were OOM-killed)")
    args = ap.parse_args(argv)
    W, B = 1.0, 0.1
    print(f"LSTM({args.d}, n) -> Linear(n, 1) on the last step, {args.n} sequences, NTK x vs x, float64, "
          f"{args.samples} x {args.replicates} joint samples, {torch.get_num_threads()} threads")
    for T in args.lengths:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(args.n, T, args.d, generator=g, dtype=torch.float64)
        t0 = time.perf_counter()
        kfn = ntkcompile.compile(LSTMLast(args.d, 16), W_std=W, b_std=B, input_shape=(T, args.d),
                                 joint_samples=args.samples, mc_replicates=args.replicates)
        compiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        k = kfn(x, get="ntk", progress=False)
        run = time.perf_counter() - t0
        scale = float(k.ntk.diagonal().mean())
        se = float(k.ntk_stderr.median()) / scale
        print(f"  T={T:<4} compile {compiled:.2f} s ({len(kfn.code.splitlines())} lines), kernel {run:.1f} s, "
              f"median stderr {se:.2%} of the mean diagonal", flush=True)
        if T > args.peer_max_length:
            print(f"         peer skipped (T > --peer-max-length {args.peer_max_length})", flush=True)
            continue
        torch.manual_seed(0)
        net = ntkcompile.ntk_parametrize(LSTMLast(args.d, args.width).double(), W_std=W, b_std=B)
        t0 = time.perf_counter()
        emp = empirical_ntk(net, x)
        peer = time.perf_counter() - t0
        dist = float(torch.linalg.norm(emp - k.ntk) / torch.linalg.norm(k.ntk))
        print(f"         peer: empirical NTK at width {args.width} {peer:.1f} s (ratio kernel/empirical = "
              f"{run / peer:.2f}x), relative distance to the kernel {dist:.3f}", flush=True)


if __name__ == "__main__":
    main()
