"""Max pooling (ops/maxpool.py, kernels/maxpool_mc.py): joint Monte Carlo over a tile.

Oracles:

* windows of two: ``max(g1, g2) = (g1 + g2)/2 + |g1 - g2|/2`` written with
  ``torch.maximum`` of strided slices goes through closed forms (the absolute value's
  arc-cosine V-transform, Stein's lemma), exact; the Monte Carlo kernels agree within
  their reported standard errors;
* ``relu`` commutes with the max: ``max_pool(relu(g))``, ``relu(max_pool(g))`` and the
  global max ``amax`` / ``AdaptiveMaxPool2d(1)`` of a map with one window are one atom
  each, equal to each other exactly (same draws);
* the kernels are Gram matrices of samples: symmetric and PSD;
* slow: empirical NTKs of a wide CNN with ``nn.MaxPool2d(2)`` (torch.func).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.convergence import convergence_sweep
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

W_STD, B_STD = 1.3, 0.2


def _x(n, seed, shape=(2, 6)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Pairs(nn.Module):
    """conv1d -> max over windows of two (pooled or by hand) -> 1x1 conv -> relu -> flatten readout."""

    def __init__(self, exact, n=16):
        super().__init__()
        self.exact = exact
        self.c, self.c2, self.out = nn.Conv1d(2, n, 3, padding=1), nn.Conv1d(n, n, 1), nn.Linear(n * 3, 1)

    def forward(self, x):
        h = self.c(x)
        m = torch.maximum(h[:, :, ::2], h[:, :, 1::2]) if self.exact else F.max_pool1d(h, 2)
        return self.out(torch.relu(self.c2(m)).flatten(1))


def test_windows_of_two_agree_with_the_closed_form_within_standard_errors():
    """``rms z`` over the entries (z = difference / reported standard error) is about 1
    for an honest error bar; with 10 entries per kernel a bound of 2.5 fails by chance
    with probability below 1e-3 even if the entries were independent."""
    x = _x(4, 0)
    exact = ntkcompile.compile(Pairs(True), W_std=W_STD, b_std=B_STD)(x)
    kfn = ntkcompile.compile(Pairs(False), W_std=W_STD, b_std=B_STD)
    mc = kfn(x)
    assert kfn._joint and mc.ntk_stderr is not None
    for name in ("nngp", "ntk"):
        a, b, se = getattr(exact, name), getattr(mc, name), getattr(mc, f"{name}_stderr")
        z = ((b - a) / se).triu()
        rms = float((z.pow(2).sum() / 10).sqrt())
        assert rms < 2.5, (name, rms)
        assert float(se.max() / a.abs().max()) < 0.02          # the error bar is small, too
        flat = b
        assert torch.equal(flat, flat.T)
        assert float(torch.linalg.eigvalsh(flat).min()) > -1e-12 * float(flat.abs().max())


class Orders(nn.Module):
    def __init__(self, how, n=16):
        super().__init__()
        self.how = how
        self.c, self.out = nn.Conv2d(2, n, 3, padding=1), nn.Linear(n, 1)
        self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x):
        g = self.c(x)
        if self.how == "relu-then-pool":
            h = F.max_pool2d(torch.relu(g), 4)
        elif self.how == "pool-then-relu":
            h = torch.relu(F.max_pool2d(g, 4))
        elif self.how == "adaptive":
            h = self.pool(torch.relu(g))
        else:
            h = torch.relu(g).amax((2, 3))
        return self.out(h.flatten(1))


def test_relu_commutes_with_the_max_and_a_global_max_is_one_window():
    x = _x(3, 1, (2, 4, 4))
    kernels = [ntkcompile.compile(Orders(how), W_std=W_STD, b_std=B_STD)(x)
               for how in ("relu-then-pool", "pool-then-relu", "adaptive", "amax")]
    for k in kernels[1:]:
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(k, name), getattr(kernels[0], name), rtol=1e-12, atol=1e-12)


class MNISTNet(nn.Module):
    """PyTorch's MNIST example, shrunk: conv -> max_pool -> relu, twice, then an MLP head."""

    def __init__(self, n):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, n, 3, padding=1), nn.Conv2d(n, n, 3, padding=1)
        self.fc, self.out = nn.Linear(n * 4, n), nn.Linear(n, 1)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.c1(x), 2))
        x = F.relu(F.max_pool2d(self.c2(x), 2))
        return self.out(F.relu(self.fc(x.flatten(1))))


