"""Sequences: a Linear over positions (ops/linear.py), stacking, concatenation and size-1
axes along positions (ops/positions.py, ops/concat.py), dtype casts (ops/shape.py).

Oracles: models that compute the same function another way -- a Linear on ``(N, T, d)``
read at the last step is the MLP on that step, and averaged over time it is a 1x1
``Conv1d`` with global average pooling (another code path: stencils and
``spatial.global_mean``); a stack of vectors read back, averaged or mapped by a shared
Linear is the same computation on the vectors themselves (weight sharing across uses).
"""
import pytest
import torch
from torch import nn

import ntkcompile
from helpers.kernels import close, kernels
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

D, N = 3, 16


class SeqMLP(nn.Module):
    """Linears on (N, T, d), read at the last step or averaged over time."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.l1, self.l2, self.out = nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.erf(self.l2(torch.relu(self.l1(x))))
        return self.out(h[:, -1] if self.read == "last" else h.mean(1))


class StepMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.erf(self.l2(torch.relu(self.l1(x[:, -1])))))


class PointwiseConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Conv1d(D, N, 1), nn.Conv1d(N, N, 1), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.erf(self.l2(torch.relu(self.l1(x.transpose(1, 2))))).mean(2))


def test_linear_over_a_sequence_read_at_the_last_step_is_the_mlp_on_it():
    x = torch.randn(5, 4, D, dtype=torch.float64)
    close(kernels(SeqMLP("last"), x), kernels(StepMLP(), x))


def test_linear_over_a_sequence_averaged_is_a_pointwise_conv_with_pooling():
    x = torch.randn(5, 4, D, dtype=torch.float64)
    kfn = ntkcompile.compile(SeqMLP("mean"), W_std=1.3, b_std=0.4)
    close(kfn(x), kernels(PointwiseConv(), x))
    assert "at every position" in kfn.program


def test_linear_over_a_sequence_through_export():
    x = torch.randn(5, 4, D, dtype=torch.float64)
    ep = torch.export.export(SeqMLP("mean"), (x.float(),))
    close(kernels(ep, x), kernels(PointwiseConv(), x))


class Grid(nn.Module):
    """Two position axes before the features: (N, A, B, d)."""

    def __init__(self):
        super().__init__()
        self.l1, self.out = nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l1(x)).mean((1, 2)))


class GridConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.out = nn.Conv2d(D, N, 1), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l1(x.permute(0, 3, 1, 2))).mean((2, 3)))


def test_linear_over_two_position_axes():
    x = torch.randn(4, 2, 3, D, dtype=torch.float64)
    close(kernels(Grid(), x), kernels(GridConv(), x))


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.l, self.out = nn.Conv1d(D, N, 3, padding=1), nn.Linear(6, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(self.l(torch.relu(self.c(x))).mean(1))


def test_linear_on_a_feature_map_acts_on_positions_and_is_refused():
    with pytest.raises(WidthInferenceError, match="acts on that axis, not on the width"):
        ntkcompile.compile(ConvThenLinear(), input_shape=(D, 6))


class Stacked(nn.Module):
    """Vectors stacked into a sequence, then one Linear at every position."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.l, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h1, h2 = torch.tanh(self.a(x)), torch.relu(self.b(x))
        if self.how == "separate":
            return self.out((torch.erf(self.l(h1)) + torch.erf(self.l(h2)) + torch.erf(self.l(h1))) / 3)
        if self.how == "stack":
            seq = torch.stack([h1, h2, h1], dim=1)
        elif self.how == "stack-time-first":
            seq = torch.stack([h1, h2, h1]).transpose(0, 1)
        elif self.how == "cat":
            seq = torch.cat([h1.unsqueeze(1), torch.stack([h2, h1], 1)], dim=1)
        else:                                        # x[:, None] and cat of length-1 sequences
            seq = torch.cat([h1[:, None], h2[:, None, :], h1.unsqueeze(-2)], 1)
        return self.out(torch.erf(self.l(seq)).mean(1))


