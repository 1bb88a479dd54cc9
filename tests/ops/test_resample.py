"""Padding and resampling of feature maps (ops/resample.py): fixed linear maps of positions;
grouped convolutions (ops/conv.py).

Oracles:

* zero padding then an unpadded convolution is the convolution with that padding (the
  stencil's own padding, ``kernels/spatial.py``), exactly;
* nearest upsampling by an integer factor does not change a global average;
* bilinear upsampling (``align_corners=True``): its matrix written here from the
  formula, the covariance ``M C M^T`` of the upsampled convolution and the arc-cosine
  closed form for the relu after it, with ``C`` read off a per-pixel readout of the
  convolution (``tests/test_per_position.py``);
* slow: empirical NTKs of a wide upsampling CNN.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.convergence import convergence_sweep
from ntkcompile.errors import UnsupportedOpError

W_STD, B_STD = 1.3, 0.2


def _x(n, seed, size=4):
    return torch.randn(n, 2, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _both(model_a, model_b, x1, x2, tol=1e-12):
    a = ntkcompile.compile(model_a, W_std=W_STD, b_std=B_STD)
    b = ntkcompile.compile(model_b, W_std=W_STD, b_std=B_STD)
    for u, v in ((x1, None), (x1, x2)):
        ka, kb = a(u, v), b(u, v)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(ka, name), getattr(kb, name), rtol=tol, atol=tol)


class Padded(nn.Module):
    """conv -> tanh -> (pad then conv without padding | conv with padding) -> relu -> flatten readout."""

    def __init__(self, how, n=16):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(2, n, 3, padding=1)
        self.c2 = nn.Conv2d(n, n, 3, padding=0 if how != "conv" else (1, 2))
        self.pad = nn.ZeroPad2d((2, 2, 1, 1))
        self.out = nn.Linear(n * 24, 1)             # 4 x 6 positions after the second conv

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        if self.how == "function":
            h = F.pad(h, (2, 2, 1, 1))
        elif self.how == "module":
            h = self.pad(h)
        return self.out(torch.relu(self.c2(h)).flatten(1))


@pytest.mark.parametrize("how", ["function", "module"])
def test_zero_padding_then_a_convolution_is_the_padded_convolution(how):
    _both(Padded(how), Padded("conv"), _x(3, 0), _x(2, 1))


class Upsampled(nn.Module):
    def __init__(self, mode, n=16, pool=True, **kw):
        super().__init__()
        self.c = nn.Conv2d(2, n, 3, padding=1)
        self.mode, self.kw, self.pool = mode, kw, pool
        self.out = nn.Linear(n if pool else n * 64, 1)

    def forward(self, x):
        h = self.c(x)
        if self.mode is not None:
            h = F.interpolate(h, scale_factor=2, mode=self.mode, **self.kw)
        h = torch.relu(h)
        return self.out(h.mean((2, 3)) if self.pool else h.flatten(1))


def test_nearest_upsampling_keeps_a_global_average():
    _both(Upsampled("nearest"), Upsampled(None), _x(3, 2), _x(2, 3))


def _bilinear_matrix(n_in, n_out):
    """``align_corners=True``: output ``i`` reads position ``i (n_in - 1) / (n_out - 1)``."""
    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1)
        lo = min(int(math.floor(src)), n_in - 2)
        w = src - lo
        M[i, lo], M[i, lo + 1] = 1 - w, w
    return M


class PixelConv(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.c, self.out = nn.Conv2d(2, n, 3, padding=1), nn.Linear(n, 1)

    def forward(self, x):
        return self.out(self.c(x).permute(0, 2, 3, 1))


def test_bilinear_upsampling_is_its_matrix_on_the_covariance():
    x = _x(3, 4)
    C = (ntkcompile.compile(PixelConv(), W_std=W_STD, b_std=B_STD)(x).nngp - B_STD ** 2) / W_STD ** 2
    C = C.reshape(3, 3, 16, 16).numpy()                       # E[g_p g'_q] of the convolution
    M1 = _bilinear_matrix(4, 8)
    M = np.kron(M1, M1)                                        # (64, 16), positions in C order
    U = np.einsum("sp,abpq,tq->abst", M, C, M)
    var = np.einsum("aass->as", U)
    k11, k22 = var[:, None, :], var[None, :, :]
    k12 = np.einsum("abss->abs", U)
    s = np.sqrt(k11 * k22)
    c = np.clip(k12 / s, -1, 1)
    relu = s * (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)
    want = W_STD ** 2 * relu.mean(-1) + B_STD ** 2               # flatten readout: mean over positions
    got = ntkcompile.compile(Upsampled("bilinear", pool=False, align_corners=True), W_std=W_STD, b_std=B_STD)(x)
    np.testing.assert_allclose(got.nngp.numpy(), want, rtol=1e-12, atol=1e-12)


def test_padding_that_is_not_zeros_or_not_spatial_is_refused():
    class Bad(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.c = how, nn.Conv2d(2, 8, 3, padding=1)
            self.out = nn.Linear(8 if how == "value" else 10, 1)

        def forward(self, x):
            h = self.c(x)
            h = F.pad(h, (1, 1), value=1.0) if self.how == "value" else F.pad(h, (0, 0, 0, 0, 1, 1))
            return self.out(torch.relu(h).mean((2, 3)))

    with pytest.raises(UnsupportedOpError, match="constant 1.0"):
        ntkcompile.compile(Bad("value"))(_x(2, 0))
    with pytest.raises(UnsupportedOpError, match="channels or the batch"):
        ntkcompile.compile(Bad("channels"))(_x(2, 0))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_upsampling_cnn_empirical_ntk_converges():
    """conv -> bilinear x2 -> relu -> reflect pad -> conv -> relu -> global average; 6 seeds,
    widths 64..1024.  Measured: errors 0.177, 0.133, 0.083, 0.080, 0.028, slope -0.61."""

    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.c1, self.c2, self.out = nn.Conv2d(2, n, 3, padding=1), nn.Conv2d(n, n, 3), nn.Linear(n, 1)

        def forward(self, x):
            h = torch.relu(F.interpolate(self.c1(x), scale_factor=2, mode="bilinear"))
            return self.out(torch.relu(self.c2(F.pad(h, (1, 1, 1, 1), mode="reflect"))).mean((2, 3)))

    x = _x(3, 5)
    limit = ntkcompile.compile(Net(16), W_std=W_STD, b_std=B_STD)(x).ntk
    errors, slope = convergence_sweep(Net, [64, 128, 256, 512, 1024], range(6), x, None,
                                      limit, W_STD, B_STD)
    print("errors", [round(e, 4) for e in errors], "slope", round(slope, 3))
    assert -0.7 <= slope <= -0.3, (errors, slope)


class Grouped(nn.Module):
    def __init__(self, n, groups):
        super().__init__()
        self.c1 = nn.Conv2d(2, n, 3, padding=1)
        self.c2 = nn.Conv2d(n, n, 3, padding=1, groups=groups)
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_grouped_convolutions_fixed_groups_compile_depthwise_and_input_groups_refuse():
    """A fixed number of groups has the limit of one convolution (each group an independent
    matrix on an exchangeable share of the width; the slow test checks it against wide
    networks); a depthwise convolution has no Gaussian limit."""
    x = _x(3, 6)
    _both(Grouped(16, 4), Grouped(16, 1), x, _x(2, 7))
    with pytest.raises(UnsupportedOpError, match="depthwise"):
        ntkcompile.compile(Grouped(16, 16))(x)

    class InputGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.out = nn.Conv2d(2, 8, 3, padding=1, groups=2), nn.Linear(8, 1)

        def forward(self, x):
            return self.out(torch.relu(self.c(x)).mean((2, 3)))

    with pytest.raises(UnsupportedOpError, match="of the input"):
        ntkcompile.compile(InputGroups())(x)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_grouped_cnn_empirical_ntk_converges():
    """``Grouped(n, 4)``: 4 groups at every width, 6 seeds, widths 64..1024.  Measured (3 s):
    errors 0.085, 0.085, 0.040, 0.024, 0.031, slope -0.47."""
    x = _x(3, 8)
    limit = ntkcompile.compile(Grouped(16, 4), W_std=W_STD, b_std=B_STD)(x).ntk
    errors, slope = convergence_sweep(lambda n: Grouped(n, 4), [64, 128, 256, 512, 1024], range(6), x, None,
                                      limit, W_STD, B_STD)
    print("errors", [round(e, 4) for e in errors], "slope", round(slope, 3))
    assert -0.7 <= slope <= -0.3, (errors, slope)
