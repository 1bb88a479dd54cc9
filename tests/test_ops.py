"""Op rules against independent oracles: numpy Gauss-Hermite and closed-form recursions."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.chains import extrapolated

D = 5


def _gh2(phi, q1, q2, k, deg=200):
    """numpy E[phi(z1) phi(z2)] by tensor Gauss-Hermite on the Cholesky factor (test oracle)."""
    x, w = np.polynomial.hermite_e.hermegauss(deg)
    w = w / w.sum()
    out = np.empty_like(k)
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            s1, s2 = np.sqrt(q1[i]), np.sqrt(q2[j])
            c = np.clip(k[i, j] / (s1 * s2), -1, 1)
            z1 = s1 * x[:, None]
            z2 = s2 * (c * x[:, None] + np.sqrt(1 - c * c) * x[None, :])
            out[i, j] = np.sum(w[:, None] * w[None, :] * phi(z1) * phi(z2))
    return out


def _torch_np(fn):
    def f(z):
        return fn(torch.from_numpy(np.broadcast_to(z, np.broadcast(z).shape).copy())).numpy()
    return f


def _deriv_np(fn):
    def f(z):
        t = torch.from_numpy(np.array(z, dtype=np.float64)).requires_grad_(True)
        (g,) = torch.autograd.grad(fn(t).sum(), t)
        return g.numpy()
    return f


ACTIVATIONS = {
    "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "softplus": nn.Softplus(), "silu": nn.SiLU(),
    # (softsign is left out: its derivative (1+|x|)^-2 has a kink, where Gauss-Hermite
    # is only ~1e-2 accurate; see the issue note)
    "mish": nn.Mish(), "gelu_tanh": nn.GELU(approximate="tanh"),
    "erf": None, "gelu": nn.GELU(), "sin": None, "cos": None, "ndtr": None,
}
TORCH_FN = {"erf": torch.special.erf, "sin": torch.sin, "cos": torch.cos, "ndtr": torch.special.ndtr}


class OneHidden(nn.Module):
    def __init__(self, name, n=8):
        super().__init__()
        self.a, self.o = nn.Linear(D, n), nn.Linear(n, 1)
        self.name = name
        self.act = ACTIVATIONS[name]

    def forward(self, x):
        h = self.a(x)
        h = self.act(h) if self.act is not None else TORCH_FN[self.name](h)
        return self.o(h)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_one_hidden_layer_against_numpy_quadrature(name):
    W, b = 1.2, 0.3
    x1, x2 = torch.randn(4, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    k = ntkcompile.compile(OneHidden(name), W_std=W, b_std=b, quadrature_degree=256)(x1, x2)
    fn = ACTIVATIONS[name] if ACTIVATIONS[name] is not None else TORCH_FN[name]
    a, c = x1.numpy(), x2.numpy()
    q1 = W**2 * (a * a).sum(1) / D + b**2
    q2 = W**2 * (c * c).sum(1) / D + b**2
    kk = W**2 * a @ c.T / D + b**2
    nngp = W**2 * _gh2(_torch_np(fn), q1, q2, kk) + b**2
    ntk = nngp + W**2 * _gh2(_deriv_np(fn), q1, q2, kk) * kk
    rtol = 1e-8
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=rtol)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=rtol)


class NormalCdf(nn.Module):
    """``Linear -> Phi -> Linear``, with Phi as ``torch.special.ndtr`` or through ``erf``."""

    def __init__(self, via_erf=False, n=8):
        super().__init__()
        self.a, self.o = nn.Linear(D, n), nn.Linear(n, 1)
        self.via_erf = via_erf

    def forward(self, x):
        h = self.a(x)
        h = 0.5 * (1 + torch.erf(h / 2**0.5)) if self.via_erf else torch.special.ndtr(h)
        return self.o(h)


def test_normal_cdf_against_numpy_closed_forms_and_erf():
    """NNGP/NTK of ``Linear -> ndtr -> Linear`` against numpy's orthant probability and
    Gaussian-density integral, and against the same net with Phi written through erf."""
    W, b = 1.2, 0.3
    x1, x2 = torch.randn(4, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    x1[1] = 0.0                       # with b = 0 below: a zero pre-activation variance
    a, c = x1.numpy(), x2.numpy()
    for bias in (b, 0.0):
        q1 = W**2 * (a * a).sum(1) / D + bias**2
        q2 = W**2 * (c * c).sum(1) / D + bias**2
        kk = W**2 * a @ c.T / D + bias**2
        A = np.outer(1 + q1, 1 + q2)
        vt = 0.25 + np.arcsin(kk / np.sqrt(A)) / (2 * np.pi)        # E Phi(z1) Phi(z2)
        dvt = 1 / (2 * np.pi * np.sqrt(A - kk * kk))                 # E p(z1) p(z2)
        nngp = W**2 * vt + bias**2
        ntk = nngp + W**2 * dvt * kk
        kfn = ntkcompile.compile(NormalCdf(), W_std=W, b_std=bias)
        k = kfn(x1, x2)
        np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
        np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-12)
        assert k.quad_error is None and k.mc_stderr is None            # closed forms only
        via_erf = ntkcompile.compile(NormalCdf(via_erf=True), W_std=W, b_std=bias)(x1, x2)
        torch.testing.assert_close(via_erf.nngp, k.nngp, rtol=1e-12, atol=0)
        torch.testing.assert_close(via_erf.ntk, k.ntk, rtol=1e-12, atol=0)
        assert via_erf.quad_error is None and via_erf.mc_stderr is None
        # against itself: the diagonal is E Phi(z)^2 = 1/4 + arcsin(q / (1 + q)) / (2 pi)
        diag = W**2 * (0.25 + np.arcsin(q1 / (1 + q1)) / (2 * np.pi)) + bias**2
        np.testing.assert_allclose(np.diag(kfn(x1).nngp.numpy()), diag, rtol=1e-12)


class Functional(nn.Module):
    """F.linear on module parameters, Identity, eval Dropout, scalar arithmetic."""

    def __init__(self, n=8):
        super().__init__()
        self.a, self.o = nn.Linear(D, n), nn.Linear(n, 2)
        self.drop, self.id = nn.Dropout(0.3).eval(), nn.Identity()

    def forward(self, x):
        h = F.linear(x, self.a.weight, self.a.bias)
        h = self.id(self.drop(torch.relu(h)))
        h = (3.0 * h).sub(h.div(2.0))  # = 2.5 h (operator and method forms)
        return self.o(-h)


def _relu_layer(W, b, x1, x2):
    d = x1.shape[1]
    q1, q2 = W**2 * (x1 * x1).sum(1) / d + b**2, W**2 * (x2 * x2).sum(1) / d + b**2
    k = W**2 * x1 @ x2.T / d + b**2
    s = np.sqrt(np.outer(q1, q2))
    c = np.clip(k / s, -1, 1)
    th = np.arccos(c)
    return k, s * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def test_functional_ops_and_multi_output_against_arccos():
    W, b = 1.1, 0.4
    x1, x2 = torch.randn(5, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    k = ntkcompile.compile(Functional(), W_std=W, b_std=b)(x1, x2)
    k0, erelu, estep = _relu_layer(W, b, x1.numpy(), x2.numpy())
    scale = 2.5**2
    nngp = W**2 * scale * erelu + b**2
    ntk = nngp + W**2 * scale * estep * k0
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-12)


def test_std_overrides_per_module():
    model = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(6, D, dtype=torch.float64)
    k = ntkcompile.compile(model, W_std=1.0, b_std=0.1, std={"0": (2.0, 0.5), "2": (0.7, 0.0)})(x)
    k0, erelu, estep = _relu_layer(2.0, 0.5, x.numpy(), x.numpy())
    nngp = 0.7**2 * erelu
    ntk = nngp + 0.7**2 * estep * k0
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-8)   # arccos at c=1 on the diagonal


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_rmsnorm_against_hand_formula():
    W, b, eps = 1.3, 0.2, 1e-3
    model = nn.Sequential(nn.Linear(D, 8), nn.RMSNorm(8, eps=eps, elementwise_affine=False),
                          nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(5, D, dtype=torch.float64)
    k = ntkcompile.compile(model, W_std=W, b_std=b)(x)
    a = x.numpy()
    q = W**2 * (a * a).sum(1) / D + b**2
    kk = W**2 * a @ a.T / D + b**2
    r = 1 / np.sqrt(q + eps)
    ky = kk * np.outer(r, r)            # covariance after RMSNorm
    qy = q * r * r
    s = np.sqrt(np.outer(qy, qy))
    c = np.clip(ky / s, -1, 1)
    th = np.arccos(c)
    nngp = W**2 * s * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi) + b**2
    dg = W**2 * (np.pi - th) / (2 * np.pi) * np.outer(r, r)    # backward through RMSNorm: dy * r
    ntk = nngp + dg * kk
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-8)


class CorrelatedGate(nn.Module):
    """``tanh(h) * sigmoid(h + g)``: four correlated Gaussians per input pair -> Monte Carlo."""

    def __init__(self, n=8):
        super().__init__()
        self.a, self.c, self.o = nn.Linear(D, n), nn.Linear(D, n), nn.Linear(n, 1)

    def forward(self, x):
        h, g = self.a(x), self.c(x)
        return self.o(torch.tanh(h) * torch.sigmoid(h + g))


def test_program_shows_evaluators_and_monte_carlo_error():
    kfn = ntkcompile.compile(CorrelatedGate(), mc_samples=20_000, seed=3)
    x = torch.randn(3, D, dtype=torch.float64)
    k = kfn(x)
    text = kfn.program
    assert "quasi-monte-carlo(n=20000, seed=3" in text and "backward" in text
    assert k.mc_stderr is not None and 0 < k.mc_stderr < 1e-2
    assert "def kernel_self" in kfn.code
    relu = ntkcompile.compile(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1)))
    relu(x)
    assert "closed form (relu V-transform)" in relu.program and relu(x).mc_stderr is None


def test_product_of_independent_branches_factorizes_exactly():
    """``sigmoid(a x) * tanh(c x)``: E factorizes over the independent matrices a, c."""
    from models import GatedMLP
    W, b = 1.2, 0.3
    x1, x2 = torch.randn(4, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    kfn = ntkcompile.compile(GatedMLP(D, 8), W_std=W, b_std=b, quadrature_degree=256)
    k = kfn(x1, x2)
    assert k.mc_stderr is None and "monte-carlo" not in kfn.program
    a, c = x1.numpy(), x2.numpy()
    q1, q2 = W**2 * (a * a).sum(1) / D + b**2, W**2 * (c * c).sum(1) / D + b**2
    kk = W**2 * a @ c.T / D + b**2
    E = lambda f: _gh2(_torch_np(f), q1, q2, kk)
    dE = lambda f: _gh2(_deriv_np(f), q1, q2, kk)
    ss, tt = E(torch.sigmoid), E(torch.tanh)
    nngp = W**2 * ss * tt + b**2
    ntk = nngp + W**2 * (dE(torch.sigmoid) * tt + ss * dE(torch.tanh)) * kk
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-8)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-8)


def test_concatenation_weights_pieces_by_width():
    """``cat([relu(a x), c x])`` of widths n and 3n, then a Linear: pieces weigh 1/4 and 3/4."""

    class Cat(nn.Module):
        def __init__(self, n=4):
            super().__init__()
            self.a, self.c, self.o = nn.Linear(D, n), nn.Linear(D, 3 * n), nn.Linear(4 * n, 1)

        def forward(self, x):
            return self.o(torch.cat([torch.relu(self.a(x)), self.c(x)], dim=-1))

    W, b = 1.3, 0.2
    x1, x2 = torch.randn(5, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    k = ntkcompile.compile(Cat(), W_std=W, b_std=b)(x1, x2)
    k0, erelu, estep = _relu_layer(W, b, x1.numpy(), x2.numpy())
    nngp = W**2 * (0.25 * erelu + 0.75 * k0) + b**2
    # readout term + first layer a (multiplier relu', piece 1/4) + first layer c (identity, piece 3/4)
    ntk = nngp + W**2 * (0.25 * estep + 0.75) * k0
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-12)


def test_duplicate_inputs_give_psd_symmetric_kernels():
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(4, D, dtype=torch.float64)
    x = torch.cat([x, x[:2]])            # duplicates
    k = ntkcompile.compile(model, W_std=1.4, b_std=0.1)(x)
    for K in (k.nngp, k.ntk):
        assert torch.equal(K, K.T)
        assert torch.linalg.eigvalsh(K).min() > -1e-10 * K.diag().max()
        assert torch.equal(K[4], K[0]) and torch.equal(K[5], K[1])   # duplicates: identical rows


class _PostActivationResidual(nn.Module):
    """``relu(h + W relu(h))``: an H-var of two G-vars, so its kernels come from Monte Carlo."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(D, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(h + self.b(h)))


