"""Shape-only ops, identity modules, dropout in eval mode, and the flatten readout.

Every op in ``SHAPE_METHODS``/``SHAPE_FUNCTIONS``/``SHAPE_MODULES`` is registered
with ``shape_only=True``: this is the one list of shape-only ops, which readout
discovery also uses (they may follow the readout).  On a width vector they are
the identity on ``(batch, width)``; on a feature map, flattening the positions
into the width axis makes a *flatten readout* (a separate readout vector per
position: the readout sees the mean over aligned positions, ``delta_st``, and
its backward covariance is ``W_std^2 delta_st / P``); after global pooling,
dropping the size-1 position axes is the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import spatial
from ..kernels.planner import READOUT_POOLS, register
from ..passes.lower import Fixed, Width, rule
from ..passes.readout import POST_READOUT_SCALE
from .positions import reshape_unit_axes
from .stack import merge_positions, split_width

SHAPE_METHODS = ("view", "reshape", "flatten", "contiguous", "clone", "squeeze", "unsqueeze",
                 "float", "double", "half", "bfloat16", "to", "type", "type_as", "detach", "cpu")
SHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.clone)
SHAPE_MODULES = (nn.Flatten,)


@rule(*SHAPE_METHODS, *SHAPE_FUNCTIONS, shape_only=True)
def shape_identity(lw, node, x, *args, **kwargs):
    """Reshapes and casts (dtype, device) of a width vector: the identity on its coordinates;
    axes of size 1 added or removed (``unsqueeze``, ``squeeze``) are position axes of size 1;
    the width split into ``(k, m)`` is ``k`` blocks stacked, positions merged into the width
    (a sequence flattened) are concatenated; a feature map flattened is a flatten readout."""
    if isinstance(x, tuple) and len(x) == 1 and isinstance(x[0], Width) and node.target in ("squeeze", torch.squeeze):
        return x[0]           # h_n.squeeze(0) of a one-layer recurrent module (ops/recurrent.py)
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    before, after = tuple(lw.shape(node.args[0])), tuple(lw.shape(node))
    if before == after:
        return x
    if x.pool == "gap" and len(after) >= 2 and after[:2] == before[:2] and math.prod(after[2:]) == 1:
        return x
    if not x.pool:
        for how in (reshape_unit_axes, split_width, merge_positions):
            y = how(lw, node, x, before, after)
            if y is not None:
                return y
    if x.positions and after == (before[0], math.prod(before[1:])) and x.axes[:2] == ("n", "w"):
        return lw.width(node, x.vec, after[1], (), "flatten", x.positions)
    raise lw.unsupported(node, f"reshaping a width vector from {before} to {after}")


@rule(*SHAPE_MODULES, shape_only=True)
def _flatten_module(lw, node, m, x):
    return shape_identity(lw, node, x)


@rule(nn.Identity, shape_only=True, batch_safe=True)
def _identity(lw, node, m, x, *a, **k):
    return x


def _dropout(lw, node, p, training, x):
    if training and p > 0:
        raise lw.error(node, "Dropout is active (training mode): the kernel of a network with "
                       "random dropout masks is not computed. Call model.eval() before compiling.")
    return x


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


@rule(*_DROPOUTS, batch_safe=True)
def _dropout_module(lw, node, m, x):
    return _dropout(lw, node, m.p, m.training, x)


@rule(F.dropout, batch_safe=True)
def _dropout_function(lw, node, x, p=0.5, training=True, inplace=False):
    return _dropout(lw, node, p, training, x)


for _cls in _DROPOUTS:   # after the readout: the identity in eval mode
    POST_READOUT_SCALE[_cls] = lambda node, m: 1.0 if (not m.training or m.p == 0) else None


@rule("size", concrete=True)
def _size(lw, node, x, *args, **kwargs):
    shp = torch.Size(lw.shape(node.args[0]))
    dim = args[0] if args else kwargs.get("dim")
    return shp if dim is None else shp[dim]


@rule(getattr, concrete=True)
def _getattr(lw, node, x, name):
    """``x.shape`` is a Python value; other attributes of a fixed tensor are fixed."""
    if name == "shape":
        return torch.Size(lw.shape(node.args[0]))
    if isinstance(x, Fixed):
        return Fixed(node)
    if name in ("dtype", "device") and isinstance(x, Width):
        return lw.dtype(node.args[0]) if name == "dtype" else torch.device("cpu")
    raise lw.unsupported(node)


# -- the flatten readout -------------------------------------------------------------

def _flatten_cov(pl, core):
    how = spatial.aligned_mean if pl.diag else spatial.diagonal_mean
    return pl.call(how, core, pl.p.readout.positions, pl.batch)


def _flatten_adjoint(pl):
    r = pl.p.readout
    n = math.prod(r.positions)
    if pl.diag:                  # aligned layout: only s = t is stored
        return r.W_std ** 2 / n
    return pl.plan.mul(r.W_std ** 2 / n, pl.call(spatial.identity_pairs, r.positions, pl.like))


register(READOUT_POOLS, "flatten", (_flatten_cov, _flatten_adjoint))
