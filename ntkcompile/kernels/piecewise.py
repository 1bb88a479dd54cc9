"""Exact Gaussian moments of piecewise-polynomial nonlinearities.

relu6, hardtanh, clamp, hardsigmoid and hardswish are polynomials of degree
<= 2 between finitely many breakpoints, and so are their a.e. derivatives (with
jumps). Quadrature converges slowly at kinks and jumps (a few percent at 96 x 96
nodes); this module evaluates the moments a one-argument H-var needs (TP II,
Sec. 3 and Sec. 4) exactly instead:

* ``expect2(phi, psi, k11, k12, k22) = E[phi(z1) psi(z2)]``,
  ``(z1, z2) ~ N(0, [[k11, k12], [k12, k22]])``: the V-transform when
  ``psi = phi``, the backward factor ``E phi'(z1) phi'(z2)`` with
  ``phi.derivative()``;
* ``expect1(phi, k) = E[phi(z)]``, ``z ~ N(0, k)``;
* ``moments(phi)``: the four of them as ``Elementwise`` fields
  (``vt``, ``dvt``, ``mean``, ``dmean``, plus ``deriv``).

A ``Piecewise`` is a list of polynomials between sorted breakpoints; the ready-made
``relu``, ``step``, ``clamp``, ``hardtanh``, ``relu6``, ``hardsigmoid``,
``hardswish`` agree with torch, including torch's values and autograd
derivatives exactly at the breakpoints.

Method
------
Standardize ``z1 = s1 u``, ``z2 = s2 v`` (``s = sqrt(k)``), so ``(u, v)`` are
standard normals with correlation ``r = c`` (``c`` as in ``quadrature.correlation``).
Around the piece ``p_a`` that contains 0 (its left neighbourhood if 0 is a
breakpoint) a piecewise polynomial is a sum of polynomials times one-sided
indicators::

    phi(x) = p_a(x) + sum_{i > a} (p_i - p_{i-1})(x) 1{x > t_i}
                    + sum_{i < a} (p_i - p_{i+1})(x) 1{x < t_{i+1}}

(anchoring at the piece around 0 keeps every term small when the variance is
small). ``1{x < t} = 1{-x > -t}``, and flipping the sign of ``u`` flips the sign
of ``r``; so every term of ``E phi(z1) psi(z2)`` is a polynomial in ``s1``, ``s2``
times an *orthant moment*

    M_ab(h, k; r) = E[u^a v^b 1{u > h} 1{v > k}],   h = +-t / s1,  k = +-t' / s2,

with ``h = -inf`` for the anchor piece. Gaussian integration by parts
(``E[u g] = E[d_u g] + r E[d_v g]``, the indicators differentiating to point masses)
gives the recursion

    M_00     = L(h, k; r) = P(u > h, v > k) = Phi2(-h, -k; r)
    M_{a+1,b} = a M_{a-1,b} + r b M_{a,b-1} + h^a H_b + r k^b K_a
    M_{0,b+1} = b M_{0,b-1} + k^b K_0 + r H_b

with the boundary terms ``H_b = phi(h) E[v^b 1{v > k} | u = h]`` (``v | u=h ~
N(r h, r'^2)``, ``r' = sqrt(1 - r^2)``) and ``K_a`` the same with the roles
swapped:

    H_0 = phi(h) Phi(-(k - r h) / r'),   H_1 = r h H_0 + J,
    H_b = r h H_{b-1} + (b - 1) r'^2 H_{b-2} + k^(b-1) J,
    J   = r' phi(h) phi((k - r h) / r')   (= r'^2 phi2(h, k; r), symmetric).

``phi``, ``Phi`` are the standard normal pdf and cdf. At ``r = +-1`` every
formula has a limit (``J = 0``, ``H_0 = phi(h) 1{k < r h}``), used as is.
The recursion holds for any degree; the ready-made functions need ``a, b <= 2``.
The 1-D moments are ``E[u^a 1{u > h}] = (a - 1) N_{a-2} + h^(a-1) phi(h)``,
``N_0 = Phi(-h)``, ``N_1 = phi(h)``.

The bivariate normal cdf ``Phi2`` is Genz's algorithm (A. Genz, "Numerical
computation of rectangular bivariate and trivariate normal and t probabilities",
Statistics and Computing 14, 2004): for ``|r| < 0.925`` the Drezner-Wesolowsky
integral ``P(u > h, v > k) = Phi(-h) Phi(-k) + (1/2 pi) int_0^asin r exp(-(h^2 + k^2
- 2 hk sin t) / (2 cos^2 t)) dt``; for ``|r| >= 0.925`` the integral from ``r`` to 1
in ``x = sqrt(1 - rho^2)``, whose ``exp(-(h - k)^2 / 2x^2)`` singularity times the
Taylor polynomial ``1 + c x^2 + c d x^4`` is integrated in closed form and only
the smooth remainder numerically. Both use 20-point Gauss-Legendre (Genz's
largest rule; he uses fewer nodes for small ``|r|``). Absolute error ~1e-15.

Conventions (as ``kernels.elementwise``): inputs are broadcastable tensors (or
numbers), computed in float64 on their own device; ``c = k12 / sqrt(k11 k22)``
clamped to [-1, 1] and 0 where ``k11 k22 = 0``; a variance of exactly 0 means
``z = 0`` exactly, and the value there is ``phi(0)`` as the ``Piecewise`` (and the
torch function it models) defines it at a breakpoint. The evaluation is pure
torch, with no branch on tensor values, so it runs on any device and under
torch.compile (``fullgraph=True``). The graph unrolls ~900 elementwise ops for
relu, ~4700 for hardswish: on a CPU compiling takes 1-2 minutes for relu (and
minutes more for hardswish), after which a call runs 8x faster than eager.

Accuracy and cost
-----------------
Against nested Gauss-Legendre split at every kink (tests/kernels/test_piecewise.py),
over variances 1e-8 .. 1e4, ``c`` in {+-1, +-(1 - 1e-12), ...}: the error is at most
~4e-12 of ``sqrt(E phi(z1)^2 E psi(z2)^2)`` for the ready-made functions and their
derivatives (1e-14 at moderate variances). What is left is rounding in the
anchored sum, whose terms grow like ``(s * coefficient)^2`` while the result of a
bounded function does not: the relative error grows like ``1e-16 k`` at large
variance. The cost is one ``Phi2`` (~500 elementwise ops, both of Genz's forms)
per pair of non-anchor terms: 4 for relu6, hardtanh, hardsigmoid, hardswish; 1
for relu and step. Measured per 10^6 kernel entries on one (shared) CPU core:
3.5-9.5 s eager for the ready-made functions, against 120-225 s for
``quadrature.expect_2d`` at 96 x 96 nodes, which is off by up to 7e-4 (hardswish)
and 6e-2 (hardtanh').
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Piecewise",
    "expect1",
    "expect2",
    "moments",
    "bvn_cdf",
    "relu",
    "step",
    "clamp",
    "hardtanh",
    "relu6",
    "hardsigmoid",
    "hardswish",
]

_F64 = torch.float64
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Standardized thresholds are clamped to +-_FAR: Phi(-50) and phi(50) * 50^4 are 0 in
# float64, so this is exact, and it keeps infinities (t / 0, the anchor's -inf) out of
# products such as h^a phi(h).
_FAR = 50.0
# Genz switches from the asin form to the expansion about r = +-1 here.
_GENZ_SWITCH = 0.925
# 20-point Gauss-Legendre rule on [-1, 1], as Python floats: they enter the torch
# expressions as scalars, so no tensor is created on any device.
_GL_X, _GL_W = (tuple(float(v) for v in a) for a in np.polynomial.legendre.leggauss(20))


# --------------------------------------------------------------------- Piecewise


def _poly(coeffs: Sequence[float], x):
    """``sum_j coeffs[j] x^j`` by Horner, for a float or a tensor."""
    out = coeffs[-1]
    for a in reversed(coeffs[:-1]):
        out = out * x + a
    return out


@dataclass(frozen=True)
class Piecewise:
    """A piecewise polynomial: ``coeffs[i]`` on the ``i``-th interval between ``breaks``.

    Attributes:
        breaks: strictly increasing finite breakpoints ``t_1 < ... < t_m``.
        coeffs: ``m + 1`` coefficient tuples ``(c0, c1, c2, ...)``; piece ``i`` is
            ``sum_j c_j x^j`` on ``(t_i, t_{i+1})`` (``t_0 = -inf``, ``t_{m+1} = inf``).
        at: the value exactly at each breakpoint, or None for the mean of the two
            one-sided limits (the value of a continuous function). It matters only
            for ``z = 0`` exactly (zero variance), when 0 is a breakpoint.
        deriv_at: the value of ``derivative()`` at each breakpoint (autograd's
            convention for the torch function modelled), or None for the mean of the
            one-sided limits.
    """

    breaks: Tuple[float, ...]
    coeffs: Tuple[Tuple[float, ...], ...]
    at: Optional[Tuple[float, ...]] = None
    deriv_at: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        breaks = tuple(float(t) for t in self.breaks)
        coeffs = tuple(tuple(float(a) for a in c) or (0.0,) for c in self.coeffs)
        if len(coeffs) != len(breaks) + 1:
            raise ValueError(f"Piecewise: {len(breaks)} breaks need {len(breaks) + 1} pieces, got {len(coeffs)}")
        if not all(math.isfinite(t) for t in breaks) or any(a >= b for a, b in zip(breaks, breaks[1:])):
            raise ValueError(f"Piecewise: breaks must be finite and strictly increasing, got {breaks}")
        if not all(math.isfinite(a) for c in coeffs for a in c):
            raise ValueError(f"Piecewise: coefficients must be finite, got {coeffs}")
        object.__setattr__(self, "breaks", breaks)
        object.__setattr__(self, "coeffs", coeffs)
        for name in ("at", "deriv_at"):
            values = getattr(self, name)
            if values is not None:
                values = tuple(float(v) for v in values)
                if len(values) != len(breaks):
                    raise ValueError(f"Piecewise: {name} needs one value per break ({len(breaks)}), got {values}")
                object.__setattr__(self, name, values)

    @property
    def degree(self) -> int:
        return max(len(c) for c in self.coeffs) - 1

    def _at_break(self, i: int) -> float:
        if self.at is not None:
            return self.at[i]
        t = self.breaks[i]
        return 0.5 * (_poly(self.coeffs[i], t) + _poly(self.coeffs[i + 1], t))

    def value(self, x: float) -> float:
        """``phi(x)`` for a Python number (``value(0.0)`` is ``phi`` at zero variance)."""
        x = float(x)
        for i, t in enumerate(self.breaks):
            if x == t:
                return self._at_break(i)
        return _poly(self.coeffs[sum(t < x for t in self.breaks)], x)

    def __call__(self, x: Tensor) -> Tensor:
        """``phi(x)`` elementwise, in ``x``'s dtype and on its device."""
        x = torch.as_tensor(x)
        out = self._piece(0, x)
        for i, t in enumerate(self.breaks):
            out = torch.where(x > t, self._piece(i + 1, x), out)
        for i, t in enumerate(self.breaks):
            out = torch.where(x == t, self._at_break(i), out)
        return out

    def _piece(self, i: int, x: Tensor) -> Tensor:
        c = self.coeffs[i]
        return torch.full_like(x, c[0]) if len(c) == 1 else _poly(c, x)

    def derivative(self) -> "Piecewise":
        """The a.e. derivative: pieces differentiated, jumps' point masses dropped (as
        autograd does), ``deriv_at`` as its values at the breakpoints."""
        coeffs = tuple(tuple(j * a for j, a in enumerate(c))[1:] or (0.0,) for c in self.coeffs)
        return Piecewise(self.breaks, coeffs, at=self.deriv_at)


