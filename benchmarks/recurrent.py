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
The peer is ``empirical_ntk`` (torch.func Jacobians of chunks of sequences) up to
``--peer-loop-above`` steps; beyond, its batched Jacobians of the LSTM did not fit in
24 GB at T = 200, so the peer takes one ``torch.autograd.grad`` backward pass per
sequence and multiplies the gradient rows (the same empirical NTK, checked against
``empirical_ntk`` on two sequences in the run).

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
    ap.add_argument("--peer-loop-above", type=int, default=50,
                    help="longest T whose empirical peer is empirical_ntk; longer sequences take one backward "
                         "pass per sequence (at T=200 torch.func's Jacobians of a width-1024 LSTM on 64 "
                         "sequences took more than 24 GB and were OOM-killed)")
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
        torch.manual_seed(0)
        net = ntkcompile.ntk_parametrize(LSTMLast(args.d, args.width).double(), W_std=W, b_std=B)
        loop = T > args.peer_loop_above
        t0 = time.perf_counter()
        emp = per_sequence_ntk(net, x) if loop else empirical_ntk(net, x)
        peer = time.perf_counter() - t0
        if loop:         # the same empirical NTK: check it on two sequences
            check = float((empirical_ntk(net, x[:2]) - emp[:2, :2]).abs().max() / emp[:2, :2].abs().max())
            assert check < 1e-10, check
        dist = float(torch.linalg.norm(emp - k.ntk) / torch.linalg.norm(k.ntk))
        how = "one backward pass per sequence" if loop else "empirical_ntk"
        print(f"         peer: empirical NTK at width {args.width} ({how}) {peer:.1f} s (ratio kernel/empirical "
              f"= {run / peer:.2f}x), relative distance to the kernel {dist:.3f}", flush=True)


def per_sequence_ntk(net, x):
    """``J J^T`` with ``J``'s rows the parameter gradients of each sequence's (scalar) output."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(net(x[i:i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


if __name__ == "__main__":
    main()