def test_post_activation_residual_of_one_input_against_a_grid_oracle():
    """``relu(h + W h)``, ``h = relu(U x)``: for one input its NNGP is
    ``E[relu(relu(u) + g)^2]`` with ``u ~ N(0, q)``, ``g ~ N(0, q / 2)`` independent
    (``q = |x|^2 / d``, ``E h^2 = q / 2``), a chain in 1-D that ``helpers.chains`` carries on
    a grid.  Its slots' covariance has rank 2 and kinks oblique to its eigen-directions: the
    trapezoidal rule was off by 3e-3 here (estimate 1.4e-2), scrambled Sobol points are
    within 5 of their standard errors (3.2e-4 relative: below 6e-4)."""
    x = torch.randn(1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q = float((x ** 2).sum()) / D
    truth, change = extrapolated([q / 2, q])
    assert change < 1e-5 * truth
    k = ntkcompile.compile(_PostActivationResidual())(x)
    assert k.quad_error is None and k.nngp_stderr is not None
    se = float(k.nngp_stderr)
    assert se < 6e-4 * truth and abs(float(k.nngp) - truth) < 5 * se


@pytest.mark.parametrize("same", ["object", "copy"])
def test_kernel_of_inputs_against_themselves_is_the_symmetric_one(same):
    """``kfn(x, x)`` (the same tensor, or an equal copy) is ``kfn(x)``: exactly symmetric, also
    where Monte Carlo makes the two triangles of a cross kernel differ (tiles (i, j) and (j, i)
    sample apart).  Against inputs that differ in one last bit it stays a cross kernel, equal to
    the symmetric one to rounding (closed forms) or within the standard errors (Monte Carlo)."""
    x = torch.randn(5, D, dtype=torch.float64)
    x2 = x if same == "object" else x.clone()
    near = x.clone()
    near[0, 0] = torch.nextafter(near[0, 0], torch.tensor(math.inf, dtype=x.dtype))
    for model in (_PostActivationResidual(), nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))):
        kfn = ntkcompile.compile(model)
        k, own, cross = kfn(x, x2, tile_size=2), kfn(x, tile_size=2), kfn(x, near, tile_size=2)
        for name in ("nngp", "ntk"):
            K, O, C = getattr(k, name), getattr(own, name), getattr(cross, name)
            assert torch.equal(K, K.T) and torch.equal(K, O)
            se = getattr(own, f"{name}_stderr")
            if se is None:
                torch.testing.assert_close(C, O, rtol=1e-13, atol=0)
            else:       # two tiles' samples: 5 standard errors of their difference
                assert (C - O).abs().max() <= 5 * math.sqrt(2) * float(se.max())


