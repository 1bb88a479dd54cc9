"""Tests of ntkcompile.dynamics against independent oracles.

The kernel is an explicit 1-hidden-layer ReLU NNGP/NTK (arc-cosine kernels) on
random inputs; oracles are matrix powers, scipy's expm, linear solves and
brute-force autograd loops, never the closed forms under test.
"""

import math
import types
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ntkcompile import dynamics
from ntkcompile.errors import KernelNotPSDError

D = 3


class FakeKernel:
    """1-hidden-layer ReLU net, NTK parametrization, W_std = 1, no biases.

    NNGP = E relu(u) relu(u'), NTK = NNGP + S * E step(u) step(u'), S = x.x'/d.
    Records every call so tests can count them.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, x1, x2=None, get=("nngp", "ntk")):
        self.calls.append((x1.shape[0], None if x2 is None else x2.shape[0], tuple(get)))
        x1 = x1.double()
        x2 = x1 if x2 is None else x2.double()
        s12 = x1 @ x2.T / D
        n1 = (x1 * x1).sum(1).div(D).sqrt()[:, None]
        n2 = (x2 * x2).sum(1).div(D).sqrt()[None, :]
        c = (s12 / (n1 * n2)).clamp(-1, 1)
        theta = torch.arccos(c)
        nngp = n1 * n2 * (torch.sqrt(1 - c**2) + (math.pi - theta) * c) / (2 * math.pi)
        ntk = nngp + s12 * (math.pi - theta) / (2 * math.pi)
        return types.SimpleNamespace(
            nngp=nngp if "nngp" in get else None, ntk=ntk if "ntk" in get else None
        )


def data(n=7, m=3, out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    xt = torch.randn(m, D, generator=g, dtype=torch.float64)
    y = torch.randn(n, out, generator=g, dtype=torch.float64)
    return x, y, xt


def ntk_blocks(x, xt):
    k = FakeKernel()
    return k(x, get=("ntk",)).ntk, k(xt, x, get=("ntk",)).ntk


def safe_lr(x, out, fraction=0.5):
    """A fraction of the full-batch limit N out / lam_max (computed independently)."""
    lam_max = np.linalg.eigvalsh(ntk_blocks(x, x)[0].numpy()).max()
    return fraction * x.shape[0] * out / lam_max


# ---------------------------------------------------------------------------
# Full-batch MSE: simulate and mse_discrete against matrix powers.
# ---------------------------------------------------------------------------


def test_full_batch_mse_equals_matrix_powers():
    x, y, xt = data()
    n, out = y.shape
    f0 = torch.randn(n + xt.shape[0], out, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lr, steps = safe_lr(x, out, 0.9), 25
    k, kt = ntk_blocks(x, xt)
    a = lr * 2 / (n * out)
    step = torch.eye(n, dtype=torch.float64) - a * k
    residuals = [torch.linalg.matrix_power(step, t) @ (f0[:n] - y) for t in range(steps + 1)]
    test = [f0[n:] - a * kt @ sum(residuals[:t], torch.zeros_like(y)) for t in range(steps + 1)]

    traj = dynamics.simulate(FakeKernel(), x, y, xt, lr=lr, steps=steps, f0=f0)
    assert traj.train.shape == (steps + 1, n, out) and traj.test.shape == (steps + 1, 3, out)
    torch.testing.assert_close(traj.train - y, torch.stack(residuals), atol=1e-10, rtol=0)
    torch.testing.assert_close(traj.test, torch.stack(test), atol=1e-10, rtol=0)
    torch.testing.assert_close(traj.loss, torch.stack([F.mse_loss(r, torch.zeros_like(r)) for r in residuals]), atol=1e-12, rtol=0)

    closed = dynamics.mse_discrete(dynamics.kernel_blocks(FakeKernel(), x, xt), y, list(range(steps + 1)), lr=lr, f0=f0)
    torch.testing.assert_close(closed.train, traj.train, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed.test, traj.test, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed.loss, traj.loss, atol=1e-12, rtol=0)


def test_y_vector_is_one_output_and_no_test_points():
    x, y, _ = data(out=1)
    traj = dynamics.simulate(FakeKernel(), x, y[:, 0], steps=3, lr=0.1)
    assert traj.train.shape == (4, 7, 1) and traj.test is None
    ref = dynamics.simulate(FakeKernel(), x, y, steps=3, lr=0.1)
    torch.testing.assert_close(traj.train, ref.train, atol=0, rtol=0)


def test_kernel_called_once_per_block_asking_only_what_is_needed():
    x, y, xt = data()
    k = FakeKernel()
    dynamics.simulate(k, x, y, xt, steps=2, lr=0.1)
    assert k.calls == [(7, None, ("ntk",)), (3, 7, ("ntk",))]
    k = FakeKernel()
    dynamics.simulate(k, x, y, xt, steps=2, lr=0.1, f0="prior")
    assert k.calls == [(7, None, ("nngp", "ntk")), (3, 7, ("nngp", "ntk")), (3, None, ("nngp",))]


# ---------------------------------------------------------------------------
# Continuous time.
# ---------------------------------------------------------------------------


def test_continuous_matches_expm_and_kernel_solve():
    x, y, xt = data()
    n, out = y.shape
    f0 = torch.randn(n + 3, out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k, kt = ntk_blocks(x, xt)
    lr, ts = 0.7, [0.0, 0.5, 3.0, 40.0]
    c = lr * 2 / (n * out)
    traj = dynamics.mse_continuous(dynamics.kernel_blocks(FakeKernel(), x, xt), y, ts, lr=lr, f0=f0)
    for i, t in enumerate(ts):
        decay = torch.from_numpy(scipy.linalg.expm(-c * t * k.numpy()))
        r = decay @ (f0[:n] - y)
        # f_test(t) = f_test(0) - K_te K^-1 (I - exp(-c K t)) r0 (K is invertible here).
        test = f0[n:] - kt @ torch.linalg.solve(k, (torch.eye(n, dtype=torch.float64) - decay) @ (f0[:n] - y))
        torch.testing.assert_close(traj.train[i], y + r, atol=1e-10, rtol=0)
        torch.testing.assert_close(traj.test[i], test, atol=1e-9, rtol=0)


def test_continuous_is_limit_of_small_discrete_steps():
    """Euler error: with step h, n = T/h steps, each eigen-mode mu = c lam obeys
    (1 - h mu)^n = exp(-T mu) (1 - h T mu^2 / 2 + O(h^2)), so the error is
    h * E_1 + O(h^2) with E_1 = -V diag(T mu^2 exp(-T mu) / 2) V^T r0. We check
    the error against h E_1 to O(h^2) and that it halves with h."""
    x, y, xt = data()
    n, out = y.shape
    T = 4.0
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt)
    exact = dynamics.mse_continuous(kernels, y, T, lr=1.0)
    lam, vecs = np.linalg.eigh(ntk_blocks(x, xt)[0].numpy())
    mu = 2 / (n * out) * lam
    e1 = torch.from_numpy(vecs @ np.diag(-T * mu**2 * np.exp(-T * mu) / 2) @ vecs.T) @ (-y)
    errors = []
    for h in (1 / 16, 1 / 32, 1 / 64):
        traj = dynamics.simulate(FakeKernel(), x, y, xt, lr=h, steps=round(T / h))
        err = traj.train[-1] - exact.train
        errors.append(float(err.norm()))
        assert float((err - h * e1).norm()) < h**2 * float(e1.norm()) + 1e-12
        torch.testing.assert_close(traj.test[-1], exact.test, atol=2 * h * float(e1.norm()) + 1e-12, rtol=0)
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.45 < fine / coarse < 0.55


# ---------------------------------------------------------------------------
# Minibatches and general losses against a brute-force autograd loop.
# ---------------------------------------------------------------------------


def brute_force(x, y, xt, loss_fn, lr, batches, f0):
    """The Theorem 5.3 recursion, written out: per-point sums and autograd."""
    k = FakeKernel()
    xs = torch.cat([x, xt])
    ntk = k(xs, x, get=("ntk",)).ntk
    f = f0.clone()
    out = [f.clone()]
    for idx in batches:
        fb = f[idx].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(fb, y[idx]), fb)
        new = f.clone()
        for row in range(xs.shape[0]):
            for j, i in enumerate(idx.tolist()):
                new[row] -= lr * ntk[row, i] * g[j]
        f = new
        out.append(f.clone())
    return torch.stack(out)


def documented_epochs(n, batch_size, steps, seed):
    g = torch.Generator().manual_seed(seed)
    chunks = []
    while len(chunks) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        chunks += [torch.tensor(perm[i : i + batch_size]) for i in range(0, n, batch_size)]
    return chunks[:steps]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_minibatch_matches_brute_force(loss):
    x, y, xt = data(n=7, out=3)
    if loss == "cross_entropy":
        y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    f0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss_fn = getattr(F, loss + "_loss" if loss == "mse" else loss)
    steps, lr = 9, 0.8
    batches = documented_epochs(7, 3, steps, seed=4)
    assert [len(b) for b in batches] == [3, 3, 1] * 3  # last short chunk kept
    ref = brute_force(x, y, xt, loss_fn, lr, batches, f0)

    traj = dynamics.simulate(FakeKernel(), x, y, xt, loss=loss, lr=lr, steps=steps, batch_size=3, f0=f0, seed=4)
    torch.testing.assert_close(traj.train, ref[:, :7], atol=1e-12, rtol=0)
    torch.testing.assert_close(traj.test, ref[:, 7:], atol=1e-12, rtol=0)
    torch.testing.assert_close(traj.loss, torch.stack([loss_fn(f[:7], y) for f in ref]).detach(), atol=1e-12, rtol=0)

    replay = dynamics.simulate(FakeKernel(), x, y, xt, loss=loss, lr=lr, steps=steps, batches=batches, f0=f0)
    torch.testing.assert_close(replay.train, traj.train, atol=0, rtol=0)
    custom = dynamics.simulate(FakeKernel(), x, y, xt, loss=lambda f, t: loss_fn(f, t), lr=lr, steps=steps, batches=batches, f0=f0)
    torch.testing.assert_close(custom.train, traj.train, atol=1e-13, rtol=0)
    torch.testing.assert_close(custom.loss, traj.loss, atol=1e-13, rtol=0)


def test_explicit_batches_with_repeats_and_custom_loss():
    x, y, xt = data(n=5, out=2)
    f0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batches = [torch.tensor([0, 0, 4]), torch.tensor([2]), torch.tensor([1, 3, 3, 3])]
    huber = lambda f, t: F.huber_loss(f, t, delta=0.3)
    ref = brute_force(x, y, xt, huber, 0.9, batches, f0)
    traj = dynamics.simulate(FakeKernel(), x, y, xt, loss=huber, lr=0.9, steps=3, batches=batches, f0=f0)
    torch.testing.assert_close(traj.train, ref[:, :5], atol=1e-12, rtol=0)
    torch.testing.assert_close(traj.test, ref[:, 5:], atol=1e-12, rtol=0)


def test_cross_entropy_out_is_number_of_classes():
    x, _, _ = data(n=5)
    traj = dynamics.simulate(FakeKernel(), x, torch.tensor([0, 3, 1, 1, 2]), loss="cross_entropy", steps=2)
    assert traj.train.shape == (3, 5, 4)
    assert traj.loss[0] == pytest.approx(math.log(4))


# ---------------------------------------------------------------------------
# Ensembles over f0 ~ GP(0, NNGP).
# ---------------------------------------------------------------------------


def joint_nngp(x, xt):
    xs = torch.cat([x, xt])
    return FakeKernel()(xs, get=("nngp",)).nngp


def test_ensemble_exact_by_linearity():
    """simulate is affine in f0: f_t = m + A f0. Recover A from unit f0's (y = 0)
    and m from f0 = 0; then mean = m, cov = A S A^T exactly (S the joint NNGP)."""
    x, y, xt = data(n=6, m=3, out=1)
    n, lr, steps = 6, safe_lr(x, 1, 0.7), 7
    cols = [dynamics.simulate(FakeKernel(), x, torch.zeros(n, 1, dtype=torch.float64), xt, lr=lr, steps=steps, f0=e[:, None])
            for e in torch.eye(n + 3, dtype=torch.float64)]
    amap = torch.stack([torch.cat([c.train[-1, :, 0], c.test[-1, :, 0]]) for c in cols], 1)
    mean = dynamics.simulate(FakeKernel(), x, y, xt, lr=lr, steps=steps)
    cov = amap @ joint_nngp(x, xt) @ amap.T

    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt, get=("nngp", "ntk"))
    ens = dynamics.mse_ensemble(kernels, y, steps, lr=lr, flow="discrete")
    torch.testing.assert_close(ens.mean_train, mean.train[-1], atol=1e-10, rtol=0)
    torch.testing.assert_close(ens.mean_test, mean.test[-1], atol=1e-10, rtol=0)
    torch.testing.assert_close(ens.cov_train, cov[:n, :n], atol=1e-10, rtol=0)
    torch.testing.assert_close(ens.cov_test, cov[n:, n:], atol=1e-10, rtol=0)


def test_ensemble_matches_monte_carlo_of_prior_samples():
    """S = 2000 samples (250 seeds x 8 iid outputs). Each mean entry has standard
    error sqrt(C_ii / S); each covariance entry sqrt((C_ii C_jj + C_ij^2) / S)
    (Gaussian fourth moments). We allow 5 standard errors."""
    x, _, xt = data(n=5, m=3, out=1)
    out, seeds, steps = 8, 250, 6
    y = torch.randn(5, out, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lr = safe_lr(x, out, 0.8)
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt, get=("nngp", "ntk"))
    ens = dynamics.mse_ensemble(kernels, y, [0, steps], lr=lr, flow="discrete")
    trajs = [dynamics.simulate(FakeKernel(), x, y, xt, lr=lr, steps=steps, f0="prior", seed=s) for s in range(seeds)]
    for i, t in enumerate([0, steps]):
        for part, mean, cov in (("train", ens.mean_train[i], ens.cov_train[i]), ("test", ens.mean_test[i], ens.cov_test[i])):
            # Centre each output on its own mean; the outputs are iid given y.
            samples = torch.stack([getattr(tr, part)[t] for tr in trajs]) - mean  # (seeds, N, out)
            samples = samples.permute(0, 2, 1).reshape(-1, mean.shape[0])  # (S, N)
            s = samples.shape[0]
            var = torch.diagonal(cov)
            assert (samples.mean(0).abs() <= 5 * torch.sqrt(var / s)).all()
            emp = samples.T @ samples / s
            se = torch.sqrt((var[:, None] * var[None, :] + cov**2) / s)
            assert ((emp - cov).abs() <= 5 * se).all(), (part, t)
    torch.testing.assert_close(ens.cov_train[0], kernels.nngp_train, atol=1e-12, rtol=0)


def test_ensemble_continuous_and_infinite():
    x, y, xt = data(n=6, m=3, out=2)
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt, get=("nngp", "ntk"))
    k, kt, s = kernels.ntk_train, kernels.ntk_test_train, joint_nngp(x, xt)
    ens = dynamics.mse_ensemble(kernels, y, [2.5, math.inf], lr=0.5)
    n = 6
    c = 0.5 * 2 / (n * 2)
    for i, phi in enumerate([torch.linalg.solve(k, torch.eye(n, dtype=torch.float64) - torch.from_numpy(scipy.linalg.expm(-c * 2.5 * k.numpy()))),
                             torch.linalg.inv(k)]):
        p = torch.cat([k, kt]) @ phi
        amap = torch.eye(n + 3, dtype=torch.float64)  # f_t = f0 - P (f0[:n] - y)
        amap[:, :n] -= p
        cov = amap @ s @ amap.T
        torch.testing.assert_close(ens.mean_train[i], p[:n] @ y, atol=1e-9, rtol=0)
        torch.testing.assert_close(ens.mean_test[i], p[n:] @ y, atol=1e-9, rtol=0)
        torch.testing.assert_close(ens.cov_test[i], cov[n:, n:], atol=1e-9, rtol=0)
        torch.testing.assert_close(ens.cov_train[i], cov[:n, :n], atol=1e-9, rtol=0)
    # At t = inf the train outputs interpolate y whatever f0 was.
    torch.testing.assert_close(ens.cov_train[1], torch.zeros(n, n, dtype=torch.float64), atol=1e-9, rtol=0)


def test_prior_sample_is_reproducible_and_seeded():
    x, y, xt = data()
    a = dynamics.simulate(FakeKernel(), x, y, xt, steps=1, lr=0.1, f0="prior", seed=3)
    b = dynamics.simulate(FakeKernel(), x, y, xt, steps=1, lr=0.1, f0="prior", seed=3)
    c = dynamics.simulate(FakeKernel(), x, y, xt, steps=1, lr=0.1, f0="prior", seed=4)
    torch.testing.assert_close(a.test, b.test, atol=0, rtol=0)
    assert not torch.allclose(a.test[0], c.test[0])


# ---------------------------------------------------------------------------
# t = inf: kernel regression.
# ---------------------------------------------------------------------------


def test_infinite_time_is_kernel_regression():
    x, y, xt = data()
    k, kt = ntk_blocks(x, xt)
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt)
    inf = dynamics.mse_infinite(kernels, y)
    torch.testing.assert_close(inf.test, kt @ torch.linalg.solve(k, y), atol=1e-9, rtol=0)
    torch.testing.assert_close(inf.train, y, atol=1e-9, rtol=0)
    late = dynamics.mse_continuous(kernels, y, 1e7, lr=1.0)
    torch.testing.assert_close(late.test, inf.test, atol=1e-8, rtol=0)

    ridge = 0.3
    reg = dynamics.mse_infinite(kernels, y, ridge=ridge)
    solve = torch.linalg.solve(k + ridge * torch.eye(7, dtype=torch.float64), y)
    torch.testing.assert_close(reg.test, kt @ solve, atol=1e-10, rtol=0)
    torch.testing.assert_close(reg.train, k @ solve, atol=1e-10, rtol=0)

    f0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = dynamics.mse_infinite(kernels, y, f0=f0)
    torch.testing.assert_close(shifted.test, f0[7:] + kt @ torch.linalg.solve(k, y - f0[:7]), atol=1e-9, rtol=0)


def test_singular_kernel_needs_ridge():
    x, y, xt = data()
    x = torch.cat([x, x[:1]])  # a repeated point: K has two equal rows
    y = torch.cat([y, y[:1]])
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt)
    with pytest.raises(KernelNotPSDError, match="ridge"):
        dynamics.mse_infinite(kernels, y)
    out = dynamics.mse_infinite(kernels, y, ridge=1e-3)
    assert torch.isfinite(out.test).all()
    # Finite times are fine on a singular (PSD) kernel.
    assert torch.isfinite(dynamics.mse_continuous(kernels, y, 5.0).test).all()


def test_indefinite_or_asymmetric_kernel_raises():
    bad = dynamics.KernelBlocks(ntk_train=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(KernelNotPSDError, match="positive semidefinite"):
        dynamics.mse_continuous(bad, torch.zeros(2), 1.0)
    asym = dynamics.KernelBlocks(ntk_train=torch.tensor([[1.0, 0.5], [0.1, 1.0]]))
    with pytest.raises(KernelNotPSDError, match="symmetric"):
        dynamics.mse_infinite(asym, torch.zeros(2))
    assert issubclass(KernelNotPSDError, ValueError)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_bad_shapes():
    x, y, xt = data()
    k = FakeKernel()
    with pytest.raises(ValueError, match="rows"):
        dynamics.simulate(k, x, y[:5], xt)
    with pytest.raises(ValueError, match="f0"):
        dynamics.simulate(k, x, y, xt, f0=torch.zeros(7, 2))
    with pytest.raises(ValueError, match="outside"):
        dynamics.simulate(k, x, y, steps=1, batches=[torch.tensor([0, 7])])
    with pytest.raises(ValueError, match="len\\(batches\\)"):
        dynamics.simulate(k, x, y, steps=3, batches=[torch.tensor([0])] * 2)
    with pytest.raises(ValueError, match="not both"):
        dynamics.simulate(k, x, y, steps=1, batches=[torch.tensor([0])], batch_size=2)
    with pytest.raises(ValueError, match="class"):
        dynamics.simulate(k, x, torch.tensor([0, 1, 2, 0, 1, 2, 5]), loss="cross_entropy", f0=torch.zeros(7, 3))
    with pytest.raises(ValueError, match="shape"):
        dynamics.mse_continuous(dynamics.kernel_blocks(k, x, xt), y, 1.0, f0=torch.zeros(10, 3))


@pytest.mark.parametrize("which", ["x_train", "y_train", "x_test", "f0", "lr"])
def test_non_finite_inputs_name_the_argument(which):
    x, y, xt = data()
    args = dict(x_train=x.clone(), y_train=y.clone(), x_test=xt.clone(), f0=torch.zeros(10, 2, dtype=torch.float64), lr=0.1)
    if which == "lr":
        args["lr"] = math.nan
    else:
        args[which][0, 0] = math.nan
    with pytest.raises(ValueError, match=which):
        dynamics.simulate(FakeKernel(), args["x_train"], args["y_train"], args["x_test"], lr=args["lr"], f0=args["f0"], steps=1)


def test_unknown_loss_lists_valid_names():
    x, y, _ = data()
    with pytest.raises(ValueError, match="cross_entropy.*mse"):
        dynamics.simulate(FakeKernel(), x, y, loss="l2")


def test_learning_rate_above_stability_limit_warns():
    x, y, xt = data()
    n, out = y.shape
    limit = n * out / np.linalg.eigvalsh(ntk_blocks(x, xt)[0].numpy()).max()
    with pytest.warns(RuntimeWarning, match=f"{limit:.6g}"):
        traj = dynamics.simulate(FakeKernel(), x, y, lr=1.05 * limit, steps=200)
    assert traj.loss[-1] > traj.loss[0]  # it really diverges
    with pytest.warns(RuntimeWarning, match="stability limit"):
        dynamics.mse_discrete(dynamics.kernel_blocks(FakeKernel(), x), y, 3, lr=1.05 * limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traj = dynamics.simulate(FakeKernel(), x, y, lr=0.95 * limit, steps=400)
        dynamics.mse_continuous(dynamics.kernel_blocks(FakeKernel(), x), y, 3.0, lr=10 * limit)
    assert traj.loss[-1] < traj.loss[0]


def test_unknown_flow_and_bad_times():
    x, y, xt = data()
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt, get=("nngp", "ntk"))
    with pytest.raises(ValueError, match="continuous.*discrete"):
        dynamics.mse_ensemble(kernels, y, 1.0, flow="euler")
    with pytest.raises(ValueError, match="integer"):
        dynamics.mse_discrete(kernels, y, 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        dynamics.mse_continuous(kernels, y, -1.0)
    with pytest.raises(ValueError, match="NNGP"):
        dynamics.mse_ensemble(dynamics.kernel_blocks(FakeKernel(), x, xt), y, 1.0)


# ---------------------------------------------------------------------------
# Dynamics that diverge say so (issue 9).
# ---------------------------------------------------------------------------


class IndexKernel:
    """A kernel given as a matrix: the input ``[i]`` is point ``i``, so every
    block, eigenvalue and stability bound is known exactly."""

    def __init__(self, k, out_features=None):
        self.k = torch.as_tensor(k, dtype=torch.float64)
        self.calls = []
        if out_features is not None:
            self.out_features = out_features

    def __call__(self, x1, x2=None, get=("nngp", "ntk")):
        self.calls.append((x1.shape[0], None if x2 is None else x2.shape[0], tuple(get)))
        i1 = x1[:, 0].long()
        i2 = i1 if x2 is None else x2[:, 0].long()
        block = self.k[i1[:, None], i2[None, :]]
        return types.SimpleNamespace(nngp=block if "nngp" in get else None, ntk=block if "ntk" in get else None)


def points(n):
    return torch.arange(n, dtype=torch.float64)[:, None]


# K = 2 I on 7 points, batches [0,1,2], [3,4,5], [6] in turn, one output. Each
# point's residual moves alone: r_i <- (1 - lr * 2 * 2 / |B|) r_i when i is in
# the batch. The singleton batch bounds lr at |B| out / lambda_max(K_BB) =
# 1 * 1 / 2 = 0.5; the triples at 3 * 1 / 2 = 1.5; full batch at 7 * 1 / 2 = 3.5.
CYCLE = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6])]


def cycle(steps):
    return [CYCLE[t % 3] for t in range(steps)]


def test_minibatch_bound_is_exact_for_decoupled_batches():
    kfn, y = IndexKernel(2 * torch.eye(7)), torch.ones(7, 1, dtype=torch.float64)
    uses = 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traj = dynamics.simulate(kfn, points(7), y, lr=0.499, steps=3 * uses, batches=cycle(3 * uses))
    assert torch.isfinite(traj.train).all()
    # Point 6 after k uses of its batch: (1 - 4 lr)^k r_0 (r_0 = -1), bounded below the bound ...
    torch.testing.assert_close(traj.train[-1, 6, 0] - 1, torch.tensor(-(1 - 4 * 0.499) ** uses, dtype=torch.float64))
    # ... and growing just above it; the full-batch limit 3.5 would have said nothing.
    with pytest.warns(RuntimeWarning, match=r"minibatch mean-MSE stability bound .* = 1 \* 1 / 2 = 0\.5 ") as rec:
        traj = dynamics.simulate(kfn, points(7), y, lr=0.501, steps=3 * uses, batches=cycle(3 * uses))
    assert "first used at step 3" in str(rec[0].message) and "= 3.5 is for full-batch steps" in str(rec[0].message)
    torch.testing.assert_close(traj.train[-1, 6, 0] - 1, torch.tensor(-(1 - 4 * 0.501) ** uses, dtype=torch.float64))
    assert abs(float(traj.train[-1, 6, 0]) - 1) > 50


def test_divergence_raises_at_the_step_the_loss_overflows():
    """lr = 0.75: the triples' residuals vanish after one use (factor 0) and
    point 6's doubles in size each use (factor 1 - 3 = -2), so with r_0 = -0.7
    the loss 0.7^2 4^k / 7 overflows when the square of 0.7 * 2^k does."""
    from ntkcompile.errors import DivergenceError

    kfn, y = IndexKernel(2 * torch.eye(7)), torch.full((7, 1), 0.7, dtype=torch.float64)
    k = next(k for k in range(1, 2000) if math.isinf((0.7 * 2.0**k) * (0.7 * 2.0**k)))
    steps = 3 * k + 30
    with pytest.warns(RuntimeWarning) as rec, pytest.raises(DivergenceError) as err:
        dynamics.simulate(kfn, points(7), y, lr=0.75, steps=steps, batches=cycle(steps))
    assert err.value.step == 3 * k and err.value.lr == 0.75
    assert isinstance(err.value, FloatingPointError)
    msg = str(err.value)
    assert f"at step {3 * k} of {steps}" in msg and "lr = 0.75, batch size 1 of N = 7" in msg
    assert "= 1 * 1 / 2 = 0.5 " in msg and "lower lr to at most 0.5" in msg
    messages = [str(w.message) for w in rec]
    assert any("lr = 0.75 is above the minibatch" in m for m in messages)
    # The million-fold loss warning comes once, before the overflow.
    grew = [m for m in messages if "the training loss grew" in m]
    assert len(grew) == 1 and "the run is diverging" in grew[0]


def test_growth_warning_names_the_first_step_above_a_million_fold():
    kfn, y = IndexKernel(2 * torch.eye(7)), torch.full((7, 1), 0.7, dtype=torch.float64)
    with pytest.warns(RuntimeWarning) as rec:
        traj = dynamics.simulate(kfn, points(7), y, lr=0.75, steps=90, batches=cycle(90))
    assert "lr = 0.75 is above the minibatch" in str(rec[0].message)
    step = next(t for t in range(91) if traj.loss[t] > 1e6 * traj.loss[0])
    # r_6 = -0.7 (-2)^k after k uses, the rest ~0: loss 0.49 4^k / 7 > 1e6 * 0.49
    # first at k = 12 (step 36).
    assert step == 36
    grew = [str(w.message) for w in rec if "grew" in str(w.message)]
    assert len(grew) == 1 and f"at step {step} of 90" in grew[0]


def test_per_batch_bound_against_eigvalsh_with_repeats():
    """On a dense kernel and batches with repeated indices, the bound is
    min_B |B| out / lambda_max(K[B][:, B]) (numpy's eigvalsh as oracle); below
    it the residual's kernel norm r^T K^-1 r never grows."""
    x, y, _ = data(n=7, out=2)
    k = ntk_blocks(x, x)[0].numpy()
    batches = [torch.tensor(b) for b in ([0, 0, 4], [2], [1, 3, 3, 3], [5, 6], [0, 1, 2, 3, 4, 5, 6])] * 4
    bound = min(len(b) * 2 / np.linalg.eigvalsh(k[np.ix_(b.numpy(), b.numpy())]).max() for b in batches)
    f0 = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=f"= {bound:.6g} \\(the smallest over the 5 distinct batches"):
        dynamics.simulate(FakeKernel(), x, y, lr=1.01 * bound, steps=20, batches=batches, f0=f0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traj = dynamics.simulate(FakeKernel(), x, y, lr=0.99 * bound, steps=20, batches=batches, f0=f0)
    r = (traj.train - y).numpy()
    norms = [np.trace(rt.T @ np.linalg.solve(k, rt)) for rt in r]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(norms, norms[1:]))