# ------------------------------------------------------------ ready-made functions


def relu() -> Piecewise:
    """``torch.relu``; ``relu'(0) = 0``."""
    return Piecewise((0.0,), ((0.0,), (0.0, 1.0)), deriv_at=(0.0,))


def step() -> Piecewise:
    """``(x > 0)``: 0 at 0, derivative 0."""
    return Piecewise((0.0,), ((0.0,), (1.0,)), at=(0.0,), deriv_at=(0.0,))


def clamp(lo: Optional[float] = None, hi: Optional[float] = None) -> Piecewise:
    """``torch.clamp(x, lo, hi)`` (``None`` = unbounded); its derivative is 1 on the
    closed interval ``[lo, hi]``, breakpoints included, as torch's autograd gives."""
    breaks, coeffs = [], [(0.0, 1.0)]
    if lo is not None:
        breaks, coeffs = [float(lo)], [(float(lo),), (0.0, 1.0)]
    if hi is not None:
        breaks, coeffs = breaks + [float(hi)], coeffs + [(float(hi),)]
    if lo is not None and hi is not None and not float(lo) < float(hi):
        raise ValueError(f"clamp: need lo < hi, got {lo!r}, {hi!r}")
    return Piecewise(tuple(breaks), tuple(coeffs), deriv_at=(1.0,) * len(breaks))


