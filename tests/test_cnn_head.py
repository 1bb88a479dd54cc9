"""An MLP head after a CNN's features: conv -> global average pooling -> hidden Linear ->
nonlinearity -> readout (issue 10, item 6), how most CNN classifiers end.

Oracles:

* linear maps commute: ``fc(mean(h))`` is ``mean(conv1x1(h))`` with the Linear's weight as a
  1x1 convolution, and the mean over positions is then an average pooling of a
  convolution (a ``GPool`` of Gaussians and its own planning rules: ``spatial.pool_pair``),
  where the head's path maps the pooled features by a ``GPosMap``;
* slow: empirical NTKs of wide networks (torch.func).
"""

import pytest
import torch
from torch import nn

import ntkcompile
from helpers.convergence import convergence_sweep
from ntkcompile.errors import UnsupportedOpError

W_STD, B_STD = 1.4, 0.2


class Head(nn.Module):
    """conv -> relu -> mean over positions -> Linear -> tanh -> Linear."""

    def __init__(self, width, pool="mean"):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)
        self.pool = pool

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.pool == "mean":
            z = h.mean((2, 3))
        elif self.pool == "adaptive":
            z = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.out(torch.tanh(self.fc(z)))


class Commuted(nn.Module):
    """``Head`` with the hidden Linear applied first, as a 1x1 convolution, then averaged."""

    def __init__(self, width, size):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.Conv2d(width, width, 1)
        self.pool = nn.AvgPool2d(size)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.pool(self.fc(torch.relu(self.conv(x)))).flatten(1)))


def _x(n, seed, size=4):
    return torch.randn(n, 2, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("pool", ["mean", "adaptive"])
def test_a_hidden_linear_after_global_pooling_is_the_pooled_1x1_convolution(pool):
    x1, x2 = _x(3, 0), _x(2, 1)
    head = ntkcompile.compile(Head(16, pool), W_std=W_STD, b_std=B_STD)
    commuted = ntkcompile.compile(Commuted(16, 4), W_std=W_STD, b_std=B_STD)
    for a, b in ((x1, None), (x1, x2)):
        got, want = head(a, b), commuted(a, b)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-11, atol=1e-12)


class FlattenHead(nn.Module):
    """conv -> relu -> flatten(1) -> Linear -> relu -> Linear (LeNet/VGG style)."""

    def __init__(self, width, size=2):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.Linear(width * size * size, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


class PerPositionLinears(nn.Module):
    """``FlattenHead`` with the hidden Linear written as its blocks: a Linear per position
    (fan-in ``C``) on the selected position, summed and scaled by ``1/sqrt(|P|)`` (the
    flattened Linear's fan-in is ``C |P|``), plus one bias."""

    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(4))
        self.bias = nn.Parameter(torch.zeros(width))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        z = sum(fc(h[:, :, i // 2, i % 2]) for i, fc in enumerate(self.fc)) * 0.5 + self.bias
        return self.out(torch.relu(z))


def test_a_hidden_linear_after_flatten_is_a_linear_per_position():
    """A Linear on ``flatten(1)`` of a 2x2 map equals four Linears on the selected positions
    (GPosMap selections and matrices of their own), exactly."""
    x1, x2 = _x(3, 0, 2), _x(2, 1, 2)
    flat = ntkcompile.compile(FlattenHead(16), W_std=W_STD, b_std=B_STD)
    blocks = ntkcompile.compile(PerPositionLinears(16), W_std=W_STD, b_std=B_STD)
    for a, b in ((x1, None), (x1, x2)):
        got, want = flat(a, b), blocks(a, b)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-11, atol=1e-12)


def test_an_op_other_than_a_linear_after_flatten_is_refused():
    class FlattenThenRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(2, 8, 3, padding=1), nn.Linear(8 * 16, 1)

        def forward(self, x):
            return self.out(torch.relu(torch.relu(self.conv(x)).flatten(1) * 2.0))

    with pytest.raises(UnsupportedOpError, match="only a Linear may follow a flatten"):
        ntkcompile.compile(FlattenThenRelu())(_x(2, 0))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_cnn_with_mlp_head_empirical_ntk_converges(head):
    """6 seeds, widths 64..1024 (4x4 inputs; the flatten head on the 4x4 map).  Measured
    (2-core machine, 22 s for both): pooled errors 0.103, 0.048, 0.050, 0.038, 0.025, slope
    -0.44; flatten 0.220, 0.159, 0.112, 0.083, 0.053, slope -0.51."""
    x = _x(4, 3)
    model = Head if head == "pooled" else (lambda n: FlattenHead(n, 4))
    limit = ntkcompile.compile(model(16), W_std=W_STD, b_std=B_STD)(x).ntk
    errors, slope = convergence_sweep(model, [64, 128, 256, 512, 1024], range(6), x, None,
                                      limit, W_STD, B_STD)
    print("errors", [round(e, 4) for e in errors], "slope", round(slope, 3))
    assert -0.7 <= slope <= -0.3, (errors, slope)
