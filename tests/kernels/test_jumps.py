"""Nonlinearities with jumps: Stein's lemma with delta terms, quadrature split at the jumps.

Oracles, derived by hand for z ~ N(0, k) jointly Gaussian with z' (covariance k12):
Stein's lemma with the distributional derivative of s(x) = 1[x > t] gives
``E[z s(z')] = k12 p_{k'}(t)`` (``p_k`` the N(0, k) density); ``E[s(z) s(z')]`` is an
orthant probability (``(pi - arccos c) / (2 pi)`` at t = 0, Owen's T or scipy
quadrature split at the jump otherwise).  The backward pass uses the a.e.
derivative s' = 0, so ``NTK = NNGP + W^2 K`` for ``o(g + s(g))``.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch import nn

import ntkcompile
from ntkcompile.kernels.nonlinear import jump_mass, split_q1, split_q2
from ntkcompile.ops.elementwise import register_elementwise
from helpers.registry import restore_registry  # noqa: F401  (a fixture)

F64 = torch.float64
D = 3


def ustep(x):
    return (x > 0).to(x.dtype)


def usign(x):
    return torch.sign(x)


def ustep07(x):
    return (x > 0.7).to(x.dtype)


class Residual(nn.Module):
    """``o(g + act(g))``, ``g = a(x)``: the readout sees a nonlinearity with jumps and its argument."""

    def __init__(self, act):
        super().__init__()
        self.a, self.o, self.act = nn.Linear(D, 8), nn.Linear(8, 1), act

    def forward(self, x):
        g = self.a(x)
        return self.o(g + self.act(g))


def _inputs():
    x = torch.randn(5, D, dtype=F64) * torch.tensor([0.3, 1.0, 2.0, 0.7, 1.5], dtype=F64)[:, None]
    return torch.cat([x, 1.0001 * x[:1], torch.zeros(1, D, dtype=F64)])   # near-collinear, and zero


def _orthant(h1, h2, c):
    """``P(u1 > h1, u2 > h2)`` for standard normals of correlation c (Owen's T; at 0, arccos)."""
    if h1 == 0 and h2 == 0:
        return (math.pi - math.acos(c)) / (2 * math.pi)
    s = math.sqrt(max(0.0, 1.0 - c * c))
    if s == 0.0:
        return stats.norm.sf(max(h1, h2)) if c > 0 else max(0.0, stats.norm.sf(h1) - stats.norm.cdf(-h2))
    a1 = (h2 - c * h1) / (h1 * s) if h1 != 0 else math.inf
    a2 = (h1 - c * h2) / (h2 * s) if h2 != 0 else math.inf
    beta = 0.0 if h1 * h2 > 0 or (h1 * h2 == 0 and h1 + h2 >= 0) else 0.5
    return 0.5 * (stats.norm.sf(h1) + stats.norm.sf(h2)) - special.owens_t(h1, a1) - special.owens_t(h2, a2) - beta


def _residual_step(x, W, b, t=0.0, a=1.0, shift=0.0):
    """``E[(g + phi(g))(g' + phi(g'))]`` for ``phi = a 1[x > t] + shift`` and ``K`` of ``g``."""
    K = W**2 * (x @ x.T).numpy() / D + b**2
    k = np.diag(K)
    out = np.zeros_like(K)
    for i in range(len(k)):
        for j in range(len(k)):
            k1, k2, k12 = k[i], k[j], K[i, j]
            dens = [math.exp(-t * t / (2 * v)) / math.sqrt(2 * math.pi * v) if v > 0 else 0.0 for v in (k1, k2)]
            mean = [stats.norm.sf(t / math.sqrt(v)) if v > 0 else float(0.0 > t) for v in (k1, k2)]
            if k1 > 0 and k2 > 0:
                both = _orthant(t / math.sqrt(k1), t / math.sqrt(k2), float(np.clip(k12 / math.sqrt(k1 * k2), -1, 1)))
            else:
                both = mean[0] * mean[1]
            out[i, j] = (k12 + a * k12 * (dens[0] + dens[1]) + a * a * both
                         + a * shift * (mean[0] + mean[1]) + shift * shift)
    return out, K


def test_the_oracle_against_monte_carlo():
    """The hand-derived E[(g + s)(g' + s')], s = 1[x > 0.7], within 4 standard errors."""
    k1, k2, k12 = 1.3, 0.6, -0.5
    z = np.random.default_rng(0).multivariate_normal([0, 0], [[k1, k12], [k12, k2]], 400_000)
    f = z + (z > 0.7)
    prod = f[:, 0] * f[:, 1]
    x = torch.tensor(np.linalg.cholesky(np.array([[k1, k12], [k12, k2]]) * D), dtype=F64)     # x x' / D = K
    x = torch.cat([x, torch.zeros(2, 1, dtype=F64)], 1)
    exact, K = _residual_step(x, 1.0, 0.0, t=0.7)
    assert np.allclose(K, [[k1, k12], [k12, k2]])
    assert abs(exact[0, 1] - prod.mean()) < 4 * prod.std() / math.sqrt(len(prod))
    assert abs(exact[0, 0] - (f[:, 0] ** 2).mean()) < 4 * (f[:, 0] ** 2).std() / math.sqrt(len(prod))


@pytest.mark.parametrize("W, b", [(1.0, 0.5), (1.3, 0.0)])      # b = 0: the zero input has variance 0
def test_g_plus_step_is_exact(restore_registry, W, b):
    register_elementwise(ustep, "ustep")
    x = _inputs()
    k = ntkcompile.compile(Residual(ustep), W_std=W, b_std=b)(x)
    exact, K = _residual_step(x, W, b)
    nngp = W**2 * exact + b**2
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), nngp + W**2 * K, rtol=1e-10, atol=1e-12)
    assert k.quad_error < 1e-4