def hardtanh(lo: float = -1.0, hi: float = 1.0) -> Piecewise:
    """``F.hardtanh(x, lo, hi)``: ``clamp`` with derivative 0 at ``lo`` and ``hi`` (torch)."""
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"hardtanh: need lo < hi, got {lo!r}, {hi!r}")
    return Piecewise((lo, hi), ((lo,), (0.0, 1.0), (hi,)), deriv_at=(0.0, 0.0))


def relu6() -> Piecewise:
    """``F.relu6 = hardtanh(0, 6)``."""
    return hardtanh(0.0, 6.0)


def hardsigmoid() -> Piecewise:
    """``F.hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1)``; derivative 0 at +-3 (torch)."""
    return Piecewise((-3.0, 3.0), ((0.0,), (0.5, 1.0 / 6.0), (1.0,)), deriv_at=(0.0, 0.0))


def hardswish() -> Piecewise:
    """``F.hardswish(x) = x hardsigmoid(x)``; torch's derivative is 0 at -3 and 1 at 3."""
    return Piecewise((-3.0, 3.0), ((0.0,), (0.0, 0.5, 1.0 / 6.0), (0.0, 1.0)), deriv_at=(0.0, 1.0))


# ------------------------------------------------------------------ decomposition


@dataclass(frozen=True)
class _Term:
    """``q(x) 1{sign * x > t}``; ``t = -inf`` (always true) for the anchor."""

    sign: float
    t: float
    q: Tuple[float, ...]

    @property
    def anchor(self) -> bool:
        return self.t == -math.inf


