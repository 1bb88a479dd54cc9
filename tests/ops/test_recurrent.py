"""Recurrent layers (ops/recurrent.py, kernels/recurrence.py) against independent oracles.

* The Elman recursion written here in numpy (arc-cosine closed forms for relu,
  Gauss-Hermite quadrature for tanh): pre-activation covariances over every pair
  of time steps, then the backward recursion of TP II Sec. 4 and
  ``NTK = readout + sum_{s,t} Delta[s,t] P[s,t]``.
* The same network written by hand as a Python loop that torch.fx unrolls (one
  G-var per step, weight sharing through the same ``nn.Linear``): a different
  code path through the generic planner.
"""
import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile.errors import InputShapeError, NonFiniteKernelError, UnsupportedOpError, WidthInferenceError

W, B = 1.2, 0.3


# -- the numpy oracle --------------------------------------------------------------

def _relu_moments(k11, k12, k22):
    s = np.sqrt(k11 * k22)
    c = np.clip(k12 / s, -1.0, 1.0)
    th = np.arccos(c)
    return s / (2 * np.pi) * (np.sin(th) + (np.pi - th) * c), (np.pi - th) / (2 * np.pi)


def _legendre(n, half_width=12.0):
    """Gauss-Legendre nodes on [-L, L] weighted by the standard normal density."""
    z, w = np.polynomial.legendre.leggauss(n)
    z, w = z * half_width, w * half_width * np.exp(-0.5 * (z * half_width) ** 2) / np.sqrt(2 * np.pi)
    return z, w


_NODES = _legendre(400, 8.5)     # node spacing ~0.04: tanh's poles at +-i pi/(2 s) are far


def _tanh_moments(k11, k12, k22):
    """``E[tanh u tanh v]`` and ``E[tanh' u tanh' v]`` by tensor-product Gauss-Legendre
    (not the trapezoidal rule ntkcompile uses)."""
    z, w = _NODES
    k11, k12, k22 = np.broadcast_arrays(k11, k12, k22)
    s1, s2 = np.sqrt(k11), np.sqrt(k22)
    c = np.clip(k12 / (s1 * s2), -1.0, 1.0)
    r = np.sqrt(1 - c * c)
    zv, wv = z.reshape(-1, *([1] * k12.ndim)), w.reshape(-1, *([1] * k12.ndim))
    out_f, out_d = np.zeros(k12.shape), np.zeros(k12.shape)
    for a, wa in zip(z, w):
        fa, fb = np.tanh(s1 * a), np.tanh(s2 * (c * a + r * zv))
        out_f += wa * fa * (wv * fb).sum(0)
        out_d += wa * (1 - fa ** 2) * (wv * (1 - fb ** 2)).sum(0)
    return out_f, out_d