def test_distinct_rows_whose_projections_collide():
    """Duplicates are screened by one projection per row (``distinct.distinct_rows``); rows
    that project equally but differ must still be told apart (by ``torch.unique``)."""
    from ntkcompile.distinct import distinct_rows
    d = torch.linspace(1.0, 2.0, 3, dtype=torch.float64)            # the fixed direction of 3 features
    a = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    assert float(a @ d) == float(b @ d)                             # a collision, yet different rows
    x = torch.stack([a, b, a])
    uniq, inverse = distinct_rows(x)
    assert uniq.shape[0] == 2 and torch.equal(uniq[inverse], x)
    uniq, inverse = distinct_rows(x[:2])
    assert uniq.shape[0] == 2 and torch.equal(uniq[inverse], x[:2])
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    kfn = ntkcompile.compile(model, W_std=1.2, b_std=0.1)
    k, k2 = kfn(x), kfn(x[:2])
    assert torch.equal(k.ntk[:2, :2], k2.ntk) and torch.equal(k.ntk[2], k.ntk[0])


def test_tile_finiteness_check_when_the_sum_overflows():
    """Tiles are checked by their sum first; a sum that overflows must not fail finite entries."""
    from ntkcompile.tiling import _finite
    big = torch.full((3, 3), 1e308, dtype=torch.float64)
    assert _finite(big) and not torch.isfinite(big.sum())
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[1, 2] = bad
        assert not _finite(t) and not _finite(torch.tensor([0.0, bad]))


