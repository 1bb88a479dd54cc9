"""Expressions of one Gaussian built from piecewise polynomials, as one piecewise polynomial.

An H-atom of one G-var whose expression uses only nonlinearities that are
piecewise polynomials (``ir.Elementwise.piecewise``: relu, abs, leaky ReLU, step,
sign, hardtanh, clamp, hardsigmoid, hardswish, relu6, ...), constants, sums with
constant coefficients, products, and those nonlinearities applied to an affine
function of the slot, is itself a piecewise polynomial: ``clamp(h, -1, 2) +
h.clamp(min=-0.2)``, ``torch.where(h > 0, h, 0.1 * h)`` written with comparisons,
``relu(h) * step(h)``, ``relu(2 h - 1)``.  ``as_piecewise(expr)`` builds it, so the
planner can evaluate its Gaussian moments exactly (``kernels.piecewise``) instead
of by quadrature across the kinks.  The value at each breakpoint is the one torch
computes there (it matters only for a variance of exactly 0).
"""
from __future__ import annotations

import math
from typing import Optional

from ..ir import ECall, EConst, ELin, EMul, ESlot, SConst, walk
from .piecewise import Piecewise, _poly


def _padd(p, q):
    n = max(len(p), len(q))
    return tuple((p[j] if j < len(p) else 0.0) + (q[j] if j < len(q) else 0.0) for j in range(n))


def _pmul(p, q):
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return tuple(out)


def _pscale(p, c):
    return tuple(c * a for a in p)


def _compose_affine(p, a, b):
    """``p(a x + b)`` for polynomial coefficients ``p``."""
    out = (0.0,)
    power = (1.0,)
    for coef in p:
        out = _padd(out, _pscale(power, coef))
        power = _pmul(power, (b, a))
    return out


def _combine(p: Piecewise, q: Piecewise, op) -> Piecewise:
    """The piecewise polynomial ``op(p, q)`` (``op`` acts on coefficient tuples and floats)."""
    breaks = tuple(sorted(set(p.breaks) | set(q.breaks)))
    edges = (-math.inf,) + breaks + (math.inf,)
    coeffs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mid = _inside(lo, hi)
        coeffs.append(op(p.coeffs[sum(t < mid for t in p.breaks)], q.coeffs[sum(t < mid for t in q.breaks)]))
    at = tuple(op((p.value(t),), (q.value(t),))[0] for t in breaks)
    return _simplify(Piecewise(breaks, tuple(coeffs), at=at))


def _inside(lo, hi):
    if math.isinf(lo) and math.isinf(hi):
        return 0.0
    if math.isinf(lo):
        return hi - 1.0
    if math.isinf(hi):
        return lo + 1.0
    return 0.5 * (lo + hi)


def _simplify(p: Piecewise) -> Piecewise:
    """Drop breakpoints where nothing changes (same polynomial on both sides, continuous)."""
    def trim(c):
        c = list(c)
        while len(c) > 1 and c[-1] == 0.0:
            c.pop()
        return tuple(c)

    coeffs = [trim(c) for c in p.coeffs]
    breaks, keep, at = [], [coeffs[0]], []
    for i, t in enumerate(p.breaks):
        if coeffs[i + 1] == keep[-1] and p.value(t) == _poly(keep[-1], t):
            continue
        breaks.append(t)
        at.append(p.value(t))
        keep.append(coeffs[i + 1])
    return Piecewise(tuple(breaks), tuple(keep), at=tuple(at))


def _of_call(fn, arg: Piecewise) -> Optional[Piecewise]:
    """``fn(arg)`` for an affine ``arg = a x + b`` (no breakpoints, degree <= 1)."""
    pw = getattr(fn, "piecewise", None)
    if pw is None or arg.breaks or len(arg.coeffs[0]) > 2:
        return None
    b = arg.coeffs[0][0]
    a = arg.coeffs[0][1] if len(arg.coeffs[0]) > 1 else 0.0
    if a == 0.0:
        return Piecewise((), ((pw.value(b),),))
    breaks = [(t - b) / a for t in pw.breaks]
    coeffs = [_compose_affine(c, a, b) for c in pw.coeffs]
    at = [pw.value(t) for t in pw.breaks]
    if a < 0:
        breaks, coeffs, at = breaks[::-1], coeffs[::-1], at[::-1]
    return _simplify(Piecewise(tuple(breaks), tuple(coeffs), at=tuple(at)))


def as_piecewise(expr) -> Optional[Piecewise]:
    """``expr`` (an expression of slot 0 only) as a ``Piecewise``, or None if it is not one."""
    def rule(e, xs):
        if any(x is None for x in xs):
            return None
        if isinstance(e, ESlot):
            return Piecewise((), ((0.0, 1.0),)) if e.index == 0 else None
        if isinstance(e, EConst):
            return Piecewise((), ((e.value,),))
        if isinstance(e, ECall):
            return _of_call(e.fn, xs[0])
        if isinstance(e, ELin):
            if not all(isinstance(c, SConst) for c, _ in e.terms):
                return None
            out = Piecewise((), ((0.0,),))
            for (c, _), x in zip(e.terms, xs):
                out = _combine(out, x, lambda p, q, c=c.value: _padd(p, _pscale(q, c)))
            return out
        if isinstance(e, EMul):
            out = xs[0]
            for x in xs[1:]:
                out = _combine(out, x, _pmul)
            return out
        return None

    kids = lambda e: tuple(x for _, x in e.terms) if isinstance(e, ELin) else e.children()  # noqa: E731
    return walk.fold(expr, rule, children=kids)