def elman_oracle(x1, x2, act, readout, bias=True):
    """NNGP and NTK of ``Linear(RNN(x))`` with zero h0 (one layer, one direction)."""
    moments = _relu_moments if act == "relu" else _tanh_moments
    x1, x2 = x1.numpy(), x2.numpy()
    d, T = x1.shape[2], x1.shape[1]
    X = np.einsum("asd,btd->abst", x1, x2) / d
    X1 = np.einsum("asd,asd->as", x1, x1) / d
    X2 = np.einsum("asd,asd->as", x2, x2) / d
    b2 = 2 * B ** 2 if bias else 0.0
    # same-input variances, step by step
    P1, P2 = np.zeros_like(X1), np.zeros_like(X2)
    for Pd, Xd in ((P1, X1), (P2, X2)):
        c = np.zeros(Xd.shape[0])
        for t in range(T):
            Pd[:, t] = W ** 2 * Xd[:, t] + b2 + W ** 2 * c
            c = moments(Pd[:, t], Pd[:, t], Pd[:, t])[0]
    P, C, G = np.zeros_like(X), np.zeros_like(X), np.zeros_like(X)
    for s in range(T):
        for t in range(T):
            prev = C[:, :, s - 1, t - 1] if s and t else 0.0
            P[:, :, s, t] = W ** 2 * X[:, :, s, t] + b2 + W ** 2 * prev
            C[:, :, s, t], G[:, :, s, t] = moments(P1[:, s, None], P[:, :, s, t], P2[None, :, t])
    def backward(O):
        D = np.zeros_like(X)
        for s in reversed(range(T)):
            for t in reversed(range(T)):
                nxt = D[:, :, s + 1, t + 1] if s + 1 < T and t + 1 < T else 0.0
                D[:, :, s, t] = G[:, :, s, t] * (O[:, :, s, t] + W ** 2 * nxt)
        return (D * P).sum(axis=(2, 3))

    if readout == "steps":     # an output at every step: one backward pass per pair of output steps
        nngp = W ** 2 * C + B ** 2
        ntk = nngp.copy()
        for s in range(T):
            for t in range(T):
                O = np.zeros_like(X)
                O[:, :, s, t] = W ** 2
                ntk[:, :, s, t] += backward(O)
        return nngp, ntk
    if readout == "last":
        nngp_core = C[:, :, -1, -1]
        O = np.zeros_like(X)
        O[:, :, -1, -1] = W ** 2
    else:
        nngp_core = C.mean(axis=(2, 3))
        O = np.full_like(X, W ** 2 / T ** 2)
    nngp = W ** 2 * nngp_core + B ** 2
    return nngp, nngp + backward(O)


class RNNModel(nn.Module):
    def __init__(self, act="tanh", readout="last", batch_first=True, bias=True, layers=1, bidirectional=False):
        super().__init__()
        self.rnn = nn.RNN(3, 16, num_layers=layers, nonlinearity=act, batch_first=batch_first, bias=bias,
                          bidirectional=bidirectional)
        self.out = nn.Linear(16 * (2 if bidirectional else 1), 1)
        self.readout, self.batch_first = readout, batch_first

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, h_n = self.rnn(x)
        t = 1 if self.batch_first else 0
        if self.readout == "last":
            return self.out(out[:, -1] if self.batch_first else out[-1])
        if self.readout == "h_n":
            return self.out(h_n[-1])
        if self.readout == "steps":
            return self.out(out)            # (N, T, 1): an output at every step
        return self.out(out.mean(t))


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 6, 3, generator=g, dtype=torch.float64), torch.randn(3, 6, 3, generator=g,
                                                                                 dtype=torch.float64)


@pytest.mark.parametrize("act,tol", [("relu", 1e-12), ("tanh", 1e-9)])
@pytest.mark.parametrize("readout", ["last", "mean", "steps"])
def test_rnn_against_numpy_recursion(seqs, act, tol, readout):
    """tanh at 192 nodes (estimated error ~1e-11; the default 96 nodes refined to
    ``quadrature_tol`` = 1e-6 leave ~1e-7 after six steps)."""
    x1, x2 = seqs
    kfn = ntkcompile.compile(RNNModel(act, readout), W_std=W, b_std=B, quadrature_degree=192)
    for a, b in ((x1, x1), (x1, x2)):
        k = kfn(a) if a is b else kfn(a, b)
        nngp, ntk = elman_oracle(a, b, act, readout)
        scale = np.abs(ntk).max()
        assert np.abs(k.nngp.numpy() - nngp).max() < tol * scale
        assert np.abs(k.ntk.numpy() - ntk).max() < tol * scale


def test_rnn_without_bias_and_time_first(seqs):
    x1, _ = seqs
    nngp, ntk = elman_oracle(x1, x1, "relu", "last", bias=False)
    k = ntkcompile.compile(RNNModel("relu", batch_first=False, bias=False), W_std=W, b_std=B)(x1)
    assert np.abs(k.ntk.numpy() - ntk).max() < 1e-12 * np.abs(ntk).max()
    assert np.abs(k.nngp.numpy() - nngp).max() < 1e-12 * np.abs(ntk).max()


