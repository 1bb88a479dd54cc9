"""Splitting a width vector into pieces: ``chunk``, ``split``, ``tensor_split``, ``unbind``, ``narrow``.

Along the width axis each piece is a block of the width (``ops/blocks.py``: in the
limit an independent slice of every matrix and bias behind it, so the gates of a
hand-written GRU or LSTM cell, ``gi.chunk(3, 1)``, are independent G-vars); along a
position axis each piece is a slice or an index of positions (``ops/positions.py``).
Splitting the batch axis is refused: inputs are independent rows.

Where the pieces fall is what torch itself computes: the op is applied to
``torch.arange(size)``, so every argument form (a chunk count, a size, a list of
sizes or of indices) means what it means in torch.  On fixed tensors these ops are
ordinary fixed computations.
"""
from __future__ import annotations

import torch

from ..passes.lower import Width, rule
from .blocks import slice_width
from .positions import index_width


def _ranges(lw, node, fn, n):
    """The ``(start, stop)`` of every piece ``fn`` cuts ``range(n)`` into."""
    out = []
    for piece in fn(torch.arange(n)):
        idx = piece.tolist()
        if not idx:
            raise lw.unsupported(node, "a split with an empty piece")
        out.append((idx[0], idx[-1] + 1))
    return out


def _pieces(lw, node, x, dim, fn, what):
    if not isinstance(x, Width) or x.pool:
        raise lw.unsupported(node)
    axes = x.axes
    if not -len(axes) <= dim < len(axes):
        raise lw.error(node, f"dimension {dim} is out of range for a width vector with {len(axes)} axes", IndexError)
    role = axes[dim]
    if role == "n":
        raise lw.unsupported(node, f"{what} along the batch axis of a width vector (inputs are independent rows)")
    n = x.size if role == "w" else x.positions[role]
    pieces = []
    for start, stop in _ranges(lw, node, fn, n):
        if role == "w":
            pieces.append(slice_width(lw, node, x, start, stop))
        else:
            idx = tuple(slice(start, stop) if k == dim % len(axes) else slice(None) for k in range(len(axes)))
            pieces.append(index_width(lw, node, x, idx))
    return tuple(pieces)


@rule("chunk", torch.chunk)
def _chunk(lw, node, x, chunks, dim=0):
    return _pieces(lw, node, x, dim, lambda t: torch.chunk(t, chunks), "chunk")


@rule("split", torch.split)
def _split(lw, node, x, split_size_or_sections, dim=0):
    return _pieces(lw, node, x, dim, lambda t: torch.split(t, split_size_or_sections), "split")


@rule("tensor_split", torch.tensor_split)
def _tensor_split(lw, node, x, indices_or_sections, dim=0):
    return _pieces(lw, node, x, dim, lambda t: torch.tensor_split(t, indices_or_sections), "tensor_split")


@rule("narrow", torch.narrow)
def _narrow(lw, node, x, dim, start, length):
    return _pieces(lw, node, x, dim, lambda t: (torch.narrow(t, 0, start, length),), "narrow")[0]


@rule("unbind", torch.unbind)
def _unbind(lw, node, x, dim=0):
    """The positions of one axis, one by one (``for h_t in seq.unbind(1)``)."""
    if not isinstance(x, Width) or x.pool:
        raise lw.unsupported(node)
    axes = x.axes
    role = axes[dim] if -len(axes) <= dim < len(axes) else None
    if not isinstance(role, int):
        raise lw.unsupported(node, f"unbind along the {'batch' if role == 'n' else 'width'} axis of a width vector")
    d = dim % len(axes)
    return tuple(index_width(lw, node, x, tuple(t if k == d else slice(None) for k in range(len(axes))))
                 for t in range(x.positions[role]))
