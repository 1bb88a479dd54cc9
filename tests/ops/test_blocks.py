"""Blocks of the width axis (ops/blocks.py, ops/split.py): slicing, chunk, split of width vectors.

Oracle: the same model written with a separate ``nn.Linear`` per block.  In the limit a
block of rows of a matrix is an independent matrix of the same std and fan-in, so the
two models have the same kernels, exactly (1e-12), through every op that slicing maps
(G-atoms, H-atoms, concatenations, normalizations' gains, convolutions' channels).
"""
import pytest
import torch
from torch import nn

import ntkcompile
from helpers.kernels import close, kernels
from ntkcompile.errors import UnsupportedOpError

D, N = 3, 8


class Gates(nn.Module):
    """Gates stacked in one matrix and sliced in every way torch allows."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.ih, self.hh, self.out = nn.Linear(D, 3 * N), nn.Linear(N, 3 * N), nn.Linear(N, 1)

    def forward(self, x):
        g = self.ih(x)
        if self.how == "chunk":
            a, b, c = g.chunk(3, 1)
        elif self.how == "torch.chunk":
            a, b, c = torch.chunk(g, 3, dim=-1)
        elif self.how == "split":
            a, b, c = g.split(N, dim=1)
        elif self.how == "split_sizes":
            a, b, c = torch.split(g, [N, N, N], 1)
        elif self.how == "tensor_split":
            a, b, c = torch.tensor_split(g, 3, dim=1)
        elif self.how == "narrow":
            a, b, c = g.narrow(1, 0, N), g.narrow(1, N, N), g.narrow(1, 2 * N, N)
        else:                                         # indexing, with the size read from the tensor
            n = g.size(1) // 3
            a, b, c = g[:, :n], g[..., n:2 * n], g[:, 2 * n:]
        h = torch.relu(a) * torch.erf(b) + c
        u, v, w = self.hh(h).chunk(3, 1)
        return self.out(torch.tanh(u) + v - w + c)


class SeparateGates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(D, N) for _ in range(3))
        self.u, self.v, self.w = (nn.Linear(N, N) for _ in range(3))
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        c = self.c(x)
        h = torch.relu(self.a(x)) * torch.erf(self.b(x)) + c
        return self.out(torch.tanh(self.u(h)) + self.v(h) - self.w(h) + c)


@pytest.mark.parametrize("how", ["chunk", "torch.chunk", "split", "split_sizes", "tensor_split", "narrow", "index"])
def test_blocks_of_a_matrix_are_separate_linears(how):
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(Gates(how), x), kernels(SeparateGates(), x))


def test_blocks_through_the_export_frontend():
    x = torch.randn(5, D, dtype=torch.float64)
    for how in ("chunk", "split_sizes", "index"):
        ep = torch.export.export(Gates(how), (x.float(),))
        close(kernels(ep, x), kernels(SeparateGates(), x))


class GRUCell(nn.Module):
    """A GRU step written by hand (PyTorch's gate order), from a zero initial state."""

    def __init__(self, separate, steps=1):
        super().__init__()
        self.separate, self.steps = separate, steps
        if separate:
            self.ir, self.iz, self.in_ = (nn.Linear(D, N) for _ in range(3))
            self.hr, self.hz, self.hn = (nn.Linear(N, N) for _ in range(3))
        else:
            self.ih, self.hh = nn.Linear(D, 3 * N), nn.Linear(N, 3 * N)
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], N)
        for t in range(self.steps):
            if self.separate:
                i_r, i_z, i_n = self.ir(x[:, t]), self.iz(x[:, t]), self.in_(x[:, t])
                h_r, h_z, h_n = self.hr(h), self.hz(h), self.hn(h)
            else:
                i_r, i_z, i_n = self.ih(x[:, t]).chunk(3, 1)
                h_r, h_z, h_n = self.hh(h).chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        return self.out(h)