def _sub(p: Sequence[float], q: Sequence[float]) -> Tuple[float, ...]:
    n = max(len(p), len(q))
    return tuple((p[j] if j < len(p) else 0.0) - (q[j] if j < len(q) else 0.0) for j in range(n))


def _terms(phi: Piecewise) -> List[_Term]:
    """``phi`` as the anchored sum of the module docstring; zero terms dropped."""
    cs, ts = phi.coeffs, phi.breaks
    a = sum(t < 0 for t in ts)
    terms = [_Term(1.0, -math.inf, cs[a])]
    terms += [_Term(1.0, ts[i - 1], _sub(cs[i], cs[i - 1])) for i in range(a + 1, len(cs))]
    terms += [_Term(-1.0, -ts[i], _sub(cs[i], cs[i + 1])) for i in range(a)]
    return [term for term in terms if any(term.q)]


# ------------------------------------------------------------------- normal tools


def _pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _sf(x: Tensor) -> Tensor:
    """``Phi(-x) = P(u > x)``, accurate in the upper tail."""
    return torch.special.ndtr(-x)


def _upper_small(h: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """``P(u > h, v > k)`` for ``|r| < 0.925``: ``Phi(-h) Phi(-k)`` plus the
    Drezner-Wesolowsky integral over ``t = asin(rho)`` in ``[0, asin r]``."""
    hk, hs = h * k, 0.5 * (h * h + k * k)
    asr = torch.asin(r)
    total = torch.zeros_like(hk)
    for x, w in zip(_GL_X, _GL_W):
        sn = torch.sin(asr * (0.5 * (1.0 + x)))
        total = total + w * torch.exp((sn * hk - hs) / (1.0 - sn * sn))
    return total * asr / (4.0 * math.pi) + _sf(h) * _sf(k)


def _upper_large(h: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """``P(u > h, v > k)`` for ``|r| >= 0.925`` (exact at ``r = +-1``).

    For ``r > 0``: ``P = Phi(-max(h, k)) - (1 / 2 pi) int_0^a f(x) dx``, ``a = sqrt(1 - r^2)``,
    ``f(x) = exp(-(h - k)^2 / 2x^2 - hk / (1 + sqrt(1 - x^2))) / sqrt(1 - x^2)``;
    ``r < 0`` through ``P(u > h, v > k; r) = Phi(-h) - P(u > h, v > -k; -r)``.
    """
    neg = r < 0
    k = torch.where(neg, -k, k)
    hk = h * k
    a2 = (1.0 - r.abs()) * (1.0 + r.abs())
    a = a2.sqrt()
    # r = +-1: the integral is over [0, 0]; a = 1 keeps the expressions finite.
    degenerate = a <= 0
    a = torch.where(degenerate, 1.0, a)
    a2 = torch.where(degenerate, 1.0, a2)
    bs = (h - k) ** 2
    b = bs.sqrt()
    c = (4.0 - hk) / 8.0
    d = (12.0 - hk) / 16.0
    # int_0^a exp(-bs / 2x^2 - hk / 2) (1 + c x^2 + c d x^4) dx in closed form; the
    # exponents are combined so that nothing overflows for very negative hk.
    closed = a * torch.exp(-0.5 * (bs / a2 + hk)) * (1.0 - c * (bs - a2) * (1.0 - d * bs / 5.0) / 3.0
                                                     + c * d * a2 * a2 / 5.0)
    closed = closed - (torch.exp(torch.special.log_ndtr(-b / a) - 0.5 * hk) * math.sqrt(2.0 * math.pi) * b
                       * (1.0 - c * bs * (1.0 - d * bs / 5.0) / 3.0))
    # The smooth remainder f(x) - exp(...)(1 + c x^2 + c d x^4), by Gauss-Legendre on [0, a].
    # Neither factor overflows: bs >= -4 hk makes the first <= 1, and with |h|, |k| <= 50
    # and x^2 <= 1 - 0.925^2 the second's exponent is below 50^2 * 0.145 / (2 * 1.925^2) < 50.
    nh, half_bs, cd = -0.5 * hk, 0.5 * bs, c * d
    rest = torch.zeros_like(hk)
    for x, w in zip(_GL_X, _GL_W):
        xs = a2 * (0.25 * (1.0 + x) ** 2)
        rs = (1.0 - xs).sqrt()
        taylor = 1.0 + xs * (c + cd * xs)
        exact = torch.exp(nh * xs / (1.0 + rs) ** 2) / rs
        rest = rest + w * torch.exp(nh - half_bs / xs) * (exact - taylor)
    integral = torch.where(degenerate, 0.0, (closed + 0.5 * a * rest) / (2.0 * math.pi))
    upper_pos = _sf(torch.maximum(h, k)) - integral
    # Phi(-h) - Phi(-max(h, k)) = P(h < u < k), formed from the smaller tail.
    band = torch.where(h < 0, torch.special.ndtr(k) - torch.special.ndtr(h), _sf(h) - _sf(k))
    upper_neg = torch.where(h < k, band, 0.0) + integral
    return torch.where(neg, upper_neg, upper_pos)


def _upper(h: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """``P(u > h, v > k)`` for standard normals with correlation ``r`` (Genz 2004).

    Both of Genz's forms are evaluated everywhere (no branch on values), each with
    a harmless ``r`` where the other is selected.
    """
    small = r.abs() < _GENZ_SWITCH
    p_small = _upper_small(h, k, torch.where(small, r, 0.0))
    p_large = _upper_large(h, k, torch.where(small, 0.95, r))
    return torch.where(small, p_small, p_large).clamp(0.0, 1.0)


def bvn_cdf(h, k, rho) -> Tensor:
    """``Phi2(h, k; rho) = P(u < h, v < k)`` for standard normals with correlation ``rho``.

    Broadcasting float64 tensors; ``|h|, |k|`` beyond 50 count as infinite; ``rho``
    is clamped into ``[-1, 1]``. Genz's algorithm (module docstring); absolute error ~1e-15.
    """
    h, k, rho = _f64(h, k, rho)
    return _upper((-h).clamp(-_FAR, _FAR), (-k).clamp(-_FAR, _FAR), rho.clamp(-1.0, 1.0))


# ------------------------------------------------------------------ the moments


def _f64(*ks) -> Tuple[Tensor, ...]:
    return tuple(torch.broadcast_tensors(*(torch.as_tensor(k, dtype=_F64) for k in ks)))


def _conditional_z(x: Tensor, y: Tensor, r: Tensor, rc: Tensor) -> Tensor:
    """``(y - r x) / rc``: the standardized ``y`` given the other variable at ``x``;
    its limit ``sign(y - r x) * inf`` (as ``+-_FAR``) where ``rc = 0``."""
    # y - r x = (y - x) + (1 - r) x: near r = 1 (x ~ y) the product r x would round
    # to an absolute error far above the difference; likewise near r = -1.
    d = torch.where(r > 0, (y - x) + (1.0 - r) * x, (y + x) - (1.0 + r) * x)
    positive = rc > 0
    return torch.where(positive, d / torch.where(positive, rc, 1.0), torch.sign(d) * _FAR)


def _powers(x: Tensor, n: int) -> list:
    """``[1, x, x^2, ..., x^(n-1)]``, the 1 a Python number (no tensor op)."""
    out = [1.0, x][:n]
    while len(out) < n:
        out.append(out[-1] * x)
    return out


def _boundary(h, kp, r, rc2, alpha, joint, n: int) -> List[Tensor]:
    """``H_b = phi(h) E[v^b 1{v > k} | u = h]`` for ``b < n`` (module docstring);
    ``kp`` are the powers of ``k``."""
    out = [_pdf(h) * _sf(alpha)]
    if n > 1:
        rh = r * h
        out.append(rh * out[0] + joint)
    for b in range(2, n):
        out.append(rh * out[b - 1] + (b - 1) * rc2 * out[b - 2] + kp[b - 1] * joint)
    return out


def _orthant_moments(h: Tensor, k: Tensor, r: Tensor, m00: Tensor, deg1: int, deg2: int):
    """``M[a][b] = E[u^a v^b 1{u > h} 1{v > k}]`` for ``a <= deg1``, ``b <= deg2``, given
    ``m00 = P(u > h, v > k)``, by the integration-by-parts recursion."""
    rc2 = ((1.0 - r) * (1.0 + r)).clamp_min(0.0)
    rc = rc2.sqrt()
    alpha, beta = _conditional_z(h, k, r, rc), _conditional_z(k, h, r, rc)
    joint = rc * _pdf(h) * _pdf(alpha)
    hp, kp = _powers(h, deg1 + 1), _powers(k, deg2 + 1)
    hb = _boundary(h, kp, r, rc2, alpha, joint, deg2 + 1)        # H_b, b <= deg2
    ka = _boundary(k, hp, r, rc2, beta, joint, max(deg1, 1))     # K_a, a < max(deg1, 1)
    m = [[None] * (deg2 + 1) for _ in range(deg1 + 1)]
    m[0][0] = m00
    for b in range(deg2):
        val = kp[b] * ka[0] + r * hb[b]
        m[0][b + 1] = val + b * m[0][b - 1] if b else val
    for a in range(deg1):
        for b in range(deg2 + 1):
            val = hp[a] * hb[b] + r * kp[b] * ka[a]
            if a:
                val = val + a * m[a - 1][b]
            if b:
                val = val + r * b * m[a][b - 1]
            m[a + 1][b] = val
    return m


def _standardize(var: Tensor) -> Tuple[Tensor, Tensor]:
    """``(s, s_safe)``: ``s = sqrt(var)`` and a divisor that is 1 where ``s = 0``."""
    s = var.sqrt()
    return s, torch.where(s > 0, s, 1.0)


def _threshold(term: _Term, s_safe: Tensor) -> Tensor:
    """The standardized threshold ``t / s`` of ``sign * z / s``, clamped to ``+-_FAR``."""
    if term.anchor:
        return torch.full_like(s_safe, -_FAR)
    return (term.t / s_safe).clamp(-_FAR, _FAR)


def expect1(phi: Piecewise, k) -> Tensor:
    """``E[phi(z)]``, ``z ~ N(0, k)``, for a broadcastable tensor ``k`` (``k = 0``: ``phi(0)``)."""
    (k,) = _f64(k)
    var = k.clamp_min(0.0)
    s, s_safe = _standardize(var)
    sp = _powers(s, phi.degree + 1)
    out = torch.zeros_like(var)
    for term in _terms(phi):
        h = _threshold(term, s_safe)
        pdf = _pdf(h)
        n = [_sf(h), pdf]                              # N_a = E[u^a 1{u > h}]
        for a in range(2, len(term.q)):
            n.append((a - 1) * n[a - 2] + h ** (a - 1) * pdf)
        for a, qa in enumerate(term.q):
            if qa:
                out = out + (qa * term.sign ** a) * sp[a] * n[a]
    return torch.where(var == 0, phi.value(0.0), out)


def expect2(phi: Piecewise, psi: Piecewise, k11, k12, k22) -> Tensor:
    """``E[phi(z1) psi(z2)]``, ``(z1, z2) ~ N(0, [[k11, k12], [k12, k22]])``.

    Broadcastable tensors, float64, on their device. A zero variance makes its
    variable exactly 0: ``E = phi(0) E psi(z2)`` (resp. ``psi(0) E phi(z1)``).
    """
    k11, k12, k22 = _f64(k11, k12, k22)
    v1, v2 = k11.clamp_min(0.0), k22.clamp_min(0.0)
    (s1, s1_safe), (s2, s2_safe) = _standardize(v1), _standardize(v2)
    # c as in quadrature.correlation, without its value-dependent fast path
    scale = (v1 * v2).sqrt()
    r = torch.where(scale > 0, k12 / torch.where(scale > 0, scale, 1.0), 0.0).clamp(-1.0, 1.0)

    s1p, s2p = _powers(s1, phi.degree + 1), _powers(s2, psi.degree + 1)
    out = torch.zeros_like(r)
    terms2 = _terms(psi)
    for t1 in _terms(phi):
        h = _threshold(t1, s1_safe)
        for t2 in terms2:
            k = _threshold(t2, s2_safe)
            rr = (t1.sign * t2.sign) * r
            # with an anchor the orthant is a half-plane: P = Phi(-max(h, k)) exactly
            m00 = _sf(torch.maximum(h, k)) if t1.anchor or t2.anchor else _upper(h, k, rr)
            m = _orthant_moments(h, k, rr, m00, len(t1.q) - 1, len(t2.q) - 1)
            for a, qa in enumerate(t1.q):
                for b, qb in enumerate(t2.q):
                    if qa and qb:
                        w = qa * qb * t1.sign ** a * t2.sign ** b
                        out = out + w * (s1p[a] * s2p[b]) * m[a][b]
    out = torch.where(v1 == 0, phi.value(0.0) * expect1(psi, v2), out)
    return torch.where(v2 == 0, psi.value(0.0) * expect1(phi, v1), out)


def moments(phi: Piecewise) -> Dict[str, Callable]:
    """``vt``, ``dvt``, ``mean``, ``dmean`` and ``deriv`` of ``phi``, named as the fields
    of ``kernels.elementwise.Elementwise`` (``Elementwise(name, fn, **moments(p))``)."""
    d = phi.derivative()
    return dict(
        vt=lambda k11, k12, k22: expect2(phi, phi, k11, k12, k22),
        dvt=lambda k11, k12, k22: expect2(d, d, k11, k12, k22),
        mean=lambda k: expect1(phi, k),
        dmean=lambda k: expect1(d, k),
        deriv=d,
    )
