"""torch.maximum / torch.minimum of width vectors against independent oracles.

Symmetric case, exact: for independent Gaussians ``a``, ``c`` with the same kernel
``k``, ``s = a + c`` and ``u = a - c`` are independent with kernel ``2k``, and
``max(a, c) = s/2 + |u|/2``, so ``E[max max'] = (2 k12 + E|u||u'|) / 4`` with the
arc-cosine form of ``E|u||u'|``; ``d max / d a = step(u)``, ``d max / d c = step(-u)``.
The minimum has the same kernels.  Asymmetric case (different ``W_std``, so
``s`` and ``u`` correlate and Stein's cross terms matter): Monte Carlo over the
exact joint Gaussian, within 5 standard errors.
"""
import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile

D = 4


class Extremum(nn.Module):
    def __init__(self, fn, n=8):
        super().__init__()
        self.a, self.c, self.o = nn.Linear(D, n), nn.Linear(D, n), nn.Linear(n, 1)
        self.fn = fn

    def forward(self, x):
        return self.o(self.fn(self.a(x), self.c(x)))


def _arccos_abs(k11, k12, k22):
    """E|z1||z2| = (2/pi) sqrt(k11 k22) (sqrt(1 - c^2) + c arcsin c)."""
    s = np.sqrt(np.outer(k11, k22))
    c = np.clip(k12 / s, -1, 1)
    return (2 / np.pi) * s * (np.sqrt(1 - c * c) + c * np.arcsin(c))


@pytest.mark.parametrize("fn", [torch.maximum, torch.minimum], ids=["maximum", "minimum"])
def test_symmetric_extremum_against_the_arccos_decomposition(fn):
    W, b = 1.3, 0.4
    x1, x2 = torch.randn(5, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    kfn = ntkcompile.compile(Extremum(fn), W_std=W, b_std=b)
    k = kfn(x1, x2)
    a, c = x1.numpy(), x2.numpy()
    q1, q2 = W**2 * (a * a).sum(1) / D + b**2, W**2 * (c * c).sum(1) / D + b**2
    k12 = W**2 * a @ c.T / D + b**2
    emax = (2 * k12 + _arccos_abs(2 * q1, 2 * k12, 2 * q2)) / 4
    step = (np.pi - np.arccos(np.clip(k12 / np.sqrt(np.outer(q1, q2)), -1, 1))) / (2 * np.pi)
    nngp = W**2 * emax + b**2
    ntk = nngp + 2 * W**2 * step * k12
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-12)
    assert "closed form (abs V-transform)" in kfn.program and "quadrature" not in kfn.program


def test_asymmetric_maximum_against_monte_carlo():
    """W_std 2.0 on one branch, 0.7 on the other: the cross terms E[s |u'|] do not vanish."""
    x = torch.randn(3, D, dtype=torch.float64)
    k = ntkcompile.compile(Extremum(torch.maximum), W_std=1.0, b_std=0.3,
                           std={"a": (2.0, 0.3), "c": (0.7, 0.1)})(x).nngp.numpy()
    xx = x.numpy() @ x.numpy().T / D
    ka, kc = 4.0 * xx + 0.09, 0.49 * xx + 0.01
    rng = np.random.default_rng(0)
    n = 400_000
    za = rng.multivariate_normal(np.zeros(3), ka, n, method="eigh")
    zc = rng.multivariate_normal(np.zeros(3), kc, n, method="eigh")
    m = np.maximum(za, zc)                                  # (samples, inputs)
    prods = m[:, :, None] * m[:, None, :]
    mc = prods.mean(0) + 0.09                               # readout W_std 1, b_std 0.3
    se = prods.std(0) / np.sqrt(n)
    assert np.all(np.abs(k - mc) < 5 * se + 1e-12), (k, mc, se)


class SelfMax(nn.Module):
    """``h.maximum(h / 2)``: the method form; ``max(h, h/2) = 3h/4 + |h|/4`` exactly."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        return self.o(h.maximum(h / 2))


def test_method_form_of_one_vector_with_itself():
    x = torch.randn(4, D, dtype=torch.float64)
    k = ntkcompile.compile(SelfMax(), W_std=1.2, b_std=0.2)(x).nngp.numpy()
    q = 1.44 * (x.numpy() ** 2).sum(1) / D + 0.04
    kk = 1.44 * x.numpy() @ x.numpy().T / D + 0.04
    e = (9 / 16) * kk + (1 / 16) * _arccos_abs(q, kk, q)      # E[h |h'|] = 0 by symmetry
    np.testing.assert_allclose(k, 1.44 * e + 0.04, rtol=1e-12)


class AgainstInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(D, D), nn.Linear(D, 1)

    def forward(self, x):
        return self.o(torch.maximum(self.a(x), x))


class AgainstMean(nn.Module):
    """The maximum of a vector and its own width average (a per-input number)."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(torch.maximum(h, h.mean(-1, keepdim=True)))


def test_a_fixed_tensor_is_refused_and_a_moment_goes_to_quadrature():
    with pytest.raises(ntkcompile.WidthInferenceError, match="fixed-dimensional tensor"):
        ntkcompile.compile(AgainstInput())
    kfn = ntkcompile.compile(AgainstMean(), W_std=1.2, b_std=0.2)
    with pytest.warns(RuntimeWarning, match="quadrature error"):     # |h - m| kinks off its centre
        k = kfn(torch.randn(3, D, dtype=torch.float64))
    assert "quadrature" in kfn.program and torch.isfinite(k.ntk).all() and k.quad_error > 1e-4