def test_sign_declared_found_and_builtin_agree(restore_registry):
    """A user sign with its jump found, and declared (with its size); torch.sign (closed
    forms); and a user step against the built-in sign's (sign + 1) / 2."""
    declared = lambda x: torch.sign(x)  # noqa: E731
    register_elementwise(usign, "usign")
    register_elementwise(declared, "usign_declared", jumps=[(0.0, 2.0)])
    register_elementwise(ustep, "ustep")
    x = _inputs()
    ks = [ntkcompile.compile(Residual(f), W_std=1.1, b_std=0.4)(x) for f in (usign, declared, torch.sign)]
    exact, K = _residual_step(x, 1.1, 0.4, a=2.0, shift=-1.0)
    for k in ks:
        np.testing.assert_allclose(k.nngp.numpy(), 1.21 * exact + 0.16, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(k.ntk.numpy(), 1.21 * exact + 0.16 + 1.21 * K, rtol=1e-10, atol=1e-12)
    step = ntkcompile.compile(Residual(ustep), W_std=1.1, b_std=0.4)(x)
    half = ntkcompile.compile(Residual(lambda g: 0.5 * (torch.sign(g) + 1.0)), W_std=1.1, b_std=0.4)(x)
    for name in ("nngp", "ntk"):
        np.testing.assert_allclose(getattr(step, name).numpy(), getattr(half, name).numpy(), rtol=1e-10)


def test_a_jump_off_zero_against_quadrature_split_at_the_jump(restore_registry):
    """``o(g + 1[g > 0.7])``: the orthant term by scipy quadrature, split at the jump, of
    ``P(z1 > t, z2 > t) = int_{t/s1} phi(u) P(v > (t/s2 - c u) / s) du``."""
    register_elementwise(ustep07, "ustep07")
    x = _inputs()[:5]
    k = ntkcompile.compile(Residual(ustep07), W_std=1.0, b_std=0.5)(x)
    exact, K = _residual_step(x, 1.0, 0.5, t=0.7)
    kd = np.diag(K)
    for i, j in ((0, 1), (1, 3), (2, 4)):
        s1, s2 = math.sqrt(kd[i]), math.sqrt(kd[j])
        c = K[i, j] / (s1 * s2)
        inner = lambda u: stats.norm.pdf(u) * stats.norm.sf((0.7 / s2 - c * u) / math.sqrt(1 - c * c))  # noqa: E731
        both = integrate.quad(inner, 0.7 / s1, np.inf, epsabs=1e-14, epsrel=1e-12)[0]
        stein = K[i, j] * sum(math.exp(-0.49 / (2 * v)) / math.sqrt(2 * math.pi * v) for v in (kd[i], kd[j]))
        assert abs(exact[i, j] - (K[i, j] + stein + both)) < 1e-12
    np.testing.assert_allclose(k.nngp.numpy(), exact + 0.25, rtol=1e-10)
    np.testing.assert_allclose(k.ntk.numpy(), exact + 0.25 + K, rtol=1e-10)
    assert "split at z = 0.7" in ntkcompile.compile(Residual(ustep07)).program


def test_several_slots_fall_back_labelled_approximate(restore_registry):
    """``step(g) * h`` (two Gaussian slots): the N-D evaluator, labelled, its error reported.
    (Its derivative in h, step(g), uses one slot of two: it must drop the other.)"""
    register_elementwise(ustep, "ustep")

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(D, 8), nn.Linear(D, 8), nn.Linear(8, 1)

        def forward(self, x):
            g = self.a(x)
            return self.o(g + ustep(g) * (self.b(x) + g))

    kf = ntkcompile.compile(Gated(), W_std=1.0, b_std=0.5)
    k = kf(_inputs()[:3])
    assert "[non-smooth integrand: approximate]" in kf.program
    assert k.mc_stderr is not None and 0 < k.mc_stderr < 0.05 and torch.isfinite(k.ntk).all()


# ------------------------------------------------------------------ runtime helpers


def _q2(f, g, k11, k12, k22, pf=(0.0,), pg=(0.0,), degree=96):
    errors = []
    like = torch.zeros((), dtype=F64)
    value = split_q2(f, g, like, torch.as_tensor(k11, dtype=F64), torch.as_tensor(k12, dtype=F64),
                     torch.as_tensor(k22, dtype=F64), pf, pg, degree, errors)
    return value, errors


def test_split_q2_on_steps_at_every_correlation():
    c = torch.tensor([-1.0, -0.9999, -0.5, 0.0, 0.3, 0.99, 0.99999, 1 - 1e-12, 1.0], dtype=F64)
    k11, k22 = torch.full_like(c, 2.0), torch.full_like(c, 0.5)
    value, errors = _q2(ustep, ustep, k11, c * 1.0, k22)
    exact = (math.pi - torch.arccos(c)) / (2 * math.pi)
    assert (value - exact).abs().max() < 1e-10
    # the estimate (expect._entry_error) is an honest bound, far above the true 1e-10 here
    assert errors[0][0] == "quad" and 1e-10 < float(errors[0][1]) < 1e-5
    # zero variances: z = 0 exactly, and step(0) = 0; x step(x - t) has its break off zero
    value, _ = _q2(lambda z: z + 1.0, ustep, torch.tensor([0.0, 1.0, 0.0]), torch.zeros(3), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(value, torch.tensor([0.5, 0.0, 0.0], dtype=F64), atol=1e-14)
    value, _ = _q2(lambda z: z, lambda z: z * ustep07(z), 1.0, 0.6, 1.0, pf=(), pg=(0.7,))
    exact = 0.6 * (stats.norm.sf(0.7) + 0.7 * stats.norm.pdf(0.7))     # Stein: k12 E[d/dz (z 1[z > t])]
    assert abs(float(value) - exact) < 1e-12


def test_split_q1_and_jump_mass():
    like = torch.zeros((), dtype=F64)
    var = torch.tensor([0.0, 0.3, 1.0, 4.0], dtype=F64)
    errors = []
    value = split_q1(lambda z: z * ustep07(z), var, like, (0.7,), 192, errors)
    sd = var.sqrt().numpy()
    exact = [0.0] + [s * stats.norm.pdf(0.7 / s) for s in sd[1:]]      # E[z 1[z > t]] = k p_k(t)
    np.testing.assert_allclose(value.numpy(), exact, atol=1e-14)
    mass = jump_mass(lambda z: 2.0 * ustep07(z) + torch.tanh(z), var, like, (0.7,))
    exact = [0.0] + [2.0 * stats.norm.pdf(0.7 / s) / s for s in sd[1:]]
    np.testing.assert_allclose(mass.numpy(), exact, rtol=1e-9)