def test_gru_cell_with_chunk_equals_separate_linears():
    """Four correlated Gaussians per gate product: the joint evaluator (Monte Carlo), on the
    same samples for both programs, which are the same up to names."""
    x = torch.randn(4, 1, D, dtype=torch.float64)
    kw = dict(mc_samples=4000, mc_replicates=2)
    close(kernels(GRUCell(False), x, **kw), kernels(GRUCell(True), x, **kw), tol=1e-10)


class BlockOfConcat(nn.Module):
    """A block that straddles a concatenation: the pieces it overlaps, each sliced."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        if split:
            self.a1, self.a2, self.b1, self.b2 = nn.Linear(D, 4), nn.Linear(D, 4), nn.Linear(D, 4), nn.Linear(D, 4)
        else:
            self.a, self.b = nn.Linear(D, 8), nn.Linear(D, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        if self.split:       # cat(a, b)[:, 4:12] = cat(a[4:8], b[0:4])
            return self.out(torch.relu(torch.cat([self.a2(x), self.b1(x)], 1)))
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], -1)[:, 4:12]))


def test_a_block_across_a_concatenation():
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(BlockOfConcat(False), x), kernels(BlockOfConcat(True), x))


class ConvChannels(nn.Module):
    """Channel blocks of a convolution are separate convolutions."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        if split:
            self.c1, self.c2 = nn.Conv1d(2, 6, 3, padding=1), nn.Conv1d(2, 6, 3, padding=1)
        else:
            self.c = nn.Conv1d(2, 12, 3, padding=1)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        a, b = (self.c1(x), self.c2(x)) if self.split else self.c(x).chunk(2, dim=1)
        return self.out((torch.relu(a) * b).mean(2))


def test_channel_blocks_of_a_convolution():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    close(kernels(ConvChannels(False), x), kernels(ConvChannels(True), x))


class NormBlocks(nn.Module):
    """Blocks of a LayerNorm's output.  The blocks of a vector are iid, so its width moments
    are each block's: the blocks equal separate Linears, each normalized on its own, and
    the blocks of the gain and shift are separate gains and shifts."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        if split:
            self.la, self.lb, self.na, self.nb = nn.Linear(D, N), nn.Linear(D, N), nn.LayerNorm(N), nn.LayerNorm(N)
        else:
            self.l, self.norm = nn.Linear(D, 2 * N), nn.LayerNorm(2 * N)
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        if self.split:
            a, b = self.na(self.la(x)), self.nb(self.lb(x))
        else:
            a, b = self.norm(self.l(x)).chunk(2, 1)
        return self.out(torch.relu(a) + b)


def test_blocks_of_a_normalization_are_separate_normalizations():
    x = torch.randn(4, D, dtype=torch.float64)
    kfn = ntkcompile.compile(NormBlocks(False), W_std=1.3, b_std=0.4)
    close(kfn(x), kernels(NormBlocks(True), x), tol=1e-10)
    assert "norm[0:1/2]" in kfn.program and "norm[1/2:1]" in kfn.program


class WholeAndBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(D, 2 * N), nn.Linear(3 * N, 1)

    def forward(self, x):
        g = self.l(x)
        return self.out(torch.cat([torch.relu(g), g[:, :N]], 1))


def test_a_block_and_the_whole_vector_from_the_same_row_are_refused():
    with pytest.raises(UnsupportedOpError, match=r"rows \[0:1/2\] and \[0:1\] of 'l'") as e:
        ntkcompile.compile(WholeAndBlock())
    assert "test_blocks.py" in str(e.value)


class OneCoordinate(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(D, N), nn.Linear(1, 1)

    def forward(self, x):
        return self.out(self.l(x)[:, 0:1] * self.l(x)[:, 0].unsqueeze(1))


def test_indexing_one_coordinate_is_refused():
    with pytest.raises(UnsupportedOpError, match="width axis of a width vector with 0"):
        ntkcompile.compile(OneCoordinate())


class SplitBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(self.l(x).chunk(2, 0)[0])


def test_splitting_the_batch_axis_is_refused():
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        ntkcompile.compile(SplitBatch())
