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
