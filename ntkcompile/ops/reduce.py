"""Means: over the width axis (a moment, NETSOR+) or over all positions (global pooling).

``x.mean(-1, keepdim=True)`` of a width vector converges to the per-input
number ``E[Z^x]`` and may scale or shift width vectors (hand-written
normalizations); ``x.mean(dim=(2, 3))`` of a feature map is global average
pooling before the readout (``ops/pool.py``); ``h.mean(0)`` over the batch couples the
batch (``ops/batchnorm.py``).
"""
from __future__ import annotations

import torch

from ..passes.lower import Moment, Width, rule
from .batchnorm import batch_mean
from .positions import mean_positions


def _mean(lw, node, x, dim, keepdim, which):
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    nd = len(lw.shape(node.args[0]))
    roles = [x.axes[d % nd] for d in dims if isinstance(d, int)] if len(x.axes) == nd else []
    if "n" in roles:
        raise lw.batch_coupled(node, "a mean over the batch axis of a width vector")
    if lw.batch is not None and roles == [0]:
        return batch_mean(lw, node, x, keepdim)
    if x.positions and not any(x.axes[d % nd] == "w" for d in dims):
        return mean_positions(lw, node, x, dims, keepdim)
    if len(dims) != 1:
        raise lw.unsupported(node, "a reduction over several axes of a width vector")
    lw.width_axis(node, dims[0], nd, x)
    if not keepdim:
        raise lw.error(node, "a width average without keepdim=True is a per-input number; it can "
                       "only scale width vectors (use keepdim=True) and cannot be the output")
    return Moment(lw.b.smoment(which, x.vec))


@rule("mean", torch.mean, batch_safe=True)
def _mean_rule(lw, node, x, dim=None, keepdim=False, dtype=None):
    return _mean(lw, node, x, dim, keepdim, "mean")
