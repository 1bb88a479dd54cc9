"""GroupNorm with a fixed number of groups (``ops/norm.py``): moments over a group's
channels and every position; in the limit every group has the same moments.

Oracles: on vectors GroupNorm is LayerNorm (its groups' moments are the whole vector's);
right after a convolution without bias, GroupNorm divides the map by a per-input number,
so the network equals the network without it on the input scaled by that number, computed
here from the input's patches (``F.unfold``); wide networks (torch.func NTKs).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.convergence import convergence_sweep
from ntkcompile.errors import UnsupportedOpError

W, B, EPS = 1.3, 0.2, 1e-5


class Vec(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.l, self.n, self.l2, self.out = nn.Linear(3, 8), norm, nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.l2(torch.relu(self.n(self.l(x))))))


@pytest.mark.parametrize("affine", [False, True])
def test_groupnorm_of_vectors_is_layernorm(affine):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = ntkcompile.compile(Vec(nn.GroupNorm(2, 8, affine=affine)), W_std=W, b_std=B)(x)
    want = ntkcompile.compile(Vec(nn.LayerNorm(8, elementwise_affine=affine)), W_std=W, b_std=B)(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)


class Map(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups
        self.c1 = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.n = nn.GroupNorm(groups, 8, eps=EPS, affine=False) if groups else nn.Identity()
        self.c2, self.out = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.n(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_groupnorm_after_a_convolution_rescales_the_input(groups):
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ntkcompile.compile(Map(groups), W_std=W, b_std=B)(x)
    patches = F.unfold(x, 3, padding=1)                              # (N, 2 * 9, 25)
    var = W ** 2 / 18 * (patches ** 2).sum(1).mean(1)                # mean over positions of E[h_s^2]
    scaled = x / (var + EPS).sqrt()[:, None, None, None]
    want = ntkcompile.compile(Map(0), W_std=W, b_std=B)(scaled)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)


class GNNet(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.c1, self.g1, self.c2 = nn.Conv2d(2, n, 3, padding=1), nn.GroupNorm(2, n), nn.Conv2d(n, n, 3, padding=1)
        self.g2, self.c3, self.out = nn.GroupNorm(2, n), nn.Conv2d(n, n, 3, padding=1), nn.Linear(n, 1)

    def forward(self, x):
        h = torch.relu(self.g1(self.c1(x)))           # a Gaussian map normalized
        h = self.c2(self.g2(h))                        # a relu map normalized (a mean), gains and shifts trained
        return self.out(torch.relu(self.c3(torch.relu(h))).mean((2, 3)))


def test_wide_groupnorm_cnns_converge_to_the_kernel():
    """Measured: errors 0.21, 0.049, 0.063 at widths 64, 256, 1024 (3 seeds), slope -0.44."""
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    limit = ntkcompile.compile(GNNet(8), W_std=W, b_std=B)(x).ntk
    errors, slope = convergence_sweep(lambda n: GNNet(n).double(), [64, 256, 1024], [0, 1, 2], x, None, limit, W, B)
    assert errors[-1] < errors[0], errors
    assert -0.7 <= slope <= -0.3, (errors, slope)


def test_instancenorm_and_groups_of_one_channel_are_refused():
    class Inst(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.c, self.n, self.out = nn.Conv2d(2, 8, 3), norm, nn.Linear(8, 1)

        def forward(self, x):
            return self.out(torch.relu(self.n(self.c(x))).mean((2, 3)))

    x = torch.randn(2, 2, 5, 5)
    for norm in (nn.InstanceNorm2d(8), nn.GroupNorm(8, 8)):
        with pytest.raises(UnsupportedOpError, match="InstanceNorm.*random"):
            ntkcompile.compile(Inst(norm))(x)
