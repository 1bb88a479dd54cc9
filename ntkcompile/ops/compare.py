"""Comparisons and ``torch.where`` on width vectors.

``h > c`` is the indicator ``step(h - c)`` (``h >= c`` takes the value 1 at
equality): a width vector of zeros and ones, an H-var of ``h``'s G-vars.
``torch.where(cond, a, b) = cond * a + (1 - cond) * b``.  Built from these,
``torch.where(h > 0, h, 0.1 * h)`` or ``h * (h > 0)`` is an expression of one
Gaussian made of piecewise polynomials, whose moments the planner evaluates
exactly (``kernels.piecewise_expr``); of several Gaussians it goes to the joint
evaluator.  A comparison's own gradient is 0 (as in torch): it enters the NTK
only through the values it selects.
"""
from __future__ import annotations

import operator

import torch

from ..errors import WidthInferenceError
from ..passes.lower import Fixed, Moment, Width, rule
from . import arith
from .activations import STEP, _heaviside


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_vec(lw, node, v, like):
    """A width vector, or a number / per-input number times the ones vector."""
    bb = lw.b
    if isinstance(v, Width):
        if v.positions != like.positions:
            raise lw.error(node, "comparing feature maps with different positions", WidthInferenceError)
        return v.vec
    if _is_number(v):
        return bb.lincomb([(bb.sconst(v), bb.one_vec())])
    if isinstance(v, Moment):
        return bb.lincomb([(v.s, bb.one_vec())])
    raise lw.error(node, "comparing a width vector with a fixed-dimensional tensor", WidthInferenceError)


def _compare(lw, node, a, b, strict, flip):
    """``a > b`` (``strict``) or ``a >= b``; ``flip`` swaps the sides (``<``, ``<=``)."""
    if flip:
        a, b = b, a
    w = a if isinstance(a, Width) else b
    if not isinstance(w, Width):
        raise lw.unsupported(node, "a comparison of per-input numbers")
    bb = lw.b
    diff = bb.lincomb([(bb.sconst(1.0), _as_vec(lw, node, a, w)), (bb.sconst(-1.0), _as_vec(lw, node, b, w))])
    fn = STEP if strict else _heaviside(1.0)
    return lw.width(node, bb.apply(lambda es: bb.ecall(fn, es[0]), [diff]), w.size, w.positions)


for _targets, _strict, _flip in (((operator.gt, torch.gt, "gt", torch.greater, "greater"), True, False),
                                 ((operator.ge, torch.ge, "ge", torch.greater_equal, "greater_equal"), False, False),
                                 ((operator.lt, torch.lt, "lt", torch.less, "less"), True, True),
                                 ((operator.le, torch.le, "le", torch.less_equal, "less_equal"), False, True)):
    rule(*dict.fromkeys(_targets))(lambda lw, node, a, b, _s=_strict, _f=_flip: _compare(lw, node, a, b, _s, _f))


@rule(torch.where)
def _where(lw, node, cond, a, b):
    if isinstance(cond, Fixed) and all(isinstance(v, (Fixed, int, float)) for v in (a, b)):
        return Fixed(node)
    if not isinstance(cond, Width):
        raise lw.unsupported(node, "torch.where with a condition that is not a comparison of width vectors")
    bb = lw.b
    ones = Width(bb.one_vec(), cond.size, cond.positions)
    chosen = arith.mul(lw, node, cond, a)
    other = arith.mul(lw, node, arith._add(lw, node, ones, cond, -1.0), b)
    return arith._add(lw, node, chosen, other)
