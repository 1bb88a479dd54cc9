"""Tests of ntkcompile.empirical and of the convergence helpers.

Oracles: a brute-force Jacobian (``torch.autograd.grad`` once per example and
output, then ``J J^T``); the closed form of TP II Sec. 7 for the 2-hidden-layer
ReLU MLP; the arc-cosine recursion for ReLU MLPs written out below (itself checked
against the neural-tangents reference kernel); and neural-tangents' analytic
kernels in ``tests/fixtures/neural_tangents``.
"""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ntkcompile import empirical
from ntkcompile.empirical import empirical_ntk, empirical_ntk_full, empirical_outputs
from ntkcompile.parametrize import ntk_parametrize
from conftest import REFERENCE_DIR
from tests.helpers.convergence import convergence_sweep, fit_loglog_slope, relative_frobenius

REFERENCE = Path(REFERENCE_DIR)


def _brute_jacobian(model, x, batch=False):
    """``(N, out, P)`` Jacobian over trainable parameters, one autograd call per entry."""
    net = copy.deepcopy(model).double()
    params = [p for p in net.parameters() if p.requires_grad]
    x = x.double()
    rows = []
    for a in range(x.shape[0]):
        y = (net(x) if batch else net(x[a : a + 1]))[a if batch else 0].reshape(-1)
        rows.append(
            torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(y[o], params, retain_graph=True)]) for o in range(y.numel())])
        )
    return torch.stack(rows)


def _brute_full(model, x1, x2, batch=False):
    j1, j2 = _brute_jacobian(model, x1, batch), _brute_jacobian(model, x2, batch)
    return torch.einsum("aip,bjp->abij", j1, j2)


def _small_net(out=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, out))
    return ntk_parametrize(model, 1.3, 0.4)


# ------------------------------------------------------------ exact identities


def test_full_kernel_matches_brute_force():
    net = _small_net(out=3)
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    expect = _brute_full(net, x1, x2)
    full = empirical_ntk_full(net, x1, x2)
    assert full.dtype == torch.float64 and full.shape == (4, 5, 3, 3)
    torch.testing.assert_close(full, expect, rtol=1e-10, atol=1e-12)
    # Per-output factor: the mean of the (o, o) blocks, (1/out) sum_o J_o J_o^T.
    factor = sum(expect[:, :, o, o] for o in range(3)) / 3
    torch.testing.assert_close(empirical_ntk(net, x1, x2), factor, rtol=1e-10, atol=1e-12)


def test_scalar_output_is_j_jt():
    net = _small_net(out=1)
    x1, x2 = torch.randn(4, 3), torch.randn(2, 3)
    j1, j2 = _brute_jacobian(net, x1)[:, 0], _brute_jacobian(net, x2)[:, 0]
    torch.testing.assert_close(empirical_ntk(net, x1, x2), j1 @ j2.T, rtol=1e-10, atol=1e-12)


class _LastLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.LSTM(3, 5, batch_first=True, num_layers=2), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_fused_recurrent_modules_differentiate_whole_batches():
    """torch's fused LSTM has no vmap rule: chunks of examples are differentiated as small
    batches (any chunk size), or the whole batch with per_example=False."""
    torch.manual_seed(0)
    net = ntk_parametrize(_LastLSTM(), 1.1, 0.2)
    x1, x2 = torch.randn(3, 4, 3), torch.randn(2, 4, 3)
    expect = _brute_full(net, x1, x2)
    torch.testing.assert_close(empirical_ntk_full(net, x1, x2), expect, rtol=1e-10, atol=1e-12)
    factor = (expect[:, :, 0, 0] + expect[:, :, 1, 1]) / 2
    for kw in ({}, {"chunk": 2}, {"per_example": False}):
        torch.testing.assert_close(empirical_ntk(net, x1, x2, **kw), factor, rtol=1e-10, atol=1e-12)
    both = torch.cat([x1, x2])
    torch.testing.assert_close(empirical_ntk(net, both, chunk=2), _brute_full(net, both, both).diagonal(
        dim1=2, dim2=3).mean(-1), rtol=1e-10, atol=1e-12)