def test_h_n_is_the_last_step(seqs):
    x1, x2 = seqs
    a = ntkcompile.compile(RNNModel("tanh", "h_n"), W_std=W, b_std=B)(x1, x2)
    b = ntkcompile.compile(RNNModel("tanh", "last"), W_std=W, b_std=B)(x1, x2)
    assert torch.equal(a.ntk, b.ntk) and torch.equal(a.nngp, b.nngp)


# -- against the same network written by hand (fx unrolls the loop) -------------------

class Elman(nn.Module):
    """``nn.RNN`` written as a Python loop (with biases, step 0 adds the hidden bias by
    hand, as torch's ``W_hh h_0 + b_hh`` with ``h_0 = 0`` does)."""

    def __init__(self, act, T, layers=1, reverse=False, bias=False):
        super().__init__()
        self.act, self.T, self.reverse = act, T, reverse
        self.ih = nn.ModuleList([nn.Linear(3 if i == 0 else 16, 16, bias=bias) for i in range(layers)])
        self.hh = nn.ModuleList([nn.Linear(16, 16, bias=bias) for _ in range(layers)])
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        seq = [x[:, t] for t in range(self.T)]
        for ih, hh in zip(self.ih, self.hh):
            steps = list(reversed(range(self.T))) if self.reverse else list(range(self.T))
            h, outs = None, {}
            for t in steps:
                if h is None:
                    pre = ih(seq[t]) if hh.bias is None else ih(seq[t]) + hh.bias
                else:
                    pre = ih(seq[t]) + hh(h)
                h = torch.relu(pre) if self.act == "relu" else torch.tanh(pre)
                outs[t] = h
            seq = [outs[t] for t in range(self.T)]
        return self.out(seq[-1])


@pytest.mark.parametrize("layers,bias", [(1, False), (2, False), (2, True)])
def test_stacked_rnn_equals_the_unrolled_loop(seqs, layers, bias):
    x1, x2 = seqs
    m = RNNModel("tanh", layers=layers, bias=bias)
    a = ntkcompile.compile(m, W_std=W, b_std=B)(x1, x2)
    b = ntkcompile.compile(Elman("tanh", 6, layers, bias=bias), W_std=W, b_std=B)(x1, x2)
    assert torch.allclose(a.nngp, b.nngp, rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.ntk, b.ntk, rtol=1e-10, atol=1e-12)


class BiFirst(nn.Module):
    """A bidirectional layer read at step 0: the forward state after one step, the
    backward one after the whole (reversed) sequence."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True, bidirectional=True, bias=False)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, 0])


class BiByHand(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T
        self.f_ih = nn.Linear(3, 16, bias=False)
        self.b_ih, self.b_hh = nn.Linear(3, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        fwd = torch.tanh(self.f_ih(x[:, 0]))
        h = torch.tanh(self.b_ih(x[:, self.T - 1]))
        for t in reversed(range(self.T - 1)):
            h = torch.tanh(self.b_ih(x[:, t]) + self.b_hh(h))
        return self.out(torch.cat([fwd, h], dim=1))


def test_bidirectional_equals_two_loops_by_hand(seqs):
    x1, x2 = seqs
    a = ntkcompile.compile(BiFirst(), W_std=W, b_std=B)(x1, x2)
    b = ntkcompile.compile(BiByHand(6), W_std=W, b_std=B)(x1, x2)
    assert torch.allclose(a.nngp, b.nngp, rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.ntk, b.ntk, rtol=1e-10, atol=1e-12)


class CellLoop(nn.Module):
    """``nn.RNNCell`` called in a Python loop."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.cell = nn.RNNCell(3, 16, nonlinearity="relu")
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = None
        for t in range(self.T):
            h = self.cell(x[:, t], h)
        return self.out(h)