def test_float32_on_request():
    model = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(4, D)
    k64 = ntkcompile.compile(model)(x)
    k32 = ntkcompile.compile(model, dtype=torch.float32)(x)
    assert k32.ntk.dtype == torch.float32 and k64.ntk.dtype == torch.float64
    torch.testing.assert_close(k32.ntk.double(), k64.ntk, rtol=1e-5, atol=1e-6)


def test_average_pooling_nngp_against_monte_carlo():
    """NNGP of conv -> ReLU -> AvgPool2d(2) -> flatten -> Linear, against sampling the
    exact Gaussian conv field (numpy); tolerance: 5 Monte Carlo standard errors."""
    class Net(nn.Module):
        def __init__(self, n=4):
            super().__init__()
            self.a, self.p, self.o = nn.Conv2d(2, n, 3, padding=1), nn.AvgPool2d(2), nn.Linear(n * 9, 1)

        def forward(self, x):
            return self.o(self.p(torch.relu(self.a(x))).flatten(1))

    W, b = 1.2, 0.1
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    nngp = ntkcompile.compile(Net(), W_std=W, b_std=b)(x).nngp.numpy()
    patches = F.unfold(x, 3, padding=1)                                   # (2, 18, 36)
    cov = (W**2 * torch.einsum("acs,bct->asbt", patches, patches) / 18 + b**2).reshape(72, 72).numpy()
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(72))
    z = (chol @ np.random.default_rng(0).standard_normal((72, 200_000))).reshape(2, 6, 6, -1)
    pooled = np.maximum(z, 0).reshape(2, 3, 2, 3, 2, -1).mean(axis=(2, 4)).reshape(2, 9, -1)
    samples = np.einsum("ips,jps->ijs", pooled, pooled) / 9              # per-sample products
    mc = W**2 * samples.mean(-1) + b**2
    se = W**2 * samples.std(-1) / np.sqrt(samples.shape[-1])
    assert np.all(np.abs(nngp - mc) < 5 * se), (nngp, mc, se)


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_zero_input_without_biases_has_zero_kernels(act):
    """With no biases the input 0 maps to 0 with zero gradient at every width (PyTorch's
    relu'(0) = 0), so its NNGP and NTK rows are exactly 0 (an exact finite-width oracle).
    This runs the zero-variance branches of the arc-cosine forms (correlation c = 0 there,
    and the angle shared between phi and phi') and checks they leave no NaN or residue."""
    model = nn.Sequential(nn.Linear(3, 8, bias=False), act(), nn.Linear(8, 8, bias=False), act(),
                          nn.Linear(8, 1, bias=False))
    kfn = ntkcompile.compile(model, W_std=1.4)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2] = 0.0
    k = kfn(x)
    rest = kfn(x[[0, 1, 3]])
    for full, sub in ((k.nngp, rest.nngp), (k.ntk, rest.ntk)):
        assert torch.equal(full[2], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(full[:, 2], torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(full[[0, 1, 3]][:, [0, 1, 3]], sub, rtol=1e-14, atol=0)


def test_quadrature_error_is_estimated_and_bounds_the_true_error():
    """A tanh net at large pre-activation variance, at fixed degrees (no refinement): the
    estimate (from n vs n/2 nodes) exceeds the true error, measured against 256 nodes (the
    rule itself is checked against adaptive quadrature in tests/kernels); a warning names
    the remedy.  With the default refinement (up to 4x the nodes where an entry needs
    them) the same start is far more accurate and its estimate still bounds the error."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = 2.0 * torch.randn(6, 4, dtype=torch.float64)
    ref = ntkcompile.compile(model, W_std=1.5, b_std=0.1, quadrature_degree=256, quadrature_tol=None)(x).ntk
    with pytest.warns(RuntimeWarning, match="quadrature_degree"):
        coarse = ntkcompile.compile(model, W_std=1.5, b_std=0.1, quadrature_degree=40, quadrature_tol=None)(x)
    err = float((coarse.ntk - ref).abs().max() / ref.abs().max())
    assert err > 1e-6 and coarse.quad_error > err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine = ntkcompile.compile(model, W_std=1.5, b_std=0.1, quadrature_degree=192, quadrature_tol=None)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # 4x 40 nodes is still not enough here: it says so
        refined = ntkcompile.compile(model, W_std=1.5, b_std=0.1, quadrature_degree=40)(x)
    fine_err = float((fine.ntk - ref).abs().max() / ref.abs().max())
    assert fine_err < 1e-6 and fine_err < fine.quad_error < 1e-4
    refined_err = float((refined.ntk - ref).abs().max() / ref.abs().max())
    assert refined_err < refined.quad_error < 1e-2 and refined_err < err / 1000
    relu = ntkcompile.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))(x)
    assert relu.quad_error is None                     # closed forms only


def _gauss2_split(f, g, k11, k12, k22, kinks, n=64):
    """numpy E f(z1) g(z2) with the Cholesky map z1 = s1 u, z2 = s2 (c u + r v), Gauss-Legendre
    on [-12, 12] in u and v, split at every kink (of f in u; of g in v, for each u): an
    oracle for piecewise functions independent of ntkcompile's truncated moments."""
    x, w = np.polynomial.legendre.leggauss(n)

    def pieces(cuts):
        edges = np.unique(np.clip(np.concatenate([[-12.0, 12.0], cuts]), -12.0, 12.0))
        nodes = [(b - a) / 2 * x + (a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        weights = [(b - a) / 2 * w for a, b in zip(edges[:-1], edges[1:])]
        return np.concatenate(nodes), np.concatenate(weights)

    pdf = lambda t: np.exp(-t * t / 2) / np.sqrt(2 * np.pi)  # noqa: E731
    s1, s2 = np.sqrt(k11), np.sqrt(k22)
    c = np.clip(k12 / (s1 * s2), -1, 1)
    r = np.sqrt(1 - c * c)
    us, wu = pieces(np.array(kinks) / s1)
    total = 0.0
    for u, a in zip(us, wu):
        vs, wv = pieces((np.array(kinks) - s2 * c * u) / (s2 * r))
        total += a * pdf(u) * f(s1 * u) * np.sum(wv * pdf(vs) * g(s2 * (c * u + r * vs)))
    return total


def _one_layer_kernels(x, W, b, f, df, kinks):
    """NNGP and NTK of ``Linear -> phi -> Linear`` (NTK parametrization, ``W``, ``b``) with the
    oracle above: ``f(i)``, ``df(i)``: ``phi`` and the backward multiplier of input ``i``;
    ``kinks(i, j)``: where they break."""
    a = x.numpy()
    kk = W**2 * a @ a.T / a.shape[1] + b**2
    q, n = np.diag(kk), len(a)
    with np.errstate(divide="ignore"):                   # c = 1 on the diagonal: cuts at infinity
        nngp = np.array([[W**2 * _gauss2_split(f(i), f(j), q[i], kk[i, j], q[j], kinks(i, j)) + b**2
                          for j in range(n)] for i in range(n)])
        dd = np.array([[_gauss2_split(df(i), df(j), q[i], kk[i, j], q[j], kinks(i, j)) for j in range(n)]
                       for i in range(n)])
    return nngp, nngp + W**2 * dd * kk


@pytest.mark.parametrize("act, fn, dfn, kinks", [
    (nn.Hardtanh(-0.5, 0.5), lambda z: np.clip(z, -0.5, 0.5), lambda z: ((z > -0.5) & (z < 0.5)) * 1.0, [-0.5, 0.5]),
    (nn.ReLU6(), lambda z: np.clip(z, 0, 6), lambda z: ((z > 0) & (z < 6)) * 1.0, [0.0, 6.0]),
    (nn.Hardswish(), lambda z: z * np.clip(z / 6 + 0.5, 0, 1),
     lambda z: np.where(z < -3, 0.0, np.where(z > 3, 1.0, z / 3 + 0.5)), [-3.0, 3.0]),
], ids=["hardtanh(-0.5,0.5)", "relu6", "hardswish"])
def test_piecewise_activations_are_exact(act, fn, dfn, kinks):
    """Quadrature across the kinks was 2-10 % off (issue 9); the truncated-moment forms agree
    with a split Gauss-Legendre oracle to 1e-9, and no warning is raised."""
    W, b = 2.0, 0.3                 # pre-activation variances ~4: the kinks matter
    x = torch.randn(3, D, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(D, 8), act, nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ntkcompile.compile(model, W_std=W, b_std=b)(x)
    nngp, ntk = _one_layer_kernels(x, W, b, lambda i: fn, lambda i: dfn, lambda i, j: kinks)
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-9)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-9)


def test_relu_of_layernorm_of_relu_is_split_at_per_input_breaks():
    """``relu(LayerNorm(relu(h)))`` is ``relu(a relu(z) + b)`` with per-input ``a = 1/sigma``,
    ``b = -mu/sigma``: kinks at 0 and at ``-b/a``, which depend on the input.  Quadrature across
    them warned with an estimated error of 0.1 (issue 9); split there, the kernels agree with the
    split Gauss-Legendre oracle to 1e-9 (inputs of different norms: different kinks)."""
    W, b, eps = 1.4, 0.3, 1e-5
    x = torch.randn(3, D, dtype=torch.float64) * torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    model = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.LayerNorm(8, elementwise_affine=False), nn.ReLU(),
                          nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ntkcompile.compile(model, W_std=W, b_std=b)(x)
    a_ = x.numpy()
    kk = W**2 * a_ @ a_.T / D + b**2
    q = np.diag(kk)
    mu = np.sqrt(q / (2 * np.pi))
    scale = 1 / np.sqrt(q / 2 - mu**2 + eps)            # LayerNorm's 1/sigma of relu(h)
    t = mu                                               # relu(scale (relu(z) - mu)) kinks at 0 and mu
    f = [lambda z, i=i: np.maximum(scale[i] * (np.maximum(z, 0) - mu[i]), 0) for i in range(3)]
    df = [lambda z, i=i: (z > t[i]) * scale[i] for i in range(3)]   # relu'(LN) * LN's 1/sigma * relu'
    nngp, ntk = _one_layer_kernels(x, W, b, f.__getitem__, df.__getitem__, lambda i, j: [0.0, t[i], t[j]])
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-9)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-9)
    assert k.quad_error < 1e-8


def test_clamp_of_a_width_vector_against_constants():
    """``h.clamp(min=-0.2)`` and ``torch.clamp(h, -1, 2)``: exact piecewise forms."""
    class Clamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

        def forward(self, x):
            h = self.a(x)
            return self.o(torch.clamp(h, -1.0, 2.0) + h.clamp(min=-0.2))

    W, b = 1.5, 0.2
    x = torch.randn(2, D, dtype=torch.float64)
    k = ntkcompile.compile(Clamp(), W_std=W, b_std=b)(x)
    fn = lambda z: np.clip(z, -1, 2) + np.maximum(z, -0.2)  # noqa: E731
    a = x.numpy()
    kk = W**2 * a @ a.T / D + b**2
    q = np.diag(kk)
    nngp = np.array([[W**2 * _gauss2_split(fn, fn, q[i], kk[i, j], q[j], [-1.0, -0.2, 2.0]) + b**2
                      for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-9)


class Where(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)
        self.how = how

    def forward(self, x):
        h = self.a(x)
        if self.how == "where":
            return self.o(torch.where(h > 0, h, 0.1 * h))
        if self.how == "mask":
            return self.o(h * (h > 0).float())
        return self.o(torch.where(h >= 0.5, 1.0, 0.0) + torch.where(0.5 > h, h, 0.5))


@pytest.mark.parametrize("how, same_as", [("where", nn.LeakyReLU(0.1)), ("mask", nn.ReLU())])
def test_where_and_masks_equal_the_activation_they_write(how, same_as):
    x = torch.randn(4, D, dtype=torch.float64)
    a = ntkcompile.compile(Where(how), W_std=1.4, b_std=0.3)(x)
    b = ntkcompile.compile(nn.Sequential(nn.Linear(D, 8), same_as, nn.Linear(8, 1)), W_std=1.4, b_std=0.3)(x)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-12, atol=0)


def test_where_with_a_jump_against_split_quadrature():
    """``where(h >= 0.5, 1, 0) + where(0.5 > h, h, 0.5)``: a jump at 0.5 plus a clamp: exact."""
    W, b = 1.3, 0.2
    x = torch.randn(3, D, dtype=torch.float64)
    kfn = ntkcompile.compile(Where("jump"), W_std=W, b_std=b)
    k = kfn(x)
    fn = lambda z: (z >= 0.5) * 1.0 + np.minimum(z, 0.5)  # noqa: E731
    a = x.numpy()
    kk = W**2 * a @ a.T / D + b**2
    q = np.diag(kk)
    nngp = np.array([[W**2 * _gauss2_split(fn, fn, q[i], kk[i, j], q[j], [0.5]) + b**2 for j in range(3)]
                     for i in range(3)])
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-9)
    assert "piecewise polynomial" in kfn.program and "quadrature" not in kfn.program


def test_monte_carlo_standard_errors_match_the_spread_over_seeds():
    """``tanh(h) * sigmoid(h + g)`` needs the joint evaluator (4 correlated Gaussians per pair
    of inputs: Monte Carlo).  The standard error reported for every entry (from the spread of
    independent replicates) must match the spread of the kernels over independent seeds: the
    per-expectation figure this replaced understated it 15-44x."""
    x = torch.randn(3, D, dtype=torch.float64)
    runs = [ntkcompile.compile(CorrelatedGate(), mc_samples=16_000, seed=s)(x) for s in range(12)]
    for name in ("nngp", "ntk"):
        values = torch.stack([getattr(r, name) for r in runs])
        reported = torch.stack([getattr(r, name + "_stderr") for r in runs]).mean(0)
        spread = values.std(0)
        off = reported > 0                    # entries that Monte Carlo touched
        ratio = (spread[off] / reported[off]).median()
        # 12 seeds: the sample std is within ~ +-35% of the truth, so 0.5-2 cannot fail by chance
        assert 0.5 < float(ratio) < 2.0, (name, float(ratio))
    assert all(r.mc_stderr == float(torch.stack([r.nngp_stderr.max(), r.ntk_stderr.max()]).max()) for r in runs)


def test_nd_quadrature_honours_its_degree_and_the_warning_names_it():
    """The N-D tensor-product rule (the trapezoidal rule, like 1-D and 2-D, so that its
    estimate from halving the nodes is reliable) uses the degrees it is given (it ignored
    every setting before), is refined like the 2-D rule, and a large estimate names the
    knob that helps."""
    from ntkcompile import tiling
    from ntkcompile.kernels import expect

    cov = [[2.0, 1.2], [1.2, 1.5]]
    f = lambda z: torch.tanh(3 * z[..., 0]) * torch.tanh(3 * z[..., 1])  # noqa: E731
    like = torch.zeros((), dtype=torch.float64)
    exact = expect.qn(f, cov, like, [], (2000, 0), True, (512, 512, 512), None)
    errs = {}
    for degree in (24, 48, 96):
        errors = []
        value = expect.qn(f, cov, like, errors, (2000, 0), True, (degree,) * 3, None)
        kind, est = errors[0]
        errs[degree] = abs(float(value - exact)) / abs(float(exact))
        assert kind == "quad_nd" and float(est) >= errs[degree]
    assert errs[96] < errs[48] < errs[24]
    errors = []
    refined = expect.qn(f, cov, like, errors, (2000, 0), True, (24,) * 3, 1e-8)
    assert abs(float(refined - exact)) / abs(float(exact)) < errs[24] / 100
    with pytest.warns(RuntimeWarning, match="larger nd_degree, e.g. 64"):
        tiling.warn_about({"quad_nd": 1e-2}, 96, None)
    with pytest.warns(RuntimeWarning, match="larger quadrature_degree, e.g. 192"):
        tiling.warn_about({"quad": 1e-2}, 96, None)