def test_symmetric_when_x2_is_none():
    net = _small_net(out=2)
    x = torch.randn(7, 3)
    k = empirical_ntk(net, x, chunk=3)
    assert torch.equal(k, k.T)
    torch.testing.assert_close(k, empirical_ntk(net, x, x.clone()), rtol=1e-12, atol=1e-12)
    full = empirical_ntk_full(net, x, chunk=2)
    assert torch.equal(full, full.permute(1, 0, 3, 2))
    assert torch.linalg.eigvalsh(k).min() > -1e-10


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_chunks_and_parameter_groups_do_not_change_the_result(chunk, monkeypatch):
    net = _small_net(out=2)
    x1, x2 = torch.randn(5, 3), torch.randn(3, 3)
    expect = _brute_full(net, x1, x2)
    # A tiny block budget forces one parameter per group and one example per chunk.
    monkeypatch.setattr(empirical, "_BLOCK_BYTES", 64)
    torch.testing.assert_close(empirical_ntk_full(net, x1, x2, chunk=chunk), expect, rtol=1e-10, atol=1e-12)
    sym = _brute_full(net, x1, x1)
    torch.testing.assert_close(empirical_ntk_full(net, x1, chunk=chunk), sym, rtol=1e-10, atol=1e-12)


def test_conv_net_with_multidimensional_output():
    torch.manual_seed(1)
    net = ntk_parametrize(nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 2, stride=2)), 1.5, 0.2)
    x1, x2 = torch.randn(3, 2, 6), torch.randn(2, 2, 6)
    full = _brute_full(net, x1, x2)  # output (2, 3) per example: out = 6
    torch.testing.assert_close(empirical_ntk_full(net, x1, x2), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(net, x1, x2), full.diagonal(dim1=2, dim2=3).mean(-1), rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_excluded():
    net = _small_net(out=1)
    net[3].weight.requires_grad_(False)
    net[0].parametrizations.weight.original.requires_grad_(False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(empirical_ntk_full(net, x), _brute_full(net, x, x), rtol=1e-10, atol=1e-12)


def test_model_is_not_modified_and_float32_is_upcast():
    net = _small_net(out=2)
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(3, 3)
    k = empirical_ntk(net, x)
    assert k.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(net.state_dict()[n], v) for n, v in before.items())
    out = empirical_outputs(net, x)
    assert out.dtype == torch.float64 and out.shape == (3, 2)
    torch.testing.assert_close(out, net(x).double(), rtol=1e-5, atol=1e-6)


def test_batch_coupled_models():
    torch.manual_seed(2)
    net = ntk_parametrize(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1)), 1.0, 0.3)
    x1, x2 = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="BatchNorm"):
        empirical_ntk(net, x1)
    with pytest.raises(ValueError, match="chunk"):
        empirical_ntk(net, x1, per_example=False, chunk=2)
    running = net[1].running_mean.clone()
    got = empirical_ntk_full(net, x1, x2, per_example=False)
    torch.testing.assert_close(got, _brute_full(net, x1, x2, batch=True), rtol=1e-10, atol=1e-12)
    assert torch.equal(net[1].running_mean, running)
    # Without coupling, whole-batch and per-example differentiation agree.
    net.eval()
    torch.testing.assert_close(empirical_ntk(net, x1, x2, per_example=False), empirical_ntk(net, x1, x2), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ convergence helpers


def test_helpers():
    w = [64, 128, 512, 1024]
    assert fit_loglog_slope(w, [3.0 * v**-0.5 for v in w]) == pytest.approx(-0.5, abs=1e-12)
    assert fit_loglog_slope(w, [0.1] * 4) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        fit_loglog_slope(w, [1.0, 0.0, 1.0, 1.0])
    b = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert relative_frobenius(b, b) == 0.0
    assert relative_frobenius(b + torch.tensor([[0.0, 1.0], [0.0, 0.0]]), b) == pytest.approx(0.2)


# ------------------------------------------------------------ infinite-width limits


def _relu_mlp_ntk(x1, x2, depth, W_std, b_std, readout_bias):
    """Limit NTK of ``[Linear ReLU] x depth, Linear(n, 1)`` (arc-cosine recursion, TP II Sec. 3-5).

    Theta^{l+1} = K^{l+1} + W_std^2 E[step step](K^l) Theta^l, with the ReLU and
    step moments of the table in tensor_programs.md Sec. 3.
    """
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    d = x1.shape[1]
    b2 = b_std**2
    k12 = W_std**2 * x1 @ x2.T / d + b2
    k11 = W_std**2 * (x1**2).sum(1) / d + b2
    k22 = W_std**2 * (x2**2).sum(1) / d + b2
    theta = k12.copy()
    for layer in range(depth):
        last = layer == depth - 1
        norm = np.sqrt(np.outer(k11, k22))
        c = np.clip(k12 / norm, -1.0, 1.0)
        relu = norm * (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)
        step = (np.pi - np.arccos(c)) / (2 * np.pi)
        bias = b2 if (readout_bias or not last) else 0.0
        k12, k11, k22 = W_std**2 * relu + bias, W_std**2 * k11 / 2 + bias, W_std**2 * k22 / 2 + bias
        theta = k12 + W_std**2 * step * theta
    return theta


def test_arc_cosine_oracle_matches_neural_tangents():
    ref = np.load(REFERENCE / "mlp_relu.npz")  # W_std = 1.5, b_std = 0.05 on every Linear
    np.testing.assert_allclose(_relu_mlp_ntk(ref["x1"], ref["x2"], 2, 1.5, 0.05, True), ref["ntk_12"], rtol=1e-8)
    np.testing.assert_allclose(_relu_mlp_ntk(ref["x1"], ref["x1"], 2, 1.5, 0.05, True), ref["ntk_11"], rtol=1e-8)
    x = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_allclose(np.diag(_relu_mlp_ntk(x, x, 2, 1.0, 1.0, False)), 0.75 * (x**2).sum(1) / 5 + 1.75, rtol=1e-12)


D = 5


def _tp2_mlp(n):
    """TP II Sec. 7 network: biases on the two hidden Linears, none on the readout."""
    return nn.Sequential(nn.Linear(D, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 1, bias=False))


def test_tp2_closed_form_at_width_4096():
    """Diagonal empirical NTK -> (3/4)|x|^2/d + 7/4 (tensor_programs.md Sec. 7).

    Tolerance. The NTK is a sum of five positive terms (readout, W2, b2, W1, b1),
    each a product of averages over the n hidden coordinates:
      * (1/n) sum relu(h_i)^2 with h_i ~ N(0, K): E relu^4 / (E relu^2)^2 = 6, so a
        single coordinate has relative variance 5;
      * (1/n) sum v_i^2 step(h_i), v_i ~ N(0, 1): E[v^4 step] / E[v^2 step]^2 = 6 too;
      * the W1/b1/W2 terms multiply two such averages: relative variance <= 5 + 5.
    So each term has relative std <= sqrt(10 / n), and by the triangle inequality
    for standard deviations so does their sum. The mean of S independent seeds
    has relative std <= sqrt(10 / (n S)); we allow 4 of those (the O(1/n) bias,
    ~1/4096, is negligible). Measured: per-seed relative std ~1.7 / sqrt(n) and a
    mean error over 4 seeds of about 1 %, against a tolerance of ~10 %.
    """
    n, seeds = 4096, range(4)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor([[0.5], [1.0], [2.0]]).mul(D).sqrt()  # |x|^2/d = .5, 1, 2
    limit = 0.75 * (x**2).sum(1) / D + 1.75
    diag = []
    for seed in seeds:
        torch.manual_seed(seed)
        diag.append(empirical_ntk(ntk_parametrize(_tp2_mlp(n), 1.0, 1.0), x).diagonal())
    rel = (torch.stack(diag).mean(0) / limit - 1).abs()
    tol = 4 * math.sqrt(10 / (n * len(seeds)))
    assert rel.max() < tol, (rel, tol)


WIDTHS = [64, 128, 256, 512, 1024]


def test_tp2_convergence_rate():
    """Relative Frobenius error ~ width^-1/2 (TP II Fig. 1), over a 16x width span."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(5, D, generator=g), torch.randn(4, D, generator=g)
    limit = _relu_mlp_ntk(x1, x2, 2, 1.0, 1.0, readout_bias=False)
    errors, slope = convergence_sweep(_tp2_mlp, WIDTHS, range(4), x1, x2, limit, 1.0, 1.0)
    assert -0.7 <= slope <= -0.3, (errors, slope)
    # Same constant as above, per seed: <= 4 sqrt(10 / n) at the widest net.
    assert errors[-1] < 4 * math.sqrt(10 / WIDTHS[-1]), errors


def test_convergence_to_neural_tangents_reference():
    ref = np.load(REFERENCE / "mlp_relu.npz")
    factory = lambda n: nn.Sequential(nn.Linear(5, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 1))
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    errors, slope = convergence_sweep(factory, WIDTHS, range(4), x1, x2, ref["ntk_12"], 1.5, 0.05)
    assert -0.7 <= slope <= -0.3, (errors, slope)
    assert errors[-1] < 4 * math.sqrt(10 / WIDTHS[-1]), errors


@pytest.mark.slow
def test_cnn_converges_to_neural_tangents_reference():
    """Conv fan-in and NTK scaling, checked in kernel space (about 40 s)."""
    ref = np.load(REFERENCE / "cnn_gap.npz")

    def factory(n):
        return nn.Sequential(
            nn.Conv2d(2, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, 1),
        )

    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    errors, slope = convergence_sweep(factory, [64, 256, 1024], range(4), x1, x2, ref["ntk_12"], 1.4, 0.1)
    assert -0.8 <= slope <= -0.3, (errors, slope)
    assert errors[-1] < 4 * math.sqrt(10 / 1024), errors