def test_bound_work_cap_is_reported(monkeypatch):
    from ntkcompile import stability

    monkeypatch.setattr(stability, "_BOUND_MAX_BATCHES", 2)
    kfn, y = IndexKernel(2 * torch.eye(7)), torch.ones(7, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="over the first 2 of 3 distinct batches; the rest were not checked"):
        # The two checked (triples) give 1.5; the unchecked singleton would give 0.5.
        dynamics.simulate(kfn, points(7), y, lr=2.0, steps=3, batches=cycle(3))


def test_callable_loss_returning_nan_names_the_step():
    from ntkcompile.errors import DivergenceError, NonFiniteLossError

    x, y, xt = data()
    calls = []

    def flaky(f, t):  # NaN from its third full-training-set evaluation on
        if f.shape[0] == 7 and not f.requires_grad:
            calls.append(1)
            if len(calls) >= 3:
                return F.mse_loss(f, t) * math.nan
        return F.mse_loss(f, t)

    with pytest.raises(NonFiniteLossError, match=r"the loss callable returned a non-finite result: its value on the training set at step 2 of 5 is nan") as err:
        dynamics.simulate(FakeKernel(), x, y, loss=flaky, lr=0.1, steps=5)
    assert err.value.step == 2 and isinstance(err.value, DivergenceError)

    # |f - y| is finite at f = y but its gradient there is 0/0.
    f0 = torch.cat([y, torch.zeros(3, 2, dtype=torch.float64)])
    f0[1:] += 0.5
    with pytest.raises(NonFiniteLossError, match="its gradient on the batch of step 1 has nan") as err:
        dynamics.simulate(FakeKernel(), x, y, xt, loss=lambda f, t: torch.sqrt((f - t) ** 2).mean(), lr=0.1, steps=3, f0=f0)
    assert err.value.step == 1