def test_cross_kernels_are_blocks_of_the_joint_kernel():
    x1, x2 = _x(3, 2, (1, 8, 8)), _x(2, 3, (1, 8, 8))
    kfn = ntkcompile.compile(MNISTNet(8), W_std=W_STD, b_std=B_STD, joint_samples=512, mc_replicates=2)
    both = kfn(torch.cat([x1, x2])).ntk
    torch.testing.assert_close(kfn(x1, x2).ntk, both[:3, 3:], rtol=1e-12, atol=1e-12)


def test_what_max_pooling_refuses():
    class After(nn.Module):
        def __init__(self, what):
            super().__init__()
            self.what, self.c, self.out = what, nn.Conv2d(2, 8, 3, padding=1), nn.Linear(8 * 4, 1)

        def forward(self, x):
            g = self.c(x)
            if self.what == "gelu":
                return self.out(F.max_pool2d(F.gelu(g), 2).flatten(1))
            return self.out(F.max_pool2d(g, 2, ceil_mode=True).flatten(1))

    with pytest.raises(UnsupportedOpError, match="not monotone"):
        ntkcompile.compile(After("gelu"))(_x(2, 0, (2, 4, 4)))
    with pytest.raises(UnsupportedOpError, match="ceil_mode"):
        ntkcompile.compile(After("ceil"))(_x(2, 0, (2, 4, 4)))


def test_a_max_over_the_width_is_refused():
    class WidthMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.out = nn.Linear(3, 8), nn.Linear(1, 1)

        def forward(self, x):
            return self.out(self.l(x).amax(1, keepdim=True))

    with pytest.raises(WidthInferenceError, match="sqrt\\(2 log n\\)"):
        ntkcompile.compile(WidthMax())(torch.randn(2, 3))

    class ChannelsAndPositions(nn.Module):      # the width axis among the axes: the same reason
        def __init__(self):
            super().__init__()
            self.c, self.out = nn.Conv2d(2, 8, 3, padding=1), nn.Linear(4, 1)

        def forward(self, x):
            return self.out(torch.relu(self.c(x)).amax((1, 2)))

    with pytest.raises(WidthInferenceError, match="sqrt\\(2 log n\\)"):
        ntkcompile.compile(ChannelsAndPositions())(_x(2, 0, (2, 4, 4)))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_maxpool_cnn_empirical_ntk_converges():
    """``MNISTNet`` on 4 inputs of 1x8x8, 10 seeds, widths 64..1024; the limit at 8 x 16384
    joint samples (its relative standard error must stay under a fifth of the error at the
    widest network).  Measured (20 s): errors 0.169, 0.112, 0.102, 0.065, 0.047, slope -0.45,
    limit's relative stderr 0.0036 (1/13 of the widest error)."""
    x = _x(4, 4, (1, 8, 8))
    limit = ntkcompile.compile(MNISTNet(8), W_std=W_STD, b_std=B_STD, joint_samples=16384)(x)
    errors, slope = convergence_sweep(MNISTNet, [64, 128, 256, 512, 1024], range(10), x, None,
                                      limit.ntk, W_STD, B_STD)
    se = float(torch.linalg.norm(limit.ntk_stderr) / torch.linalg.norm(limit.ntk))
    print("errors", [round(e, 4) for e in errors], "slope", round(slope, 3), "limit stderr", round(se, 4))
    assert -0.7 <= slope <= -0.3, (errors, slope)
    assert se <= errors[-1] / 5, (se, errors)