def test_rnn_cell_in_a_loop_equals_nn_rnn(seqs):
    x1, x2 = seqs
    a = ntkcompile.compile(CellLoop(6), W_std=W, b_std=B)(x1, x2)
    nngp, ntk = elman_oracle(x1, x2, "relu", "last")
    assert np.abs(a.nngp.numpy() - nngp).max() < 1e-12 * np.abs(ntk).max()
    assert np.abs(a.ntk.numpy() - ntk).max() < 1e-12 * np.abs(ntk).max()


class LastState(nn.Module):
    """``h_n[-1]`` of a stacked module: an index into the final states."""

    def __init__(self, cls):
        super().__init__()
        self.rnn, self.out = cls(3, 16, num_layers=2, batch_first=True), nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[1][-1])


@pytest.mark.filterwarnings("ignore:The tensor attributes")     # torch's own, about _flat_weights
@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU])
def test_exported_program_equals_the_module(seqs, cls):
    """torch.export lowers the module to one fused ATen op and ``h_n[-1]`` to ``aten.select``:
    the same kernel as the module traced by fx (Monte Carlo with the same seeds for the GRU)."""
    x1, x2 = seqs
    m = LastState(cls)
    ep = torch.export.export(m, (torch.randn(2, 6, 3),))
    a = ntkcompile.compile(ep, W_std=W, b_std=B, joint_samples=256)(x1, x2)
    b = ntkcompile.compile(m, W_std=W, b_std=B, joint_samples=256, input_shape=(6, 3))(x1, x2)
    assert torch.allclose(a.ntk, b.ntk, rtol=1e-12, atol=1e-14)
    assert (a.nngp is None) == (b.nngp is None)


def test_code_does_not_grow_with_time():
    lines = []
    for T in (25, 200):
        kfn = ntkcompile.compile(RNNModel("relu"), W_std=W, b_std=B, input_shape=(T, 3))
        kfn(torch.randn(2, T, 3, dtype=torch.float64))
        lines.append(len(kfn.code.splitlines()))
    assert lines[1] <= 1.5 * lines[0]


# -- bad input ------------------------------------------------------------------------

class WithH0(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[0], 16, dtype=x.dtype)
        return self.out(self.rnn(x, h0)[0][:, -1])


def test_explicit_h0_is_refused():
    with pytest.raises(UnsupportedOpError, match="initial state"):
        ntkcompile.compile(WithH0(), input_shape=(5, 3))


def test_wrong_feature_size_is_refused():
    with pytest.raises(InputShapeError, match="Expected 3, got 4"):
        ntkcompile.compile(RNNModel(), input_shape=(5, 4))
    kfn = ntkcompile.compile(RNNModel(), input_shape=(5, 3))
    with pytest.raises(InputShapeError, match=r"compiled for inputs of shape \(N, 5, 3\)"):
        kfn(torch.randn(2, 5, 4))


