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
from . import qmc
from . import quadrature as quad
from .compat import compiling, eager


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


def _entry_error(value, coarse, coarser, scale, smooth):
    """The error estimate of ``Q_n`` at every entry, relative to the entry's size (the
    larger of ``|Q_n|`` and ``E|f g|`` from a coarse rule: the expectation itself may
    vanish by symmetry, and the coarse rule may be poor for a steep integrand).

    ``d1 = |Q_n - Q_{n/2}|`` is about the error of ``Q_{n/2}`` and, convergence being
    monotone, a bound on that of ``Q_n``.  For a smooth integrand the trapezoidal rule
    converges exponentially, ``e(n) = A exp(-a n)``; with ``d0 = |Q_{n/2} - Q_{n/4}|``
    that model gives ``e(n) = d1^3 / d0^2``.  Before the rule reaches that regime the
    model runs up to ~2x low (measured on tanh products), so the estimate is the smaller
    of ``d1`` and ten times the model.  A kinked integrand converges algebraically: ``d1``.
    """
    size = torch.maximum(value.abs(), scale.abs()).clamp_min(1e-300)
    d1 = (value - coarse).abs() / size
    if not smooth:
        return d1
    d0 = (coarse - coarser).abs() / size
    return torch.minimum(d1, 10.0 * d1 * (d1 / d0.clamp_min(1e-300)) ** 2)


# A quadrature is refined (its nodes doubled) where an entry's estimate is above the
# tolerance, at most this many times: the trapezoidal rule needs nodes in proportion to
# the pre-activation standard deviation (tanh: about 50 per unit of std for 1e-12).
_REFINEMENTS = 2