@pytest.mark.parametrize("how", ["stack", "stack-time-first", "cat", "none-index"])
def test_a_stacked_sequence_is_its_vectors(how):
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(Stacked(how), x), kernels(Stacked("separate"), x))


class StackRead(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        h1, h2 = torch.tanh(self.a(x)), self.b(x)
        if self.how == "direct":
            return self.out(torch.relu(h2))
        seq = torch.stack([h1, h2], dim=1)
        if self.how == "select":
            return self.out(torch.relu(seq[:, 1]))
        if self.how == "unbind":
            return self.out(torch.relu(seq.unbind(1)[1]))
        return self.out(torch.relu(seq[:, 1:].squeeze(1)))


@pytest.mark.parametrize("how", ["select", "unbind", "squeeze"])
def test_reading_a_stack_back(how):
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(StackRead(how), x), kernels(StackRead("direct"), x))


class StackedRNN(nn.Module):
    """An Elman RNN written by hand, its states stacked and averaged (or summed)."""

    def __init__(self, stack, steps=3):
        super().__init__()
        self.stack, self.steps = stack, steps
        self.ih, self.hh, self.mix, self.out = nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.erf(self.ih(x[:, 0]))
        hs = [h]
        for t in range(1, self.steps):
            h = torch.erf(self.ih(x[:, t]) + self.hh(h))
            hs.append(h)
        if self.stack:
            seq = torch.stack(hs, 1)
            return self.out(torch.relu(self.mix(seq)).mean(1) + seq[:, -1])
        return self.out(sum(torch.relu(self.mix(h)) for h in hs) / len(hs) + hs[-1])


def test_stacked_rnn_states():
    """The same matrix applied to the stacked states and to each state: weight sharing."""
    x = torch.randn(4, 3, D, dtype=torch.float64)
    close(kernels(StackedRNN(True), x), kernels(StackedRNN(False), x), tol=1e-11)


class CatTime(nn.Module):
    """A conv feature map cut along time and put back together."""

    def __init__(self, cut):
        super().__init__()
        self.cut = cut
        self.c, self.l, self.out = nn.Conv1d(D, N, 3, padding=1), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.relu(self.c(x)).transpose(1, 2)           # (N, T, C)
        if self.cut:
            h = torch.cat([h[:, :2], h[:, 2:]], dim=1)
        return self.out(torch.erf(self.l(h)).mean(1))


def test_cat_along_time():
    x = torch.randn(4, D, 5, dtype=torch.float64)
    close(kernels(CatTime(True), x), kernels(CatTime(False), x))


