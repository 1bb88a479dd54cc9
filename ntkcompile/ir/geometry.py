"""Geometry of a window map over fixed positions (convolution taps, pooling windows).

IR metadata: a convolution's matrix and an average pooling carry one, and the
runtime stencils (``kernels.spatial``) read it.  Zero padding is symmetric.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """Windows over ``len(kernel)`` spatial axes: output position ``s`` reads the
    (padded) input positions ``s * stride + k * dilation`` for every tap ``k``."""
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    in_shape: tuple
    out_shape: tuple

    @property
    def size(self) -> int:
        return math.prod(self.kernel)

    def offsets(self):
        """Offsets (in padded input coordinates) of every kernel tap."""
        return list(itertools.product(*[[k * d for k in range(n)] for n, d in zip(self.kernel, self.dilation)]))

    def window(self, offset):
        """Slices picking, for every output position, the padded input position at ``offset``."""
        return tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, self.stride, self.out_shape))

    @staticmethod
    def make(kernel, stride, padding, dilation, in_shape):
        nd = len(in_shape)
        tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd  # noqa: E731
        kernel, stride, dilation = tup(kernel), tup(stride), tup(dilation)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even effective kernel pads asymmetrically")
            padding = tuple(t // 2 for t in total)
        elif padding == "valid":
            padding = (0,) * nd
        padding = tup(padding)
        out = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                    for s, p, d, k, st in zip(in_shape, padding, dilation, kernel, stride))
        if any(o <= 0 for o in out):
            raise ValueError(f"convolution output would be empty for input {in_shape}")
        return ConvGeometry(kernel, stride, padding, dilation, tuple(in_shape), out)


class PositionMap:
    """A fixed linear map of positions, ``y_s = sum_a M[s, a] x_a`` (positions flattened
    in C order): indexing, slicing and averaging along fixed axes (``ops/positions.py``).

    Interned by content (``PositionMap.make``), so equal maps are the same object and
    atoms built from them are the same node.  ``place`` is the input position each
    output reads, or -1 where it is 0, when every row of ``M`` is 0 or a single 1 (an
    index, a slice, a placement into a stack or a concatenation), else None;
    ``select`` the same when no row is 0 (an index or a slice), else None.
    """
    __slots__ = ("in_shape", "out_shape", "matrix", "label", "select", "place")
    _interned: dict = {}

    def __init__(self, in_shape, out_shape, matrix, label):
        self.in_shape, self.out_shape, self.label = tuple(in_shape), tuple(out_shape), label
        self.matrix = matrix
        ones = (matrix == 1.0).sum(axis=1)
        zeros = (matrix == 0.0).sum(axis=1)
        unit = bool(((ones == 1) & (zeros == matrix.shape[1] - 1) | (zeros == matrix.shape[1])).all())
        self.place = tuple(int(i) if o else -1 for i, o in zip(matrix.argmax(axis=1), ones)) if unit else None
        self.select = self.place if unit and -1 not in self.place else None

    @staticmethod
    def make(in_shape, out_shape, matrix, label) -> "PositionMap":
        import numpy as np
        m = np.ascontiguousarray(np.asarray(matrix, dtype=np.float64))
        m.setflags(write=False)
        key = (tuple(in_shape), tuple(out_shape), m.tobytes())
        found = PositionMap._interned.get(key)
        if found is None:
            found = PositionMap._interned[key] = PositionMap(in_shape, out_shape, m, label)
        return found

    def __repr__(self):
        return f"PositionMap({self.label}: {self.in_shape} -> {self.out_shape})"