def test_cross_entropy_class_count_checked_before_anything_is_allocated():
    x, _, _ = data()
    k = FakeKernel()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 10**9])
    with pytest.raises(ValueError, match=r"largest class index in y_train is 1000000000.*7 training points.*pass f0"):
        dynamics.simulate(k, x, labels, loss="cross_entropy", steps=1)
    assert k.calls == []  # refused before the kernel ran
    with pytest.raises(ValueError, match=r"class index 3 but the model has only 3 outputs \(kfn.out_features\)"):
        dynamics.simulate(IndexKernel(torch.eye(7), out_features=3), points(7), torch.tensor([0, 1, 2, 3, 0, 1, 2]), loss="cross_entropy")
    # With out_features the outputs are the model's, not max(y) + 1: log(5) at f = 0.
    traj = dynamics.simulate(IndexKernel(torch.eye(7), out_features=5), points(7), torch.tensor([0, 1, 2, 2, 0, 1, 2]),
                             loss="cross_entropy", steps=1)
    assert traj.train.shape == (2, 7, 5) and traj.loss[0] == pytest.approx(math.log(5))


def test_trajectory_larger_than_memory_is_refused(monkeypatch):
    x, y, xt = data()
    k = FakeKernel()
    from ntkcompile import training
    monkeypatch.setattr(training, "physical_memory", lambda: 2**20)
    # (1000 + 1) x (7 + 3) x 2 float64 = 160 kB fits in 1 MiB; 10_000 steps do not.
    dynamics.simulate(k, x, y, xt, lr=0.1, steps=1000)
    k.calls.clear()
    with pytest.raises(ValueError, match=r"0.00149 GiB \(\(steps \+ 1\) x \(N_train \+ N_test\) x out = 10001 x 10 x 2"):
        dynamics.simulate(k, x, y, xt, lr=0.1, steps=10_000)
    assert k.calls == []


def test_discrete_closed_forms_raise_instead_of_overflowing():
    from ntkcompile.errors import DivergenceError

    x, y, xt = data()
    kernels = dynamics.kernel_blocks(FakeKernel(), x, xt, get=("nngp", "ntk"))
    lam_max = np.linalg.eigvalsh(kernels.ntk_train.numpy()).max()
    limit = 7 * 2 / lam_max
    lr = 2 * limit  # |1 - lr 2 lam_max / (N out)| = 3: 3^5 is fine, 3^5000 is not
    for fn in (dynamics.mse_discrete, lambda *a, **k: dynamics.mse_ensemble(*a, flow="discrete", **k)):
        with pytest.warns(RuntimeWarning, match="stability limit"), pytest.raises(DivergenceError, match=f"at t = 5000 .* 3\\^t.* = {limit:.6g}") as err:
            fn(kernels, y, [0, 5, 5000], lr=lr)
        assert err.value.step == 5000
    with pytest.warns(RuntimeWarning, match="stability limit"):
        assert torch.isfinite(dynamics.mse_discrete(kernels, y, [0, 5], lr=lr).test).all()