class StackPlusBias(nn.Module):
    """A bias added to a stacked sequence is constant over its positions."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.a, self.b = nn.Linear(D, N), nn.Linear(D, N)
        self.offset = nn.Parameter(torch.zeros(N))
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        h1, h2 = torch.tanh(self.a(x)), torch.sin(self.b(x))
        if self.stack:
            return self.out(torch.relu(torch.stack([h1, h2], 1) + self.offset).mean(1))
        return self.out((torch.relu(h1 + self.offset) + torch.relu(h2 + self.offset)) / 2)


def test_a_bias_added_to_a_stack():
    """A nonlinearity of a stack of H-vars goes inside it: ``relu(stack(h) + b) = stack(relu(h + b))``
    (Monte Carlo over four slots, on the same samples for both programs)."""
    x = torch.randn(4, D, dtype=torch.float64)
    kw = dict(mc_samples=4000, mc_replicates=2)
    close(kernels(StackPlusBias(True), x, **kw), kernels(StackPlusBias(False), x, **kw), tol=1e-10)


class Casts(nn.Module):
    def __init__(self, cast):
        super().__init__()
        self.cast = cast
        self.l1, self.out = nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        c = self.cast
        return c(self.out(c(torch.relu(self.l1(c(x).float())), x)), x)


CASTS = {
    "identity": lambda t, x: t,
    "double_float": lambda t, x: t.double().float(),
    "to_dtype": lambda t, x: t.to(torch.float64).to(dtype=torch.float32),
    "type": lambda t, x: t.type(torch.float64).type_as(x),
    "to_x": lambda t, x: t.to(x),
    "detach_cpu": lambda t, x: t.detach().cpu().contiguous(),
}


@pytest.mark.parametrize("name", [n for n in CASTS if n != "identity"])
@pytest.mark.parametrize("frontend", ["fx", "export", "core"])
def test_dtype_casts_anywhere(name, frontend):
    """Casts of the input, of width vectors and of the output (``model(x).double()``); the input
    passes through float32 in both models (the fixed input is what the model computes), but
    a frontend may elide a cast to the dtype a tensor already had when exported: 1e-6."""
    x = torch.randn(4, D, dtype=torch.float64)
    cast = CASTS[name]
    model = Casts(lambda t, x=None: cast(t, x if x is not None else t))
    if frontend != "fx":
        model = torch.export.export(model, (x.float(),))
        if frontend == "core":
            model = model.run_decompositions()
    close(kernels(model, x), kernels(Casts(lambda t, x=None: t), x), tol=1e-6)


class ReadoutOnSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l(x)))


class PointMLP(nn.Module):
    """``ReadoutOnSequence`` on one vector."""

    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.relu(self.l(x)))


def test_a_readout_of_every_position_is_the_mlp_on_every_pair_of_positions():
    """A readout at every position: kernels ``(N1, N2, T, T)``.  The network applies one
    MLP at every position, so entry ``[a, b, s, t]`` is the MLP's kernel of the vectors
    ``x[a, s]`` and ``x[b, t]`` (weights shared by positions: the NTK sums over them),
    computed here by the plain MLP on the ``N T`` vectors."""
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(n, 4, D, generator=g, dtype=torch.float64) for n in (3, 2))
    kfn = ntkcompile.compile(ReadoutOnSequence(), W_std=1.2, b_std=0.3, input_shape=(4, D))
    assert kfn.output_positions == (4,)
    mlp = ntkcompile.compile(PointMLP(), W_std=1.2, b_std=0.3)
    for a, b in ((x1, None), (x1, x2)):
        got = kfn(a, b)
        want = mlp(a.reshape(-1, D), None if b is None else b.reshape(-1, D))
        nb = a.shape[0] if b is None else b.shape[0]
        for name in ("nngp", "ntk"):
            w = getattr(want, name).reshape(a.shape[0], 4, nb, 4).permute(0, 2, 1, 3)
            assert getattr(got, name).shape == (a.shape[0], nb, 4, 4)
            torch.testing.assert_close(getattr(got, name), w, rtol=1e-12, atol=1e-12)


def test_a_readout_of_channels_before_positions_is_refused():
    class ChannelsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.out = nn.Conv1d(D, N, 1), nn.Linear(N, 1)

        def forward(self, x):
            return self.out(torch.relu(self.c(x)))      # (N, C, T): the Linear would act on T

    with pytest.raises(WidthInferenceError, match="positions"):
        ntkcompile.compile(ChannelsFirst(), input_shape=(D, N))     # T = N: the shapes fit


class VectorThenSequence(nn.Module):
    """A vector put in front of a sequence (cat along time of positions (1,) and (T,))."""

    def __init__(self, cat):
        super().__init__()
        self.cat = cat
        self.c, self.l, self.l2, self.out = nn.Conv1d(D, N, 1), nn.Linear(D, N), nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        seq = torch.relu(self.c(x)).transpose(1, 2)       # (N, T, C)
        v = torch.tanh(self.l(x[:, :, 0]))                # (N, C)
        if self.cat:
            return self.out(torch.erf(self.l2(torch.cat([v.unsqueeze(1), seq], 1))).mean(1))
        steps = [torch.erf(self.l2(seq[:, t])) for t in range(x.shape[2])]
        return self.out((torch.erf(self.l2(v)) + sum(steps)) / (len(steps) + 1))


def test_a_vector_in_front_of_a_sequence():
    x = torch.randn(4, D, 3, dtype=torch.float64)
    close(kernels(VectorThenSequence(True), x), kernels(VectorThenSequence(False), x), tol=1e-11)


@pytest.mark.parametrize("model, reference, cores", [
    # aten.stack, aten.transpose (core ATen stacks along the batch axis, then bmm: not supported)
    (lambda: Stacked("stack-time-first"), lambda: Stacked("separate"), (False,)),
    # aten.unsqueeze, aten.cat; core: cat along the width, then a view splitting it
    (lambda: Stacked("none-index"), lambda: Stacked("separate"), (False, True)),
    (lambda: StackRead("unbind"), lambda: StackRead("direct"), (False, True)),       # aten.unbind
    (lambda: StackRead("select"), lambda: StackRead("direct"), (False, True)),       # aten.select
    (lambda: StackRead("squeeze"), lambda: StackRead("direct"), (False, True)),      # aten.slice, aten.squeeze
])
def test_stacks_through_export(model, reference, cores):
    x = torch.randn(5, D, dtype=torch.float64)
    for core in cores:
        ep = torch.export.export(model(), (x.float(),))
        close(kernels(ep.run_decompositions() if core else ep, x), kernels(reference(), x))


class Flattened(nn.Module):
    """A sequence flattened into the width: its positions concatenated."""

    def __init__(self, flat):
        super().__init__()
        self.flat = flat
        self.a, self.b, self.l = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(2 * N, N)
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        h1, h2 = torch.tanh(self.a(x)), torch.relu(self.b(x))
        h = torch.stack([h1, h2], 1).flatten(1) if self.flat else torch.cat([h1, h2], 1)
        return self.out(torch.erf(self.l(h)))


def test_a_flattened_sequence_is_the_concatenation_of_its_positions():
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(Flattened(True), x), kernels(Flattened(False), x))
    ep = torch.export.export(Flattened(True), (x.float(),)).run_decompositions()
    close(kernels(ep, x), kernels(Flattened(False), x))


class StackMean(nn.Module):
    """A mean over a stack of vectors (no per-position op in between) is their average."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        h1, h2 = torch.tanh(self.a(x)), self.b(x)
        if self.how == "direct":
            return self.out((h1 + h2) / 2 + torch.relu(h2))
        seq = torch.stack([h1, h2], dim=1)
        return self.out(seq.mean(1) + torch.relu(seq[:, 1:]).mean(1))


