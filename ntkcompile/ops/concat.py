"""Concatenation and stacking: ``torch.cat`` along the width axis or a position axis, ``torch.stack``.

Along the width axis the coordinates of the result are a mixture of the pieces in
proportion to their finite widths (hidden widths go to infinity in proportion, so
only the ratios matter): an ``ir.Vec`` with one piece per argument.  Along a position
axis (``torch.cat`` of sequences along time) and for ``torch.stack`` (a new position
axis whose entries are the stacked vectors) the result is a sum of placements, a
fixed linear map of positions per part (``ops/positions.py``): the covariance at
positions ``(s, t)`` is ``E[x_s x'_t]`` of the vectors there.  Fixed tensors
concatenate and stack as fixed tensors.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from ..errors import WidthInferenceError
from ..passes.lower import Fixed, Width, rule
from .stack import cat_positions, stack_widths


def _widths(lw, node, tensors, what):
    if all(isinstance(t, Fixed) for t in tensors):
        return False
    if not all(isinstance(t, Width) and not t.pool for t in tensors):
        raise lw.error(node, f"{what} width vectors with fixed tensors (or with pooled vectors)", WidthInferenceError)
    return True


@rule(torch.cat, torch.concat)
def _cat(lw, node, tensors, dim=0):
    if not _widths(lw, node, tensors, "concatenating"):
        return Fixed(node)
    axes = tensors[0].axes
    if not -len(axes) <= dim < len(axes):
        raise lw.error(node, f"dimension {dim} is out of range for width vectors with {len(axes)} axes", IndexError)
    if isinstance(axes[dim], int):
        return cat_positions(lw, node, tensors, dim % len(axes))
    lw.width_axis(node, dim, len(lw.shape(node)), tensors[0])
    if len({(t.positions, t.axes) for t in tensors}) != 1:
        raise lw.error(node, "concatenating feature maps with different positions", WidthInferenceError)
    total = sum(t.size for t in tensors)
    pieces = []
    for t in tensors:
        for frac, var in t.vec.pieces:
            pieces.append((frac * Fraction(t.size, total), var))
    return lw.width(node, lw.b.vec(pieces), total, tensors[0].positions)


@rule(torch.stack)
def _stack(lw, node, tensors, dim=0):
    if not _widths(lw, node, tensors, "stacking"):
        return Fixed(node)
    return stack_widths(lw, node, tensors, dim)
