"""Concatenation along the width axis: ``torch.cat([a, b], dim=-1)``.

The coordinates of the result are a mixture of the pieces in proportion to their
finite widths (hidden widths go to infinity in proportion, so only the ratios
matter): an ``ir.Vec`` with one piece per argument.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from ..errors import WidthInferenceError
from ..passes.lower import Fixed, Width, rule


@rule(torch.cat, torch.concat)
def _cat(lw, node, tensors, dim=0):
    if all(isinstance(t, Fixed) for t in tensors):
        return Fixed(node)
    if not all(isinstance(t, Width) for t in tensors):
        raise lw.error(node, "concatenating width vectors with fixed tensors", WidthInferenceError)
    lw.width_axis(node, dim, len(lw.shape(node)), tensors[0])
    if len({(t.positions, t.axes) for t in tensors}) != 1:
        raise lw.error(node, "concatenating feature maps with different positions", WidthInferenceError)
    total = sum(t.size for t in tensors)
    pieces = []
    for t in tensors:
        for frac, var in t.vec.pieces:
            pieces.append((frac * Fraction(t.size, total), var))
    return lw.width(node, lw.b.vec(pieces), total, tensors[0].positions)
