"""Elementwise maximum and minimum: ``torch.maximum(a, b)``, ``torch.minimum(a, b)``.

``max(a, b) = (a + b)/2 + |a - b|/2`` and ``min(a, b) = (a + b)/2 - |a - b|/2``:
a linear combination of the arguments and of the absolute value of their
difference.  The op therefore needs no atom kind and no planning rule of its
own: when ``a`` and ``b`` are Gaussian, ``|a - b|`` is ``abs`` of one Gaussian,
whose V-transform is the arc-cosine closed form, and the cross terms
``E[a |a' - b'|]`` follow from Stein's lemma, exactly.  (The worked example of
docs/architecture.md, "How to add an op".)

A number or a per-input moment may stand for either argument
(``max(x, c) = (x + c)/2 + |x - c|/2``); the absolute value of a non-centred
Gaussian has no closed form here, so that case is evaluated by quadrature.
"""
from __future__ import annotations

import torch

from ..errors import WidthInferenceError
from ..passes.lower import Moment, Width, rule
from .elementwise import ELEMENTWISE
from . import activations  # noqa: F401  (registers "abs" before ELEMENTWISE is read)


def _extremum(lw, node, a, b, sign):
    bb = lw.b
    if not isinstance(a, Width):
        a, b = b, a                              # max and min are symmetric
    if not isinstance(a, Width):
        raise lw.unsupported(node, "a maximum or minimum of per-input numbers")
    if isinstance(b, Width):
        if a.positions != b.positions:
            raise lw.error(node, "the maximum of feature maps with different positions", WidthInferenceError)
        other = b.vec
    elif isinstance(b, (int, float)) and not isinstance(b, bool):
        other = bb.lincomb([(bb.sconst(b), bb.one_vec())])
    elif isinstance(b, Moment):
        other = bb.lincomb([(b.s, bb.one_vec())])
    else:
        raise lw.error(node, "the maximum of a width vector and a fixed-dimensional tensor has no "
                       "infinite-width limit", WidthInferenceError)
    half, one = bb.sconst(0.5), bb.sconst(1.0)
    diff = bb.lincomb([(one, a.vec), (bb.sconst(-1.0), other)])
    absdiff = bb.apply(lambda es: bb.ecall(ELEMENTWISE["abs"], es[0]), [diff])
    vec = bb.lincomb([(half, a.vec), (half, other), (bb.sconst(0.5 * sign), absdiff)])
    return lw.width(node, vec, a.size, a.positions)


@rule(torch.maximum, "maximum")
def _maximum(lw, node, a, b):
    return _extremum(lw, node, a, b, 1.0)


@rule(torch.minimum, "minimum")
def _minimum(lw, node, a, b):
    return _extremum(lw, node, a, b, -1.0)