class Options(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.rnn = nn.LSTM(3, 16, batch_first=True, **kw)
        self.out = nn.Linear(kw.get("proj_size") or 16, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_projection_and_training_dropout_are_refused():
    with pytest.raises(UnsupportedOpError, match="proj_size=4 is not supported.*use proj_size=0"):
        ntkcompile.compile(Options(proj_size=4), input_shape=(5, 3))
    with pytest.raises(UnsupportedOpError, match=r"dropout=0.5 in training mode.*model.eval\(\)"):
        ntkcompile.compile(Options(num_layers=2, dropout=0.5).train(), input_shape=(5, 3))
    # in eval mode the same module is the deterministic network
    ntkcompile.compile(Options(num_layers=2, dropout=0.5).eval(), input_shape=(5, 3), joint_samples=64)


def test_gated_kernel_of_overflowing_inputs_names_the_scale(seqs):
    """Inputs whose products overflow: the joint evaluator's tile (self, and a cross kernel
    sampled with both batches) raises NonFiniteKernelError naming the scale, never NaN."""
    x1, x2 = seqs
    kfn = ntkcompile.compile(Gated(nn.GRU), W_std=W, b_std=B, joint_samples=64)
    for args in ((x1 * 1e160,), (x1 * 1e160, x2)):
        with pytest.raises(NonFiniteKernelError, match=r"(?s)overflow float64.*e\+160: rescale them"):
            kfn(*args)


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(3, 16, batch_first=True), nn.Linear(16, 1)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.out(self.rnn(packed)[1][-1])


def test_packed_sequences_are_refused():
    with pytest.raises(UnsupportedOpError, match="pack_padded_sequence.*Pad every sequence to the same length"):
        ntkcompile.compile(Packed(), input_shape=(5, 3))


class UsesCn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 16, batch_first=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        _, (h, c) = self.rnn(x)
        return self.out(c[-1])


def test_lstm_cell_state_output_is_refused():
    with pytest.raises(UnsupportedOpError, match="c_n"):
        ntkcompile.compile(UsesCn(), input_shape=(5, 3))


class LayoutMismatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn1 = nn.RNN(3, 16, batch_first=True)
        self.rnn2 = nn.RNN(16, 16, batch_first=False)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.rnn2(self.rnn1(x)[0])[0][-1])


def test_batch_first_mismatch_between_layers_is_refused():
    with pytest.raises(WidthInferenceError, match="batch_first"):
        ntkcompile.compile(LayoutMismatch(), input_shape=(5, 3))


# -- gated cells: the joint Monte Carlo evaluator --------------------------------------

class Gated(nn.Module):
    def __init__(self, cls, T=None, **kw):
        super().__init__()
        self.rnn = cls(3, 16, batch_first=True, **kw)
        self.out = nn.Linear(16 * (2 if kw.get("bidirectional") else 1), 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class CellsByHand(nn.Module):
    """``nn.GRUCell``/``nn.LSTMCell`` called in a Python loop (fx unrolls it): each step is
    an H-atom of every earlier gate, evaluated entry by entry by the generic planner."""

    def __init__(self, cls, T):
        super().__init__()
        self.T, self.lstm = T, cls is nn.LSTMCell
        self.cell = cls(3, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        state = None
        for t in range(self.T):
            state = self.cell(x[:, t], state)
        return self.out(state[0] if self.lstm else state)      # (h, c) of an LSTM cell


def _z(a, b):
    """The largest |difference| in units of the combined standard error."""
    worst = 0.0
    for name in ("nngp", "ntk"):
        se = getattr(a, name + "_stderr") ** 2
        if getattr(b, name + "_stderr") is not None:
            se = se + getattr(b, name + "_stderr") ** 2
        worst = max(worst, float(((getattr(a, name) - getattr(b, name)).abs() / se.sqrt()).max()))
    return worst


class GRUFirstStep(nn.Module):
    """A GRU's first step from the zero state without biases, written as its formula:
    ``h = (1 - sigmoid(W_z x)) tanh(W_n x)`` (the reset gate multiplies ``W_hn h0 = 0``)."""

    def __init__(self):
        super().__init__()
        self.r, self.z, self.n = (nn.Linear(3, 16, bias=False) for _ in range(3))
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        x = x[:, 0]
        return self.out((1 - torch.sigmoid(self.z(x))) * torch.tanh(self.n(x)))


def test_gru_one_step_against_factorized_quadrature():
    """``(1 - sigmoid(a_z)) tanh(a_n)`` of two independent Gaussians factorizes into exact
    2-D expectations (forward and backward); the module's joint Monte Carlo must agree
    within 5 of its standard errors."""
    x = torch.randn(5, 1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = ntkcompile.compile(Gated(nn.GRU, bias=False), W_std=W, b_std=B)(x)
    b = ntkcompile.compile(GRUFirstStep(), W_std=W, b_std=B)(x)
    assert b.ntk_stderr is None and b.nngp_stderr is None          # exact: no Monte Carlo there
    assert a.ntk_stderr is not None and float(a.ntk_stderr.max()) < 0.02 * float(a.ntk.abs().max())
    assert _z(a, b) < 5


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_gated_cross_kernel_is_a_block_and_psd(seqs, cls):
    x1, x2 = seqs
    kfn = ntkcompile.compile(Gated(cls), W_std=W, b_std=B, joint_samples=1024, mc_replicates=4)
    both = kfn(torch.cat([x1, x2]))
    cross = kfn(x1, x2)
    assert torch.equal(cross.ntk, both.ntk[:4, 4:]) and torch.equal(cross.nngp, both.nngp[:4, 4:])
    for k in (both.nngp, both.ntk):
        assert torch.equal(k, k.T)
        assert float(torch.linalg.eigvalsh(k).min()) > -1e-12 * float(k.abs().max())
    # the reported standard errors are the replicates' spread: positive, and a small
    # fraction of the kernel at 4 x 1024 coordinates
    assert float(both.ntk_stderr.min()) > 0
    assert float(both.ntk_stderr.max()) < 0.1 * float(both.ntk.abs().max())


def test_gated_kernels_in_tiles_agree_with_one_joint_sample(seqs, monkeypatch):
    """More inputs than one joint sample covers: self and cross tiles are sampled apart
    (each cross tile with both of its batches).  The tiled kernels must agree with the
    single-sample ones within 5 combined standard errors, and the kernel of x1 against
    x2 with the transpose of x2 against x1 (the same tiles, mirrored)."""
    x1, x2 = seqs
    x = torch.cat([x1, x2])
    kfn = ntkcompile.compile(Gated(nn.GRU), W_std=W, b_std=B, joint_samples=512, mc_replicates=4)
    whole = kfn(x)
    monkeypatch.setattr(type(kfn), "_JOINT_ROWS", 4 * x.shape[1] + 1)       # four sequences per sample
    assert kfn._joint_side(len(x)) == 4
    tiled = kfn(x)
    assert torch.equal(tiled.ntk, tiled.ntk.T)
    assert _z(tiled, whole) < 5
    assert torch.allclose(kfn(x1, x2).ntk, kfn(x2, x1).ntk.T, rtol=0, atol=5 * float(whole.ntk_stderr.max()))


def test_gated_standard_errors_match_the_seed_to_seed_spread(seqs):
    """The reported standard error of a joint Monte Carlo kernel is the spread of its
    replicates: over 32 compile seeds (independent replicates), the entries' standard
    deviation over seeds must match the root-mean-square reported error.  With 32 seeds
    a sample standard deviation is within about 13 % of its expectation (one standard
    error); the band is 2.5 of them.  Measured: 1.00-1.02 (median over entries) at 64
    seeds with S = 256, 512 and 4096; here 1.06 (NNGP) and 0.91 (NTK)."""
    x = seqs[0][:4, :3]
    ks = [ntkcompile.compile(Gated(nn.GRU), W_std=W, b_std=B, joint_samples=256, mc_replicates=4,
                             seed=s)(x) for s in range(32)]
    iu = torch.triu_indices(4, 4)
    for name in ("nngp", "ntk"):
        k = torch.stack([getattr(a, name) for a in ks])[:, iu[0], iu[1]]
        se = torch.stack([getattr(a, name + "_stderr") for a in ks])[:, iu[0], iu[1]]
        ratio = float((k.std(0) / se.pow(2).mean(0).sqrt()).median())
        assert 0.7 < ratio < 1.35, (name, ratio)


@pytest.mark.slow
@pytest.mark.parametrize("cls,cell", [(nn.GRU, nn.GRUCell), (nn.LSTM, nn.LSTMCell)])
def test_gated_module_equals_cells_by_hand(cls, cell):
    """Two independent Monte Carlo evaluators (joint over the tile, and entry by entry
    over the unrolled cells' G-vars) within 5 combined standard errors (~1-2 min each)."""
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = ntkcompile.compile(Gated(cls), W_std=W, b_std=B)(x)
    b = ntkcompile.compile(CellsByHand(cell, 2), W_std=W, b_std=B, mc_samples=40_000)(x)
    assert _z(a, b) < 5