def test_mean_of_a_stack_is_the_average():
    x = torch.randn(5, D, dtype=torch.float64)
    close(kernels(StackMean("stack"), x), kernels(StackMean("direct"), x))


class NormThenSelect(nn.Module):
    """An eval-mode BatchNorm (gain and shift trained) on a feature map, then one position
    read out; or that position first, then a BatchNorm1d with the same parameters."""

    def __init__(self, first, relu=False):
        super().__init__()
        self.first, self.relu = first, relu
        self.c, self.bn2, self.bn1 = nn.Conv2d(2, N, 3, padding=1), nn.BatchNorm2d(N), nn.BatchNorm1d(N)
        self.l, self.out = nn.Linear(N, N), nn.Linear(N, 1)

    def forward(self, x):
        h = torch.relu(self.c(x))
        h = self.bn1(h[:, :, 1, 2]) if self.first else self.bn2(h)[:, :, 1, 2]
        return self.out(torch.tanh(self.l(torch.relu(h) if self.relu else h)))


def test_a_position_of_a_normalized_map_is_the_normalization_of_that_position():
    """The gain and shift are read off at the position kept (they were read off at every
    position when the selection was pushed into the normalized nonlinearity beside them:
    an NTK 10 % off, found against wide networks).  A nonlinearity after that selection is
    refused (the selected vector is not Gaussian)."""
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = ntkcompile.compile(NormThenSelect(True).eval(), W_std=1.2, b_std=0.3)(x)
    b = ntkcompile.compile(NormThenSelect(False).eval(), W_std=1.2, b_std=0.3)(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12)
    with pytest.raises(UnsupportedOpError, match="GPosMap of a non-Gaussian vector"):
        ntkcompile.compile(NormThenSelect(False, relu=True).eval())(x)
