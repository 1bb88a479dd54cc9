"""Arithmetic: ``+ - * / **``, ``sqrt``, on width vectors, per-input moments and numbers.

* Linear combinations of width vectors are exact (canonical forms): residual
  branches keep their cross-covariances (``h + tanh(h)`` is exact).
* A product of width vectors is an H-var of their G-vars (``ir.Builder.apply``);
  a width vector times a number or a moment scales it.
* A width vector plus or times a fixed-dimensional tensor has no infinite-width
  meaning (the sizes may only match by accident) and is refused; a trainable
  parameter of the width's size is a bias or a gain (``ops/params.py``).
* After the readout only scaling by a number may follow (``POST_READOUT_SCALE``).
"""
from __future__ import annotations

import operator

import torch

from ..errors import InvalidModelError, WidthInferenceError
from ..ir import SOp
from ..passes.lower import Moment, Width, rule
from ..passes.readout import POST_READOUT_SCALE
from ..trace import describe
from .attention import Logits, add_mask, scale
from .elementwise import apply, from_callable
from .linear import is_zeros
from .params import bare_parameter, parameter_bias, parameter_gain
from .posemb import add_positional, positional_parameter
from .stack import align_maps


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_scalar(lw, v):
    if _is_number(v):
        return lw.b.sconst(v)
    if isinstance(v, Moment):
        return v.s
    return None


def _add(lw, node, a, b, sign=1.0, alpha=1.0):
    """``a + sign*alpha*b``: width vectors, numbers and moments; attention logits plus a mask."""
    bb = lw.b
    if isinstance(a, Logits) and sign == 1.0 and alpha == 1.0:
        return add_mask(lw, node, a, b)
    if isinstance(b, Logits) and sign == 1.0 and alpha == 1.0:
        return add_mask(lw, node, b, a)
    if isinstance(a, Logits) or isinstance(b, Logits):
        raise lw.unsupported(node, "subtracting from attention logits (add a mask instead)")
    if isinstance(a, Width) and isinstance(b, Width):
        if a.size != b.size or a.positions != b.positions:
            raise lw.error(node, f"adding width vectors of sizes {a.size}{a.positions} and {b.size}{b.positions}")
        vec = bb.lincomb([(bb.sconst(1.0), a.vec), (bb.sconst(sign * alpha), b.vec)])
        return lw.width(node, align_maps(lw, vec), a.size, a.positions)
    if isinstance(a, Width) or isinstance(b, Width):
        w, other, cw, co = (a, b, 1.0, sign * alpha) if isinstance(a, Width) else (b, a, sign * alpha, 1.0)
        s = _as_scalar(lw, other)
        if s is None and is_zeros(other):          # a hand-written RNN's initial state
            return lw.width(node, bb.lincomb([(bb.sconst(cw), w.vec)]), w.size, w.positions)
        name = bare_parameter(lw, node, w, other) if s is None else None
        pos = positional_parameter(lw, node, w, other) if s is None and name is None else None
        if pos is not None:
            return add_positional(lw, node, w, pos, cw, co)
        if name is not None:
            atom = parameter_bias(lw, node, w, name)
            if atom is None:
                return lw.width(node, bb.lincomb([(bb.sconst(cw), w.vec)]), w.size, w.positions)
            vec = bb.lincomb([(bb.sconst(cw), w.vec), (bb.sconst(co), bb.single(bb.atom_var(atom)))])
            return lw.width(node, vec, w.size, w.positions)
        if s is None:
            raise lw.error(node, "adding a fixed-dimensional tensor to a width vector: the sizes may "
                           "match in this finite model, but a fixed tensor has no infinite-width "
                           "limit as a width vector", WidthInferenceError)
        vec = bb.lincomb([(bb.sconst(cw), w.vec), (bb.smul(bb.sconst(co), s), bb.one_vec())])
        return lw.width(node, vec, w.size, w.positions)
    sa, sb = _as_scalar(lw, a), _as_scalar(lw, b)
    if sa is not None and sb is not None:
        return Moment(bb.sadd(sa, bb.smul(bb.sconst(sign * alpha), sb)))
    raise lw.unsupported(node, f"{describe(node)} mixing fixed tensors and width-derived values")


@rule(operator.add, torch.add, "add", batch_safe=True)
def _add_rule(lw, node, a, b, alpha=1.0):
    return _add(lw, node, a, b, 1.0, alpha)


@rule(operator.sub, torch.sub, "sub", batch_safe=True)
def _sub_rule(lw, node, a, b, alpha=1.0):
    return _add(lw, node, a, b, -1.0, alpha)


@rule(operator.neg, torch.neg, "neg", batch_safe=True)
def _neg_rule(lw, node, a):
    return mul(lw, node, a, -1.0)


