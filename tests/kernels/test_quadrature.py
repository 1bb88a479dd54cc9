"""Gaussian expectations against closed forms (moments, Isserlis, arc-cosine)."""

import math

import numpy as np
import pytest
import torch

from helpers.chains import extrapolated
from ntkcompile.kernels.quadrature import (
    correlation,
    expect_1d,
    expect_2d,
    expect_nd,
    hermite,
    nd_method,
    normal_points,
    numerical_rank,
)

F64 = torch.float64
CS = [-1.0, -0.5, 0.0, 0.7, 1.0]


def t(x):
    return torch.as_tensor(x, dtype=F64)


def relu_kernel(k11, k12, k22):
    """Arc-cosine kernel, written out here from Cho & Saul (2009)."""
    s = math.sqrt(k11 * k22)
    c = max(-1.0, min(1.0, k12 / s))
    return s * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / (2 * math.pi)


# ------------------------------------------------------------------ hermite


def test_hermite_moments_and_cache():
    x, w = hermite(10)
    assert x.dtype == F64 and w.dtype == F64 and x.shape == (10,)
    # E z^(2m) = (2m - 1)!!, exact up to degree 2 * 10 - 1.
    for m, double_factorial in [(0, 1), (1, 1), (2, 3), (3, 15), (4, 105), (9, 34459425)]:
        assert float((w * x ** (2 * m)).sum()) == pytest.approx(double_factorial, rel=1e-12)
    assert float((w * x**5).sum()) == pytest.approx(0.0, abs=1e-12)
    assert hermite(10)[0] is x


def test_hermite_rejects_bad_degree():
    with pytest.raises(ValueError):
        hermite(0)


# ----------------------------------------------------------------- expect_1d


