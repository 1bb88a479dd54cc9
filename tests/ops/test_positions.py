"""Indexing, slicing and averaging along position axes (ops/positions.py).

Oracles: models that compute the same function another way -- a convolution's
output at one position equals the convolution applied to the input window it
reads (no padding involved), a 1x1 convolution at one position is an MLP of that
position's input, and a mean over the time axis of a sequence layout equals
global average pooling of the same feature map in channel layout (a separate
code path: ``spatial.global_mean``).
"""
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile.errors import UnsupportedOpError


def kernels(model, x, **kw):
    k = ntkcompile.compile(model, W_std=1.3, b_std=0.2, **kw)(x)
    return k.nngp, k.ntk


def close(a, b, tol=1e-11):
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=tol, atol=tol), (u - v).abs().max()


class ConvAt(nn.Module):
    """Two 3-tap convolutions with zero padding, then position ``t`` (away from the borders).

    erf and relu: closed forms on both paths, so that ``c = 1`` holds exactly on the
    diagonal (a quadrature between them leaves ~1e-16 there, which relu's
    derivative V-transform amplifies to ~1e-8 in the NTK's diagonal).
    """

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.c1, self.c2 = nn.Conv1d(3, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.c2(torch.erf(self.c1(x))))
        return self.out(h[:, :, self.t])


class ConvWindow(nn.Module):
    """The same network on the 5 input positions that position ``t`` reads, without padding."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.c1, self.c2 = nn.Conv1d(3, 16, 3), nn.Conv1d(16, 16, 3)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.c2(torch.erf(self.c1(x[:, :, self.t - 2:self.t + 3]))))
        return self.out(h.flatten(1))


def test_select_one_position_equals_the_window_it_reads():
    x = torch.randn(5, 3, 9, dtype=torch.float64)
    close(kernels(ConvAt(4), x), kernels(ConvWindow(4), x))
    close(kernels(ConvAt(-3), x), kernels(ConvWindow(6), x))


class SeqMean(nn.Module):
    """A 1-D conv net read out through the mean over time, in sequence layout (N, T, C)."""

    def __init__(self, seq_layout):
        super().__init__()
        self.seq_layout = seq_layout
        self.c1 = nn.Conv1d(3, 16, 3, padding=1)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.seq_layout:
            return self.out(h.transpose(1, 2).mean(1))      # positions map: mean over time
        return self.out(h.mean(2))                          # global average pooling


def test_mean_over_time_in_sequence_layout_equals_global_pooling():
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    kfn = ntkcompile.compile(SeqMean(True), W_std=1.3, b_std=0.2)
    kfn(x)
    assert "mean over positions" in str(kfn.program)
    close(kernels(SeqMean(True), x), kernels(SeqMean(False), x))


class SliceThenMean(nn.Module):
    def __init__(self, sl):
        super().__init__()
        self.sl = sl
        self.c1 = nn.Conv1d(3, 16, 1)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x)).permute(0, 2, 1)          # (N, T, C)
        return self.out(h[:, self.sl].mean(1))


class MeanOfInputSlice(nn.Module):
    def __init__(self, sl):
        super().__init__()
        self.sl = sl
        self.c1 = nn.Conv1d(3, 16, 1)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.c1(x[:, :, self.sl])).mean(2))


@pytest.mark.parametrize("sl", [slice(1, 5), slice(0, 7, 3), slice(-2, None)])
def test_slice_of_positions(sl):
    """A 1x1 conv commutes with slicing positions: slicing the features equals slicing the input."""
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    close(kernels(SliceThenMean(sl), x), kernels(MeanOfInputSlice(sl), x))


class TimeFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 16, 1)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.c1(x)).permute(2, 0, 1)          # (T, N, C)
        return self.out(h[-1])


class MLPOnLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Linear(3, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.c1(x[:, :, -1])))


def test_time_first_index_equals_mlp_on_that_step():
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    close(kernels(TimeFirst(), x), kernels(MLPOnLast(), x))


class IndexBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 16, 1)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.c1(x))[0:2, :, 1])


def test_indexing_the_batch_axis_is_refused():
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        ntkcompile.compile(IndexBatch(), input_shape=(3, 5))


class Rolled(nn.Module):
    """``h + roll(h)`` along the positions of a sequence: ``h`` is read directly and through a
    map of positions; without the first layer's bias that is the MLP on ``x + roll(x)``."""

    def __init__(self, roll):
        super().__init__()
        self.roll = roll
        self.a, self.b, self.o = nn.Linear(3, 16, bias=False), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x):
        h = self.a(x)
        if self.roll:
            h = h + torch.cat([h[:, 1:], h[:, :1]], 1)
        return self.o(torch.relu(self.b(torch.relu(h))).mean(1))


def test_a_vector_read_directly_and_through_a_map_of_positions():
    """The backward covariance of the direct and the mapped reading: the NTK was 0.09 off (the
    cross term was taken for 0) while the NNGP was exact.  To 1e-7: relu's derivative kernel
    turns the rounding of ``c = 1`` on the diagonal into ~1e-9."""
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    got = kernels(Rolled(True), x)
    want = kernels(Rolled(False), x + torch.cat([x[:, 1:], x[:, :1]], 1))
    close(got[:1], want[:1])
    close(got[1:], want[1:], tol=1e-7)


def test_a_vector_read_directly_and_through_a_map_of_positions_cross_kernel():
    """The same cross term in a cross kernel, whose arrays have two batch axes (N1, N2) where
    a kernel against itself packs its pairs into one: the cross kernel raised a shape error
    (the map's adjoint took one leading axis), which tiles made visible."""
    x1, x2 = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    rolled = lambda x: x + torch.cat([x[:, 1:], x[:, :1]], 1)          # noqa: E731
    got = ntkcompile.compile(Rolled(True), W_std=1.3, b_std=0.2)(x1, x2)
    want = ntkcompile.compile(Rolled(False), W_std=1.3, b_std=0.2)(rolled(x1), rolled(x2))
    close((got.nngp, got.ntk), (want.nngp, want.ntk))
