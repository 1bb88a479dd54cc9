"""Runtime entry points of the generated kernel code for Gaussian expectations.

The plan calls these (``kernels.planner``): a closed form (``cf``), the shared
arc-cosine angle (``angle``), and quadratures in 1-D, 2-D and N-D (``q1``,
``q2``, ``qn``), each of which appends an error estimate ``(kind, 0-d tensor)``
to the call's error list: Monte Carlo standard errors (``"mc"``) and quadrature
error estimates (``"quad"``).
"""
from __future__ import annotations

import torch

from . import piecewise as pw
from . import quadrature as quad


def const(x, like):
    """``x`` as a tensor with ``like``'s dtype and device (constants become 0-d tensors)."""
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=like.dtype, device=like.device)


def cf(fn, like, *ks):
    """Call a closed form with tensor arguments (constants become 0-d tensors)."""
    return fn(*[const(k, like) for k in ks])


def pw1(phi, like, k):
    """``E phi(z)`` for a piecewise polynomial ``phi`` (exact; ``kernels.piecewise``)."""
    return pw.expect1(phi, const(k, like))


def pw2(phi, psi, like, k11, k12, k22):
    """``E phi(z1) psi(z2)`` for piecewise polynomials (exact; ``kernels.piecewise``)."""
    return pw.expect2(phi, psi, const(k11, like), const(k12, like), const(k22, like))


def _cov_matrix(entries, like):
    """Stack a DxD nested list of broadcastable entries into ``(*batch, D, D)``."""
    flat = [const(e, like) for row in entries for e in row]
    flat = torch.broadcast_tensors(*flat)
    d = len(entries)
    return torch.stack(flat, dim=-1).reshape(*flat[0].shape, d, d)


def angle(like, k11, k12, k22):
    """``arccos`` of the clamped correlation: shared by the arc-cosine closed forms."""
    return quad.angle(const(k11, like), const(k12, like), const(k22, like))


def _quad_error(value, coarse, scale, smooth):
    """Error estimate of a quadrature at ``n`` nodes from the same rule at ``n/2``.

    ``d = max|Q_n - Q_{n/2}| / max E|f g|`` is about the error of ``Q_{n/2}``,
    relative to the size of the integrand (``scale``, from a coarse rule: the
    expectation itself may vanish by symmetry).  For a smooth integrand the
    trapezoidal rule converges exponentially, so the error of ``Q_n`` is about
    ``d^2 / C`` with ``C >= 1`` (measured C = 30 to 250 for tanh nets): ``d^2`` is
    returned; with a kink (algebraic convergence) ``d`` itself.  A 0-d tensor, so
    that ``jit=True`` traces it.
    """
    d = (value - coarse).abs().max() / scale.abs().max().clamp_min(1e-300)
    return d * d if smooth else d


def _record_estimate(errors, value, rule, degree, smooth, floor):
    """Append the error estimate of ``value = rule(degree, False)`` to ``errors``:
    ``rule(n, absolute)`` evaluates the same expectation with ``n`` nodes per
    dimension (of ``|integrand|`` when ``absolute``), here at ``n/2`` for the
    change and at ``n/4`` (at least ``floor``) for the integrand's size."""
    coarse = rule(degree // 2, False)
    scale = rule(max(floor, degree // 4), True)
    errors.append(("quad", _quad_error(value, coarse, scale, smooth)))


def q1(f, var, like, degree, errors, smooth=True):
    """1-D expectation; its error estimate (``_quad_error``) is appended to ``errors``."""
    var = const(var, like)

    def rule(n, absolute):
        return quad.expect_1d((lambda z: f(z).abs()) if absolute else f, var, n)

    value = rule(degree, False)
    _record_estimate(errors, value, rule, degree, smooth, floor=8)
    return value


def q2(f, g, like, k11, k12, k22, degree, errors, smooth=True):
    """2-D expectation and its error estimate (the extra rules cost about 30% more)."""
    ks = (const(k11, like), const(k12, like), const(k22, like))

    def rule(n, absolute):
        if absolute:
            return quad.expect_2d(lambda z: f(z).abs(), lambda z: g(z).abs(), *ks, n)
        return quad.expect_2d(f, g, *ks, n)

    value = rule(degree, False)
    _record_estimate(errors, value, rule, degree, smooth, floor=8)
    return value


def qn(f, entries, like, errors, samples, seed, smooth=True):
    """N-D expectation; a Monte Carlo standard error, or for the tensor-product
    quadrature (rank <= 3) the same estimate as ``q2`` (half the nodes per
    dimension), is appended to ``errors``."""
    cov = _cov_matrix(entries, like)
    value, stderr = quad.expect_nd(f, cov, mc_samples=samples, seed=seed)
    if stderr is not None:
        errors.append(("mc", stderr.max()))
        return value
    rank = quad.numerical_rank(cov)
    if rank > 0:
        def rule(n, absolute):
            fn = (lambda z: f(z).abs()) if absolute else f
            return quad.expect_nd(fn, cov, degree=max(2, n), mc_samples=samples, seed=seed)[0]

        _record_estimate(errors, value, rule, quad.default_degree(rank), smooth, floor=2)
    return value


def full(x, like, shape):
    """``x`` as an array of exactly ``shape`` (constants and broadcast terms expanded)."""
    if torch.is_tensor(x) and tuple(x.shape) == tuple(shape):
        return x
    return torch.broadcast_to(const(x, like), shape).clone()