def _refine(errors, kind, rule, degree, smooth, floor, tol, value=None):
    """``rule(degree)``, refined where an entry's estimate exceeds ``tol``, with the largest
    estimate of the values returned appended to ``errors`` as ``(kind, 0-d tensor)``.

    ``rule(n, absolute)`` evaluates the expectation with ``n`` nodes per dimension (of
    ``|integrand|`` when ``absolute``); an entry's estimate uses the rules at ``n``,
    ``n/2`` and ``n/4`` (at least ``floor``) nodes (``_entry_error``).  While some entry
    exceeds ``tol`` (smooth integrands only: a kinked one converges algebraically) the
    nodes double, at most ``_REFINEMENTS`` times, and every entry keeps the value of the
    first rule at which it met the tolerance: a value depends on its own entry alone,
    so tiles of any size give the same kernels.  The decision looks at values, which
    ``torch.compile`` and the ``meta`` device cannot: there the degree stays as given.
    A 0-d tensor, so that ``jit=True`` traces it.
    """
    value = rule(degree, False) if value is None else value
    coarse = rule(degree // 2, False)
    quarter = max(floor, degree // 4)
    coarser, scale = rule(quarter, False), rule(quarter, True)
    d = _entry_error(value, coarse, coarser, scale, smooth)
    n = degree
    for _ in range(_REFINEMENTS):
        if tol is None or not smooth or compiling() or value.device.type == "meta":
            break
        todo = d > tol
        if not bool(todo.any()):
            break
        n *= 2
        finer = rule(n, False)
        d = torch.where(todo, _entry_error(finer, value, coarse, scale, smooth), d)
        coarse, value = value, torch.where(todo, finer, value)
    errors.append((kind, d.max() if d.numel() else d.sum()))
    return value


def q1(f, var, like, degree, errors, smooth=True, tol=None):
    """1-D expectation, refined to ``tol`` (``_refine``); its error estimate goes to ``errors``."""
    var = const(var, like)

    def rule(n, absolute):
        return quad.expect_1d((lambda z: f(z).abs()) if absolute else f, var, n)

    return _refine(errors, "quad", rule, degree, smooth, 8, tol)


def q2(f, g, like, k11, k12, k22, degree, errors, smooth=True, tol=None):
    """2-D expectation, refined to ``tol``; the error estimate costs about 30% more."""
    ks = (const(k11, like), const(k12, like), const(k22, like))

    def rule(n, absolute):
        if absolute:
            return quad.expect_2d(lambda z: f(z).abs(), lambda z: g(z).abs(), *ks, n)
        return quad.expect_2d(f, g, *ks, n)

    return _refine(errors, "quad", rule, degree, smooth, 8, tol)


def _sampled(entries, like, smooth):
    """``(batch, slots, groups)`` of ``qmc.prepare`` when ``qn`` samples (rank above the
    quadrature's), else None (also on the meta device, where the rank is not known: the dense
    evaluator decides; under ``torch.compile`` the N-D helpers run eagerly, ``compat.eager``,
    since a traced graph would have to take the dense evaluator, every entry on the same
    points: 1.7e-2 off on a 1-block ResNet v1 at 512 points, four of its standard errors)."""
    if compiling() or like.device.type == "meta":
        return None
    batch, d, groups, _, rank = qmc.prepare_shared(entries, like)
    return (batch, d, groups) if rank > quadrature_rank(smooth) else None


@eager
def qn_family(family, entries, like, mc, smooth=True, layout=(0, False, 0)):
    """The expectations of ``family`` (a ``pointwise.Family``: the integrands of ``qn`` and
    ``qn_pair`` calls over one covariance) in one compiled pass on the same points:
    ``qmc.expect_family``'s list, which the calls take as ``shared``; None where that pass
    does not apply (each call then samples on its own, on the same points)."""
    sampled = _sampled(entries, like, smooth)
    if sampled is None or family.program is None:
        return None
    samples, seed = mc
    positions, same_input, stream = layout
    return qmc.expect_family(family.program, *sampled, qmc.samples_for(samples, same_input), seed, positions,
                             stream)


def _family_arrays(family, *_):
    """The pair arrays ``qn_family``'s result holds (its members' means and standard errors), for
    codegen's estimate of the memory a tile needs; ``family``: the plan's ``Static``."""
    return family.obj.outputs + len(family.obj.members)


qn_family.arrays = _family_arrays


@eager
def qn(f, entries, like, errors, mc, smooth=True, degrees=(192, 96, 32), tol=None, layout=(0, False, 0),
       program=None, shared=None, member=0):
    """N-D expectation: quasi-Monte Carlo over ``mc = (samples, seed)`` beyond rank 3, and
    beyond rank 1 for a kinked integrand (its standard error goes to ``errors`` as ``"mc"``),
    else the tensor-product trapezoidal rule with ``degrees[rank - 1]`` nodes per dimension,
    refined to ``tol`` like ``q2`` (estimate ``"quad_nd"``).  A kink costs the trapezoidal
    rule its exponential convergence, and its error estimate its meaning: on a post-activation
    residual chain of rank 3 (``relu(z0 + relu(z1 + relu(z2)))^2``) it was off by 3.6e-3 at
    32^3 nodes, where scrambled Sobol points are off by about 1.5e-4 at as many; on the NTK of
    ``relu(h + W h)`` for one input (rank 2, its kinks oblique to the eigen-directions) by
    3.2e-3 at 96^2 nodes (estimate 1.4e-2, and 1.0e-2, 3.0e-3 at 128^2, 256^2), where the
    default 8 x 4096 points are within their standard error of 1.6e-4.

    The quasi-Monte Carlo draws independent groups of slots from their own factors, one net
    of points per position pair (``kernels.qmc``); ``layout = (positions, same_input, stream)``:
    the trailing batch axes that are positions, whether the entries are same-input ones
    (variances: few, given ``qmc.SAME_INPUT_BOOST`` times the points), and the call's number;
    ``program``: ``f`` as a ``pointwise.Program`` for the fused sampler, or None; ``shared``:
    ``qn_family``'s results, of which this call's is ``member`` (None: sample here)."""
    samples, seed = mc
    if shared is not None:
        value, stderr, _ = shared[member]
        errors.append(("mc", stderr.max()))
        return value
    sampled = _sampled(entries, like, smooth)
    if sampled is not None:
        positions, same_input, stream = layout
        value, stderr, _ = qmc.expect_blocks(f, *sampled, qmc.samples_for(samples, same_input), seed, positions,
                                             stream, program)
        errors.append(("mc", stderr.max()))
        return value
    cov = _cov_matrix(entries, like)
    rank = quad.numerical_rank(cov)
    top = quadrature_rank(smooth)
    degree = degrees[rank - 1] if 1 <= rank <= min(top, len(degrees)) else None
    value, stderr = quad.expect_nd(f, cov, degree=degree, mc_samples=samples, seed=seed, rule="trapezoid",
                                   max_quadrature_rank=top)
    if stderr is not None:
        errors.append(("mc", stderr.max()))
        return value
    if rank == 0:
        return value

    def rule(n, absolute):
        fn = (lambda z: f(z).abs()) if absolute else f
        return quad.expect_nd(fn, cov, degree=max(2, n), mc_samples=samples, seed=seed, rule="trapezoid",
                              max_quadrature_rank=top)[0]

    return _refine(errors, "quad_nd", rule, degree, smooth, 4, tol, value)


@eager
def qn_pair(fa, fb, va, vb, entries, like, errors, mc, smooth=True, degrees=(192, 96, 32), tol=None,
            layout=(0, False, 0), program=None, shared=None, member=0):
    """``E[a(z) b(z)]`` for two vectors on different inputs or positions (``qn`` of the product),
    given their variances ``va = E[a^2]``, ``vb = E[b^2]`` (the same-input values, lifted to
    the pair).  Under quasi-Monte Carlo it is the ratio estimate
    ``mean(a b) sqrt(va vb / (mean(a^2) mean(b^2)))``, all three means on the same points: the
    correlation it implies with ``va`` and ``vb`` is then at most 1 in size (Cauchy-Schwarz), and
    near 1 it is nearly exact (a and b nearly equal on the same points).  Against its own
    variances an estimate of ``E[a b]`` on other points than theirs is a correlation with
    independent errors in numerator and denominator, pushed past 1 by noise where the
    correlation is near 1 (neighbouring positions, near-duplicate inputs), then clamped: the
    step family's ``arccos`` there turned that noise into a bias of 6e-4 (relative) in the NTK
    of a 3-block ResNet v1 with 256 points per replicate.  ``program``: the three moments as a
    ``pointwise.Program`` for the fused sampler, or None; ``shared``, ``member``: as ``qn``'s."""
    if shared is not None:
        mab, stderr, (maa, mbb) = shared[member]
    else:
        sampled = _sampled(entries, like, smooth)
        if sampled is None:
            return qn(lambda z: fa(z) * fb(z), entries, like, errors, mc, smooth, degrees, tol, layout)

        def moments(z):
            a, b = fa(z), fb(z)
            return a * b, a * a, b * b

        (samples, seed), (positions, _, stream) = mc, layout
        mab, stderr, (maa, mbb) = qmc.expect_blocks(moments, *sampled, samples, seed, positions, stream, program)
    den = maa * mbb
    scale = torch.where(den > 0, (const(va, like) * const(vb, like)).clamp_min(0.0)
                        / torch.where(den > 0, den, 1.0), 1.0).sqrt()
    errors.append(("mc", (stderr * scale).max()))
    return mab * scale


# Ranks up to which ``qn`` uses the tensor-product rule for a smooth integrand and for a kinked
# one; quasi-Monte Carlo beyond.
MAX_QUADRATURE_RANK = 3
KINKED_QUADRATURE_RANK = 1


def quadrature_rank(smooth: bool) -> int:
    """The largest rank at which ``qn`` uses the tensor-product rule."""
    return MAX_QUADRATURE_RANK if smooth else KINKED_QUADRATURE_RANK


def full(x, like, shape):
    """``x`` as an array of exactly ``shape`` (constants and broadcast terms expanded)."""
    if torch.is_tensor(x) and tuple(x.shape) == tuple(shape):
        return x
    return torch.broadcast_to(const(x, like), shape).clone()
