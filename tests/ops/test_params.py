"""Width-sized parameters used directly (ops/params.py): ``h + self.offset``, ``h * self.gain``.

Oracles: an added parameter is a bias, so a Linear without bias plus the parameter equals
the Linear with its bias (with the same ``b_std``, also through ``std`` overrides by the
parameter's or its module's name); a gain of ones multiplying the readout's input adds
exactly ``W_std^2 E[h h']`` (the NNGP without readout bias) to the NTK, its
``E[(dy h)(dy' h')]`` with ``dy = v``.
"""
import pytest
import torch
from torch import nn

import ntkcompile
from helpers.kernels import close
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

D, N = 3, 16


class Offset(nn.Module):
    def __init__(self, bare, shape=(N,)):
        super().__init__()
        self.bare = bare
        self.l1 = nn.Linear(D, N, bias=not bare)
        self.hh = nn.Linear(N, N, bias=not bare)
        if bare:
            self.offset = nn.Parameter(torch.zeros(shape))
            self.cell = nn.Module()
            self.cell.hh_bias = nn.Parameter(torch.randn(N))
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        if self.bare:
            h = torch.tanh(self.offset + self.l1(x))
            return self.out(torch.relu(self.hh(h) + self.cell.hh_bias) - h)
        h = torch.tanh(self.l1(x))
        return self.out(torch.relu(self.hh(h)) - h)


@pytest.mark.parametrize("shape", [(N,), (1, N)])
def test_an_added_parameter_is_a_bias(shape):
    x = torch.randn(5, D, dtype=torch.float64)
    a = ntkcompile.compile(Offset(True, shape), W_std=1.3, b_std=0.4)(x)
    b = ntkcompile.compile(Offset(False), W_std=1.3, b_std=0.4)(x)
    close(a, b)


def test_std_by_parameter_or_module_name():
    x = torch.randn(5, D, dtype=torch.float64)
    std_bare = {"offset": (1.3, 0.7), "cell": (1.3, 0.2)}
    std_lin = {"l1": (1.3, 0.7), "hh": (1.3, 0.2)}
    a = ntkcompile.compile(Offset(True), W_std=1.3, b_std=0.4, std=std_bare)(x)
    b = ntkcompile.compile(Offset(False), W_std=1.3, b_std=0.4, std=std_lin)(x)
    close(a, b)
    a = ntkcompile.compile(Offset(True), W_std=1.3, b_std=0.4, std={"cell.hh_bias": (1.0, 0.2)})(x)
    b = ntkcompile.compile(Offset(False), W_std=1.3, b_std=0.4, std={"hh": (1.3, 0.2)})(x)
    close(a, b)


def test_added_parameter_through_export():
    x = torch.randn(5, D, dtype=torch.float64)
    ep = torch.export.export(Offset(True), (x.float(),))
    close(ntkcompile.compile(ep, W_std=1.3, b_std=0.4)(x), ntkcompile.compile(Offset(False), W_std=1.3, b_std=0.4)(x))


class ChannelOffset(nn.Module):
    """A per-channel parameter of shape (C, 1) added to a feature map: a conv's bias."""

    def __init__(self, bare):
        super().__init__()
        self.bare = bare
        self.c = nn.Conv1d(D, N, 3, padding=1, bias=not bare)
        if bare:
            self.offset = nn.Parameter(torch.zeros(N, 1))
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        h = self.c(x) + self.offset if self.bare else self.c(x)
        return self.out(torch.relu(h).mean(2))


def test_a_channel_parameter_on_a_feature_map_is_its_bias():
    x = torch.randn(4, D, 5, dtype=torch.float64)
    close(ntkcompile.compile(ChannelOffset(True), W_std=1.3, b_std=0.4)(x),
          ntkcompile.compile(ChannelOffset(False), W_std=1.3, b_std=0.4)(x))


class Gain(nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.l1, self.out = nn.Linear(D, N), nn.Linear(N, 1, bias=False)
        self.gain = nn.Parameter(torch.full((N,), gain)) if gain is not None else None

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.out(h * self.gain if self.gain is not None else h)


def test_a_gain_adds_its_term():
    x = torch.randn(5, D, dtype=torch.float64)
    with_gain = ntkcompile.compile(Gain(1.0), W_std=1.3, b_std=0.4)(x)
    plain = ntkcompile.compile(Gain(None), W_std=1.3, b_std=0.4)(x)
    close((with_gain.nngp, with_gain.ntk), (plain.nngp, plain.ntk + plain.nngp), tol=1e-11)


def test_a_gain_of_another_constant_scales():
    x = torch.randn(5, D, dtype=torch.float64)
    k = ntkcompile.compile(Gain(2.0), W_std=1.3, b_std=0.4)(x)
    plain = ntkcompile.compile(Gain(None), W_std=1.3, b_std=0.4)(x)
    # y = 2 h: the NNGP and the other terms scale by 4; the gain's term E[(v h)(v h')] does not
    close((k.nngp, k.ntk), (4 * plain.nngp, 4 * plain.ntk + plain.nngp), tol=1e-11)


def test_a_gain_of_random_entries_is_refused():
    model = Gain(1.0)
    with torch.no_grad():
        model.gain.normal_()
    with pytest.raises(WidthInferenceError, match="not all equal"):
        ntkcompile.compile(model)


class GainTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.out = nn.Linear(D, N), nn.Linear(N, 1)
        self.gain = nn.Parameter(torch.ones(N))

    def forward(self, x):
        h = torch.tanh(self.l1(x)) * self.gain
        return self.out(torch.relu(h) * self.gain)


def test_a_gain_used_twice_is_refused():
    with pytest.raises(UnsupportedOpError, match="'gain' used twice"):
        ntkcompile.compile(GainTwice())


class Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.out = nn.Linear(D, N), nn.Linear(N, 1)
        self.register_buffer("offset", torch.zeros(N))

    def forward(self, x):
        return self.out(self.l1(x) + self.offset)


def test_a_fixed_buffer_of_the_width_is_still_refused():
    with pytest.raises(WidthInferenceError, match="fixed-dimensional tensor"):
        ntkcompile.compile(Buffer())