def mul(lw, node, a, b):
    """``a * b``: an H-var for two width vectors, a scaling for a number or moment."""
    bb = lw.b
    if isinstance(a, Logits) or isinstance(b, Logits):
        lg, other = (a, b) if isinstance(a, Logits) else (b, a)
        if not _is_number(other):
            raise lw.unsupported(node, "attention logits times something other than a number")
        return scale(lw, node, lg, other)
    if isinstance(a, Width) and isinstance(b, Width):
        if a.positions != b.positions:
            raise lw.error(node, "multiplying feature maps with different positions", WidthInferenceError)
        vec = bb.apply(lambda es: bb.emul(es), [a.vec, b.vec])
        return lw.width(node, vec, a.size, a.positions)
    if isinstance(a, Width) or isinstance(b, Width):
        w, other = (a, b) if isinstance(a, Width) else (b, a)
        s = _as_scalar(lw, other)
        if s is None and is_zeros(other):
            s = bb.sconst(0.0)
        name = bare_parameter(lw, node, w, other) if s is None else None
        if name is not None:
            return parameter_gain(lw, node, w, name)
        if s is None:
            raise lw.error(node, "multiplying a width vector by a fixed-dimensional tensor",
                           WidthInferenceError)
        return lw.width(node, bb.lincomb([(s, w.vec)]), w.size, w.positions)
    sa, sb = _as_scalar(lw, a), _as_scalar(lw, b)
    if sa is not None and sb is not None:
        return Moment(bb.smul(sa, sb))
    raise lw.unsupported(node)


@rule(operator.mul, torch.mul, "mul", batch_safe=True)
def _mul_rule(lw, node, a, b):
    return mul(lw, node, a, b)


_POWERS: dict = {}


def _elementwise(name, fn):
    """A pointwise power or root as a nonlinearity evaluated by quadrature (one entry per
    name, so that equal powers of one vector are one H-atom)."""
    if name not in _POWERS:
        _POWERS[name] = from_callable(fn, name)
    return _POWERS[name]


def _div(lw, node, a, b):
    if _is_number(b):
        if b == 0:
            raise lw.error(node, "a division by the number 0", InvalidModelError)
        return mul(lw, node, a, 1.0 / b)
    if isinstance(b, Moment):
        return mul(lw, node, a, Moment(lw.b.make(SOp, "pow", (b.s,), -1.0)))
    if isinstance(b, Width):
        return mul(lw, node, a, apply(lw, node, _elementwise("reciprocal", torch.reciprocal), b))
    raise lw.unsupported(node)


@rule(operator.truediv, torch.div, "div", batch_safe=True)
def _div_rule(lw, node, a, b):
    return _div(lw, node, a, b)


@rule(operator.pow, torch.pow, "pow", batch_safe=True)
def _pow_rule(lw, node, a, p):
    if isinstance(a, Moment) and _is_number(p):
        return Moment(lw.b.spow(a.s, p))
    if isinstance(a, Width) and _is_number(p):
        return apply(lw, node, _elementwise(f"pow({float(p)!r})", lambda t, p=p: t ** p), a)
    raise lw.unsupported(node)


def _root(lw, node, a, fn, p):
    if isinstance(a, Moment):
        return Moment(lw.b.spow(a.s, p))
    return apply(lw, node, _elementwise(fn.__name__, fn), a)


# one rule each (not one reading node.target): ops/aten.py registers them under ATen names too
@rule(torch.sqrt, "sqrt", batch_safe=True)
def _sqrt_rule(lw, node, a):
    return _root(lw, node, a, torch.sqrt, 0.5)


@rule(torch.rsqrt, "rsqrt", batch_safe=True)
def _rsqrt_rule(lw, node, a):
    return _root(lw, node, a, torch.rsqrt, -0.5)


@rule(torch.norm, torch.linalg.norm, torch.linalg.vector_norm, "norm")
def _norm_rule(lw, node, x, *args, **kwargs):
    raise lw.error(node, "a norm over the width axis grows like sqrt(width): x / x.norm(...) has coordinates "
                   "of order 1/sqrt(n) and no infinite-width limit in this parametrization. Normalize by the "
                   "root mean square instead: x / x.pow(2).mean(-1, keepdim=True).sqrt() (or nn.RMSNorm)",
                   WidthInferenceError)


# After the readout: scaling by a number (the output is multiplied by the factor).
def _number_arg(node):
    a, b = node.args[:2]
    return float(a) if _is_number(a) else float(b) if _is_number(b) else None


POST_READOUT_SCALE[operator.mul] = POST_READOUT_SCALE[torch.mul] = lambda node, m: _number_arg(node)
POST_READOUT_SCALE[operator.truediv] = POST_READOUT_SCALE[torch.div] = (
    lambda node, m: 1.0 / float(node.args[1]) if _is_number(node.args[1]) else None)
POST_READOUT_SCALE[operator.neg] = POST_READOUT_SCALE[torch.neg] = lambda node, m: -1.0
