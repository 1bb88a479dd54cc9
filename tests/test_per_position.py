"""A readout at every position (a per-step readout of a sequence, a per-pixel readout of a
channels-last feature map): kernels ``(N1, N2, *P, *P)``, and the dynamics on them.

Oracles, each independent of the per-position backward (``planner.steps``):

* the Elman recursion in numpy (``tests/ops/test_recurrent.py``, readout ``"steps"``)
  and the MLP applied to every vector (``tests/ops/test_sequences.py``);
* linearity of the backward in the readout's seed: the mean over positions of the
  diagonal ``[p, p]`` entries is the *flatten* readout's kernel (own vector per
  position; the aligned-positions layout, another code path), the mean over all pairs
  ``[p, q]`` is the *global-average-pooling* readout's (``spatial.global_mean``);
* the last-step readout of the sequence cut after step ``s`` is the ``[s, s]`` entry
  (the network is causal);
* the dynamics: the exact matrix-power recursion on the flattened ``(N T, N T)`` kernel;
* slow: empirical NTKs of wide networks (torch.func), and SGD of finite networks.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.convergence import fit_loglog_slope, relative_frobenius
from ntkcompile import dynamics, harness
from ntkcompile.errors import WidthInferenceError
from ntkcompile.empirical import empirical_ntk_full
from ntkcompile.parametrize import ntk_parametrize

W_STD, B_STD = 1.3, 0.3
D, T = 3, 4


def _x(n, seed, shape=(T, D)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Steps(nn.Module):
    """``cls`` (batch first) read at every step, or at the last one."""

    def __init__(self, cls, width, read="steps", out=1, **kw):
        super().__init__()
        self.rnn = cls(D, width, batch_first=True, **kw)
        self.out = nn.Linear(width * (2 if kw.get("bidirectional") else 1), out)
        self.read = read

    def forward(self, x):
        h = self.rnn(x)[0]
        return self.out(h if self.read == "steps" else h[:, -1] if self.read == "last" else h.mean(1))


class PixelNet(nn.Module):
    """Two convolutions, then a Linear on channels-last maps: an output at every pixel;
    ``read`` = ``"flatten"`` or ``"gap"`` reads the same features once per input."""

    def __init__(self, width, read="pixels"):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.read = read
        self.out = nn.Linear(width * 16 if read == "flatten" else width, 1)

    def forward(self, x):
        h = torch.relu(self.c2(torch.tanh(self.c1(x))))
        if self.read == "flatten":
            return self.out(h.flatten(1))
        if self.read == "gap":
            return self.out(h.mean((2, 3)))
        return self.out(h.permute(0, 2, 3, 1))


def _compile(model, **kw):
    return ntkcompile.compile(model, W_std=W_STD, b_std=B_STD, **kw)


# -- kernels -----------------------------------------------------------------------------

def test_shapes_symmetry_and_output_positions():
    x1, x2 = _x(3, 0), _x(2, 1)
    kfn = _compile(Steps(nn.RNN, 16, out=2, num_layers=2))
    k, kc = kfn(x1), kfn(x1, x2)
    assert kfn.output_positions == (T,)
    assert k.ntk.shape == (3, 3, T, T) and kc.ntk.shape == (3, 2, T, T)
    for name in ("nngp", "ntk"):
        a = getattr(k, name)
        assert torch.equal(a, a.permute(1, 0, 3, 2))       # K[a, b, s, t] = K[b, a, t, s] exactly
        both = getattr(kfn(torch.cat([x1, x2])), name)
        torch.testing.assert_close(getattr(kc, name), both[:3, 3:], rtol=1e-13, atol=1e-13)
    flat = k.ntk.permute(0, 2, 1, 3).reshape(3 * T, 3 * T)
    lam = torch.linalg.eigvalsh(flat)
    assert lam.min() > -1e-12 * lam.max()
    # tiles: a kernel against itself in tiles of 1 is the same kernel (blocks transposed over positions)
    torch.testing.assert_close(kfn(x1, tile_size=1).ntk, k.ntk, rtol=1e-13, atol=1e-13)
    assert _compile(Steps(nn.RNN, 16, read="last")).output_positions is None     # before the input shape
    assert _compile(Steps(nn.RNN, 16, read="last"), input_shape=(T, D)).output_positions == ()


@pytest.mark.parametrize("cut", range(1, T + 1))
def test_stacked_rnn_step_s_is_the_last_step_of_the_sequence_cut_after_s(cut):
    """A causal network: output ``s`` depends on steps ``<= s`` only, so the ``[s, s]``
    entries are the kernels of the last-step readout on ``x[:, :s + 1]`` (exactly:
    the same closed forms on the same numbers)."""
    x1, x2 = _x(3, 0), _x(2, 1)
    steps = _compile(Steps(nn.RNN, 16, num_layers=2, nonlinearity="relu"))(x1, x2)
    last = _compile(Steps(nn.RNN, 16, read="last", num_layers=2, nonlinearity="relu"))(x1[:, :cut], x2[:, :cut])
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(steps, name)[:, :, cut - 1, cut - 1], getattr(last, name),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", [lambda: Steps(nn.RNN, 16, bidirectional=True),
                                   lambda: PixelNet(16)], ids=["bidirectional-rnn", "conv-pixels"])
def test_means_of_positions_are_the_flatten_and_pooled_readouts(model):
    """The backward is linear in the readout's seed: a flatten readout seeds
    ``delta_pq / |P|``, average pooling ``1 / |P|^2`` (readout part likewise), so their
    kernels are means of the per-position kernel's entries."""
    pixels = isinstance(model(), PixelNet)
    x = _x(3, 2, (2, 4, 4)) if pixels else _x(3, 2)
    k = _compile(model())(x)
    P = 16 if pixels else T
    per = {name: getattr(k, name).reshape(3, 3, P, P) for name in ("nngp", "ntk")}
    if pixels:
        flat, gap = _compile(PixelNet(16, "flatten"))(x), _compile(PixelNet(16, "gap"))(x)
    else:
        gap = _compile(Steps(nn.RNN, 16, read="mean", bidirectional=True))(x)
        flat = None
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(per[name].mean((2, 3)), getattr(gap, name), rtol=1e-10, atol=1e-10)
        if flat is not None:
            diag = torch.diagonal(per[name], dim1=2, dim2=3).mean(-1)
            torch.testing.assert_close(diag, getattr(flat, name), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def test_gated_step_s_agrees_with_the_cut_sequence_within_its_standard_errors(cls):
    """Monte Carlo on both sides (independent draws): the ``[s, s]`` blocks agree with
    the cut sequences' last-step kernels within 5 combined standard errors (rms z); the
    flattened ``(N T, N T)`` NTK is exactly symmetric and PSD (Gram matrices of samples)."""
    x = _x(4, 3)
    opts = dict(joint_samples=2048, mc_replicates=4)
    k = _compile(Steps(cls, 16), **opts)(x)
    flat = k.ntk.permute(0, 2, 1, 3).reshape(4 * T, 4 * T)
    assert torch.equal(flat, flat.T)
    lam = torch.linalg.eigvalsh(flat)
    assert lam.min() > -1e-10 * lam.max()
    for cut in (1, T):
        last = _compile(Steps(cls, 16, read="last"), **opts)(x[:, :cut])
        for name in ("nngp", "ntk"):
            a, b = getattr(k, name)[:, :, cut - 1, cut - 1], getattr(last, name)
            se = torch.sqrt(getattr(k, f"{name}_stderr")[:, :, cut - 1, cut - 1] ** 2
                            + getattr(last, f"{name}_stderr") ** 2)
            z = ((a - b) / se).triu()
            rms = float(z.pow(2).sum() / (4 * 5 / 2)) ** 0.5
            assert rms < 5, (cls.__name__, cut, name, rms)


def test_stacked_gru_per_step_runs_both_layers_passes_together():
    """A GRU on a GRU: the lower layer's backward gets every output pair's gradient
    covariance from the upper one (leading axes through the joint Monte Carlo)."""
    x = _x(3, 4)
    k = _compile(Steps(nn.GRU, 16, num_layers=2), joint_samples=1024)(x)
    flat = k.ntk.permute(0, 2, 1, 3).reshape(3 * T, 3 * T)
    lam = torch.linalg.eigvalsh(flat)
    assert lam.min() > -1e-10 * lam.max()
    assert torch.isfinite(k.ntk).all() and k.ntk_stderr is not None


# -- dynamics ----------------------------------------------------------------------------

def _power_oracle(k, kc, y, lr, steps, rows):
    """Full-batch ``F.mse_loss`` steps on the flattened kernel by exact linear algebra."""
    n, out = y.shape[0] * rows, y.shape[-1]
    flat = lambda a: a.permute(0, 2, 1, 3).reshape(a.shape[0] * rows, -1)  # noqa: E731
    K, Kc = flat(k), flat(kc)
    a = 2 * lr / (n * out)
    r = -y.reshape(n, out).clone()
    ft = torch.zeros(Kc.shape[0], out, dtype=torch.float64)
    for _ in range(steps):
        ft -= a * Kc @ r
        r -= a * K @ r
    return r + y.reshape(n, out), ft


def test_simulate_per_step_mse_is_the_matrix_power_recursion():
    x, xt = _x(6, 5), _x(3, 6)
    y = torch.randn(6, T, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kfn = _compile(Steps(nn.RNN, 16, out=2))
    tr = dynamics.simulate(kfn, x, y, xt, lr=0.5, steps=40)
    assert tr.train.shape == (41, 6, T, 2) and tr.test.shape == (41, 3, T, 2)
    train, test = _power_oracle(kfn(x).ntk, kfn(xt, x).ntk, y, 0.5, 40, T)
    torch.testing.assert_close(tr.train[-1].reshape(-1, 2), train, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr.test[-1].reshape(-1, 2), test, rtol=1e-10, atol=1e-12)
    # the loss as PyTorch computes it on (N, T, out) outputs
    assert float(tr.loss[-1]) == pytest.approx(float(F.mse_loss(tr.train[-1], y)), rel=1e-12)
    # a callable loss sees the outputs as the network gives them, (B, T, out)
    shapes = []

    def loss(f, t):
        shapes.append(tuple(f.shape))
        return F.mse_loss(f, t)

    tr2 = dynamics.simulate(kfn, x, y, xt, lr=0.5, steps=40, loss=loss)
    torch.testing.assert_close(tr2.train, tr.train, rtol=1e-12, atol=1e-13)
    assert shapes[0] == (6, T, 2)


def test_simulate_per_step_minibatches_use_every_step_of_a_batch():
    x = _x(6, 5)
    y = torch.randn(6, T, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kfn = _compile(Steps(nn.RNN, 16))
    batches = [torch.tensor([0, 3]), torch.tensor([5, 1, 2])]
    tr = dynamics.simulate(kfn, x, y, lr=0.3, steps=2, batches=batches)
    K = kfn(x).ntk.permute(0, 2, 1, 3).reshape(6 * T, 6 * T)
    f = torch.zeros(6 * T, 1, dtype=torch.float64)
    for idx in batches:
        rows = (idx[:, None] * T + torch.arange(T)).reshape(-1)
        g = 2 * (f[rows] - y.reshape(-1, 1)[rows]) / rows.numel()    # F.mse_loss on the batch's (B, T, 1)
        f = f - 0.3 * K[:, rows] @ g
    torch.testing.assert_close(tr.train[-1].reshape(-1, 1), f, rtol=1e-12, atol=1e-13)


def test_simulate_per_step_cross_entropy_is_the_mean_over_every_step():
    """Class indices ``(N, T)``: ``F.cross_entropy`` on the ``(N T, C)`` rows, stepped by
    hand with its gradient ``(softmax - onehot) / (B T)``."""
    x = _x(5, 5)
    y = torch.randint(0, 3, (5, T), generator=torch.Generator().manual_seed(9))
    kfn = _compile(Steps(nn.RNN, 16, out=3))
    tr = dynamics.simulate(kfn, x, y, loss="cross_entropy", lr=1.0, steps=5)
    assert tr.train.shape == (6, 5, T, 3)
    K = kfn(x).ntk.permute(0, 2, 1, 3).reshape(5 * T, 5 * T)
    f = torch.zeros(5 * T, 3, dtype=torch.float64)
    for _ in range(5):
        g = torch.softmax(f, 1) - F.one_hot(y.reshape(-1), 3).double()
        f = f - K @ g / (5 * T)
    torch.testing.assert_close(tr.train[-1].reshape(-1, 3), f, rtol=1e-12, atol=1e-13)
    assert float(tr.loss[-1]) == pytest.approx(float(F.cross_entropy(f, y.reshape(-1))), rel=1e-12)


def test_a_time_first_per_step_readout_is_refused():
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.RNN(D, 16), nn.Linear(16, 1)

        def forward(self, x):
            return self.out(self.rnn(x.transpose(0, 1))[0])       # (T, N, 1)

    with pytest.raises(WidthInferenceError, match="batch first"):
        _compile(TimeFirst(), input_shape=(T, D))


def test_simulate_per_step_needs_targets_at_every_step():
    kfn = _compile(Steps(nn.RNN, 16))
    with pytest.raises(ValueError, match="every position"):
        dynamics.simulate(kfn, _x(4, 5), torch.zeros(4, 1, dtype=torch.float64), steps=2)


# -- convergence (slow) ------------------------------------------------------------------

def _sweep(factory, x, limit, widths, seeds, per_example):
    errors = []
    for width in widths:
        logs = []
        for seed in seeds:
            torch.manual_seed(seed)
            net = ntk_parametrize(factory(width), W_STD, B_STD).double()
            emp = empirical_ntk_full(net, x, per_example=per_example).reshape(limit.shape)
            logs.append(math.log(relative_frobenius(emp, limit)))
        errors.append(math.exp(sum(logs) / len(logs)))
        print(f"  width {width}: {errors[-1]:.4f}")
    return errors, fit_loglog_slope(widths, errors)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", ["rnn", "gru", "pixels"])
def test_per_position_empirical_ntk_converges(case):
    """Empirical NTKs ``(N, N, *P, *P)`` of wide networks (every pair of outputs,
    ``empirical_ntk_full``) converge to the compiled kernel, 6 seeds, widths 128..2048
    (pixels: 64..1024).  Measured (2-core machine, the four slow tests of this file in
    4.6 min): rnn errors 0.145, 0.135, 0.079, 0.069, 0.046, slope -0.43; gru 0.164,
    0.101, 0.055, 0.051, 0.034, slope -0.56; pixels 0.219, 0.183, 0.106, 0.088, 0.062,
    slope -0.47."""
    widths = [128, 256, 512, 1024, 2048]
    if case == "pixels":
        x, widths = _x(3, 9, (2, 4, 4)), [64, 128, 256, 512, 1024]
        factory, kw, per_example = PixelNet, {}, True
    else:
        x = _x(4, 9)
        factory = (lambda n: Steps(nn.RNN, n)) if case == "rnn" else (lambda n: Steps(nn.GRU, n))
        kw, per_example = ({} if case == "rnn" else dict(joint_samples=32768, mc_replicates=8)), False
    limit = _compile(factory(16), **kw)(x)
    errors, slope = _sweep(factory, x, limit.ntk, widths, range(6), per_example)
    print(f"{case}: slope {slope:.3f}")
    assert errors[-1] < errors[0]
    assert -0.7 <= slope <= -0.3, (errors, slope)
    if limit.ntk_stderr is not None:
        se = float(torch.linalg.norm(limit.ntk_stderr) / torch.linalg.norm(limit.ntk))
        assert se <= errors[-1] / 5, (se, errors)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_per_step_sgd_approaches_simulate():
    """SGD of finite per-step RNNs (``harness.compare_widths``: the same batches, each
    run from its network's own ``f_0``) approaches the infinite-width recursion with
    slope about -1/2; 8 seeds.  Measured: mean gaps 0.251, 0.196, 0.139, 0.127, 0.073
    at widths 128..2048, slope -0.42 (54 s)."""
    x = _x(8, 10)
    y = torch.sin(x.sum(-1, keepdim=True).cumsum(1))           # (N, T, 1): a target at every step
    report = harness.compare_widths(lambda n: Steps(nn.RNN, n), [128, 256, 512, 1024, 2048], x, y, _x(3, 11),
                                    W_std=W_STD, b_std=B_STD, lr=0.5, steps=20, batch_size=4, seeds=range(8))
    print(report.table())
    assert report.infinite[128, 0].train.shape == (21, 8, T, 1)
    assert -0.7 <= report.slope <= -0.3, report.table()