def test_expect_1d_shapes_and_values():
    var = t([[0.0, 0.3], [1.0, 2.5]])
    seen = []

    def f(z):
        seen.append(tuple(z.shape))
        return torch.cos(z)

    out = expect_1d(f, var, degree=40)
    assert seen == [(40, 2, 2)]
    torch.testing.assert_close(out, torch.exp(-var / 2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(expect_1d(lambda z: z**4, var), 3 * var**2, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- expect_2d


def _grid_ks(variances=(0.3, 1.0, 2.5)):
    k11, k12, k22 = [], [], []
    for a in variances:
        for b in variances:
            for c in CS:
                k11.append(a), k22.append(b), k12.append(c * math.sqrt(a * b))
    for b in variances:  # a zero-variance variable
        k11.append(0.0), k22.append(b), k12.append(0.0)
    k11.append(0.0), k22.append(0.0), k12.append(0.0)
    return t(k11), t(k12), t(k22)


def test_expect_2d_polynomial_moments_exact_including_singular():
    k11, k12, k22 = _grid_ks()
    # Isserlis: E z1^2 z2^2 = k11 k22 + 2 k12^2; E z1^3 z2 = 3 k11 k12.
    out = expect_2d(lambda z: z**2, lambda z: z**2, k11, k12, k22, degree=64)
    torch.testing.assert_close(out, k11 * k22 + 2 * k12**2, rtol=1e-12, atol=1e-12)
    out = expect_2d(lambda z: z**3, lambda z: z, k11, k12, k22, degree=64)
    torch.testing.assert_close(out, 3 * k11 * k12, rtol=1e-12, atol=1e-12)


def test_expect_2d_shapes_broadcast():
    shapes = []

    def rec(z):
        shapes.append(tuple(z.shape))
        return z

    out = expect_2d(rec, rec, t(1.0), t([[0.1, 0.2, 0.3]]), t([[1.0], [2.0]]), degree=40)
    assert out.shape == (2, 3)
    assert shapes[0][1:] == (2, 3) and shapes[1][1:] == (2, 3)
    assert shapes[0][0] == 40 and shapes[1][0] == 1600
    torch.testing.assert_close(out, t([[0.1, 0.2, 0.3]]).expand(2, 3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("var, n, tol", [(3.5, 64, 1e-4), (3.5, 128, 1e-10), (11.0, 128, 1e-4)])
def test_trapezoid_resolves_steep_integrands(var, n, tol):
    """E sech(z)^4 (tanh' squared), z ~ N(0, var), against scipy's adaptive quadrature:
    the rule's error at the given node count (Gauss-Hermite: 2e-3, 2e-5, 1e-2)."""
    from scipy import integrate
    s = math.sqrt(var)
    ref = integrate.quad(lambda u: np.cosh(s * u) ** -4 * np.exp(-u * u / 2) / math.sqrt(2 * math.pi),
                         -40, 40, epsabs=1e-15, epsrel=1e-14, limit=1000)[0]
    got = float(expect_1d(lambda z: torch.cosh(z) ** -4, t(var), n))
    assert abs(got - ref) / ref < tol


def test_expect_2d_cos_cos_and_relu():
    k11, k12, k22 = _grid_ks()
    out = expect_2d(torch.cos, torch.cos, k11, k12, k22, degree=48)
    ref = torch.exp(-(k11 + k22) / 2) * torch.cosh(k12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(expect_2d(torch.relu, torch.relu, k11, k12, k22)).all()


def test_correlation_clamps_and_handles_zero():
    scale, c = correlation(t([1.0, 0.0, 4.0]), t([1.0 + 1e-12, 0.0, -2.0000001]), t([1.0, 3.0, 1.0]))
    torch.testing.assert_close(c, t([1.0, 0.0, -1.0]))
    torch.testing.assert_close(scale, t([1.0, 0.0, 2.0]))


# ----------------------------------------------------------------- expect_nd


def _isserlis(K):
    return K[..., 0, 1] * K[..., 2, 3] + K[..., 0, 2] * K[..., 1, 3] + K[..., 0, 3] * K[..., 1, 2]


def _product(z):
    return z.prod(-1)


def _low_rank_cov(rank, batch=(), dim=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, dim, rank, generator=g, dtype=F64) / math.sqrt(rank)
    return a @ a.transpose(-1, -2)


def test_expect_nd_isserlis_by_quadrature():
    cov = _low_rank_cov(3, batch=(2, 3))
    assert numerical_rank(cov) == 3
    value, stderr = expect_nd(_product, cov)
    assert stderr is None and value.shape == (2, 3)
    torch.testing.assert_close(value, _isserlis(cov), rtol=1e-10, atol=1e-12)


def test_expect_nd_isserlis_by_monte_carlo():
    cov = _low_rank_cov(4, batch=(3,))
    value, stderr = expect_nd(_product, cov, mc_samples=100_000, seed=3)
    assert stderr is not None and stderr.shape == (3,) and (stderr > 0).all()
    assert ((value - _isserlis(cov)).abs() < 5 * stderr).all()
    again, _ = expect_nd(_product, cov, mc_samples=100_000, seed=3)
    torch.testing.assert_close(again, value, rtol=0, atol=0)


def test_scrambled_sobol_points_are_unbiased_and_beat_independent_draws():
    """Beyond rank 3 ``expect_nd`` averages over scrambled Sobol points (``normal_points``).
    Each coordinate is standard normal; independent scrambles are unbiased: on a 4-slot
    post-activation residual chain their mean agrees with a grid oracle (Richardson of
    h = 4e-3 and 2e-3, which agree to 1e-6) within 4 standard errors of that mean; and
    their spread is far below the independent-draw standard error ``expect_nd`` reports
    (measured 31x: the bound holds with room for the 16-scramble spread's +-18%)."""
    n = 2 ** 14
    z = normal_points(n, 5, seed=11)
    assert (z.mean(0).abs() < 5 / math.sqrt(n)).all() and ((z.var(0) - 1).abs() < 5 * math.sqrt(2 / n)).all()
    variances = [1.0, 0.5, 0.3, 0.8]
    truth, change = extrapolated(variances)
    assert change < 1e-5

    def f(z):
        return torch.relu(z[..., 0] + torch.relu(z[..., 1] + torch.relu(z[..., 2] + torch.relu(z[..., 3])))) ** 2

    cov = torch.diag(t(variances))
    runs = [expect_nd(f, cov, mc_samples=4096, seed=s) for s in range(16)]
    values = torch.stack([v for v, _ in runs])
    spread = float(values.std())
    assert abs(float(values.mean()) - truth) < 4 * spread / 4
    assert spread < 0.1 * float(runs[0][1])


def _embedded_relu_case():
    """(z0, z1) with a known 2x2 covariance, embedded in a rank-2 4x4 covariance."""
    b = t([[1.0, 0.0], [0.6, 0.9], [0.3, -1.2], [-0.5, 0.4]])
    cov = b @ b.T
    k11, k12, k22 = float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])
    return cov, relu_kernel(k11, k12, k22)


def _relu_pair(z):
    return torch.relu(z[..., 0]) * torch.relu(z[..., 1])


def test_expect_nd_relu_rank_deficient_quadrature():
    cov, ref = _embedded_relu_case()
    assert numerical_rank(cov) == 2
    value, stderr = expect_nd(_relu_pair, cov)
    assert stderr is None
    # Gauss-Hermite converges slowly (about 1/degree) across an oblique kink.
    assert float(value) == pytest.approx(ref, rel=1e-2)
    finer, _ = expect_nd(_relu_pair, cov, degree=128)
    assert abs(float(finer) - ref) < 0.3 * abs(float(value) - ref)


def test_expect_nd_relu_rank_deficient_monte_carlo():
    cov, ref = _embedded_relu_case()
    value, stderr = expect_nd(_relu_pair, cov, max_quadrature_rank=1, mc_samples=100_000, seed=7)
    assert abs(float(value) - ref) < 5 * float(stderr)


def test_expect_nd_rank_zero_and_mixed_batch():
    value, stderr = expect_nd(lambda z: z.sum(-1) + 2.0, torch.zeros(2, 3, 3, dtype=F64))
    assert stderr is None
    torch.testing.assert_close(value, torch.full((2,), 2.0, dtype=F64))
    # Mixed ranks in one batch: rank = the max; a zero matrix still gives f(0).
    cov = torch.stack([torch.zeros(4, 4, dtype=F64), _low_rank_cov(2)])
    value, _ = expect_nd(lambda z: (z**2).sum(-1) + 1.0, cov)
    torch.testing.assert_close(value, t([1.0, 1.0 + float(cov[1].trace())]), rtol=1e-12, atol=1e-12)


def test_expect_nd_tiny_negative_eigenvalue_is_clamped():
    cov = _low_rank_cov(2) - 1e-15 * torch.eye(4, dtype=F64)
    assert numerical_rank(cov) == 2
    value, stderr = expect_nd(lambda z: z[..., 0] * z[..., 1], cov)
    assert stderr is None and float(value) == pytest.approx(float(cov[0, 1]), rel=1e-9)


def test_expect_nd_rejects_wrong_output_shape():
    with pytest.raises(ValueError, match="must map"):
        expect_nd(lambda z: z, torch.eye(2, dtype=F64))


def test_nd_method_names_the_rule():
    assert nd_method(0) == "exact(z=0)"
    assert nd_method(1) == "quadrature(deg=64, dims=1)"
    assert nd_method(3) == "quadrature(deg=16, dims=3)"
    assert nd_method(3, degree=9) == "quadrature(deg=9, dims=3)"
    assert nd_method(4) == "quasi-monte-carlo(n=32768, seed=0)"
    assert nd_method(2, max_quadrature_rank=1, mc_samples=10, seed=5) == "quasi-monte-carlo(n=10, seed=5)"


def test_nd_quadrature_degree_is_honoured():
    # With degree 2 the rule is exact only up to cubic: z^4 is off (E = 3, rule gives 1).
    value, _ = expect_nd(lambda z: z[..., 0] ** 4, torch.ones(1, 1, dtype=F64), degree=2)
    assert float(value) == pytest.approx(1.0)
    value, _ = expect_nd(lambda z: z[..., 0] ** 4, torch.ones(1, 1, dtype=F64))
    assert float(value) == pytest.approx(3.0, rel=1e-12)


def test_hermite_matches_numpy_reference():
    x, w = np.polynomial.hermite_e.hermegauss(7)
    hx, hw = hermite(7)
    np.testing.assert_allclose(hx.numpy(), x)
    np.testing.assert_allclose(hw.numpy() * math.sqrt(2 * math.pi), w)
