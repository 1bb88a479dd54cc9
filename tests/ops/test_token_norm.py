"""LayerNorm and RMSNorm of every position (a Transformer's per-token LayerNorm, a
channels-last ConvNeXt-style LayerNorm): statistics per input *and position*.

Oracles: a network that applies the same layers to every position separately is the
plain MLP on each vector, so its readout at every position (kernels ``(N1, N2, T, T)``)
is the MLP's kernel of the ``N T`` vectors, entry by entry; its last step is the MLP on
the last vectors; its average over positions is the mean of the per-position kernel
(linearity in the readout's seed).  A 3x3 convolution of the input followed by layers
that act on each pixel is the MLP on the input's 3x3 patches (``F.unfold``).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

D, N, T = 3, 16, 4
OPTS = dict(W_std=1.2, b_std=0.3)


def _layernorm(affine):
    return lambda n: nn.LayerNorm(n, elementwise_affine=affine)


NORMS = {"layernorm": _layernorm(False), "layernorm-affine": _layernorm(True)}
if hasattr(nn, "RMSNorm"):
    NORMS["rmsnorm-affine"] = nn.RMSNorm


class TokenMLP(nn.Module):
    """Linear, norm, relu, Linear, norm, readout: on every position of ``(N, T, d)`` (or on
    vectors ``(N, d)``); ``read`` picks the last position or averages them first."""

    def __init__(self, norm, read=None, d=D):
        super().__init__()
        self.read = read
        self.l1, self.n1, self.l2, self.n2 = nn.Linear(d, N), norm(N), nn.Linear(N, N), norm(N)
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        h = self.n2(self.l2(torch.relu(self.n1(self.l1(x)))))
        if self.read == "last":
            h = h[:, -1]
        elif self.read == "mean":
            h = h.mean(1)
        return self.out(h)


def _per_position(kernels, n1, n2, p):
    """The point model's ``(n1 p, n2 p)`` kernels as ``(n1, n2, p, p)``."""
    return {name: getattr(kernels, name).reshape(n1, p, n2, p).permute(0, 2, 1, 3) for name in ("nngp", "ntk")}


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_norm_of_every_position_is_the_norm_of_each_vector(norm):
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(n, T, D, generator=g, dtype=torch.float64) for n in (3, 2))
    seq = ntkcompile.compile(TokenMLP(NORMS[norm]), **OPTS)
    point = ntkcompile.compile(TokenMLP(NORMS[norm]), **OPTS)
    for a, b in ((x1, None), (x1, x2)):
        got = seq(a, b)
        nb = len(a) if b is None else len(b)
        want = _per_position(point(a.reshape(-1, D), None if b is None else b.reshape(-1, D)), len(a), nb, T)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-12, atol=1e-12)
    last = ntkcompile.compile(TokenMLP(NORMS[norm], "last"), **OPTS)(x1, x2)
    want = point(x1[:, -1], x2[:, -1])
    mean = ntkcompile.compile(TokenMLP(NORMS[norm], "mean"), **OPTS)(x1, x2)
    steps = seq(x1, x2)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(last, name), getattr(want, name), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(getattr(mean, name), getattr(steps, name).mean((2, 3)), rtol=1e-12, atol=1e-12)


class NormSelectNonlinear(nn.Module):
    def __init__(self, affine, point=False):
        super().__init__()
        self.point = point
        self.l1, self.n1, self.l2, self.out = nn.Linear(D, N), _layernorm(affine)(N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = self.n1(self.l1(x))
        return self.out(torch.tanh(self.l2(torch.relu(h if self.point else h[:, -1]))))


def test_a_nonlinearity_of_a_selected_normalized_position():
    """Without a trainable gain the selection moves into the nonlinearity (the selected
    statistics with it: ``ir.SSelect``); with one it is refused, since the gain's NTK term
    needs the nonlinearity's derivative at the positions the gain multiplies (it was
    silently 0.14 off before the refusal)."""
    g = torch.Generator().manual_seed(4)
    x1, x2 = (torch.randn(n, T, D, generator=g, dtype=torch.float64) for n in (3, 2))
    got = ntkcompile.compile(NormSelectNonlinear(False), **OPTS)(x1, x2)
    want = ntkcompile.compile(NormSelectNonlinear(False, point=True), **OPTS)(x1[:, -1], x2[:, -1])
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    with pytest.raises(UnsupportedOpError, match="gain/shift.*before"):
        ntkcompile.compile(NormSelectNonlinear(True), **OPTS)(x1, x2)


class ChannelsLastCNN(nn.Module):
    """A 3x3 convolution, then per pixel: LayerNorm over the channels (channels last), relu,
    a 1x1 convolution (channels first again), relu, a readout of every pixel."""

    def __init__(self):
        super().__init__()
        self.c1, self.n = nn.Conv2d(2, N, 3, padding=1), nn.LayerNorm(N)
        self.c2, self.out = nn.Conv2d(N, N, 1), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.relu(self.n(self.c1(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.out(torch.relu(self.c2(h)).permute(0, 2, 3, 1))


class PatchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.n, self.l2, self.out = nn.Linear(18, N), nn.LayerNorm(N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l2(torch.relu(self.n(self.l1(x))))))


def test_a_channels_last_layernorm_of_a_feature_map_is_the_mlp_of_its_patches():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    got = ntkcompile.compile(ChannelsLastCNN(), **OPTS)(x)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)      # (N 16, 2 * 9)
    want = _per_position(ntkcompile.compile(PatchMLP(), **OPTS)(patches), 3, 3, 16)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name).reshape(3, 3, 16, 16), want[name], rtol=1e-12, atol=1e-12)


def test_a_layernorm_over_a_position_axis_is_refused():
    class ChannelsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.n, self.out = nn.Conv1d(2, N, 1), nn.LayerNorm(5), nn.Linear(N, 1)

        def forward(self, x):
            return self.out(self.n(self.c(x)).mean(2))

    with pytest.raises(WidthInferenceError, match="move the channels last"):
        ntkcompile.compile(ChannelsFirst())(torch.randn(2, 2, 5))


class BatchNormPoolReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, N, 3, padding=1), nn.BatchNorm2d(N)
        self.c2, self.out = nn.Conv2d(N, N, 3), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.relu(F.avg_pool2d(self.bn(self.c1(x)), 2))
        return self.out(torch.relu(self.c2(h)).mean((2, 3)))


def test_a_nonlinearity_of_a_pooled_normalized_map_is_refused():
    """Eval BatchNorm (trainable gain), average pooling, relu: the gain's NTK term would need
    the pooling inside relu's derivative.  Before the refusal this compiled, and wide networks
    did not converge to it (errors 0.045, 0.065, 0.076 at widths 256, 1024, 4096)."""
    with pytest.raises(UnsupportedOpError, match="gain/shift"):
        ntkcompile.compile(BatchNormPoolReLU().eval())(torch.randn(2, 2, 6, 6))
