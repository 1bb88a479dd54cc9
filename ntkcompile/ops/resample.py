"""Padding and resampling of feature maps: ``F.pad`` (zeros, reflect, replicate, circular),
``nn.ZeroPad2d`` and the other padding modules, ``F.interpolate`` / ``nn.Upsample``
(nearest, linear, bilinear, bicubic, area, with or without ``align_corners``).

Each is a fixed linear map ``M`` of the positions of a feature map, the same for every
channel and every input: a ``GPosMap`` (``ops/positions.py``), Gaussian exactly when its
argument is, with ``E[y_s y'_t] = sum_{a,b} M[s,a] M[t,b] E[x_a x'_b]`` and the adjoint
``M^T D M`` in the backward.  ``M`` is read off torch itself: the op applied to every
one-hot map of the input positions (so it is exactly torch's, for every mode).  Zero
padding of a nonlinearity keeps its zeros (``M`` has zero rows), so a nonlinearity may
follow only where the padded vector is Gaussian (padding right after a convolution) or
after the next convolution; a constant other than 0 is refused (an affine map).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ir import PositionMap
from ..passes.lower import Width, rule
from .positions import map_vec


def _matrix(op, in_shape):
    """``(M, out_shape)`` of the linear map ``op`` of ``(B, 1, *in_shape)`` maps."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *in_shape)
    with torch.no_grad():
        out = op(basis)
    return out.reshape(n, -1).T.numpy(), tuple(out.shape[2:])


def _resample(lw, node, x, op, label):
    if not isinstance(x, Width) or not x.positions or x.pool:
        raise lw.unsupported(node, f"{label} of a tensor that is not a feature map")
    if x.axes != ("n", "w") + tuple(range(len(x.positions))):
        raise lw.unsupported(node, f"{label} of a width vector laid out as {x.axes} (channels first, "
                             "(N, C, *positions), is what it reads)")
    try:
        M, out_shape = _matrix(op, x.positions)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise lw.unsupported(node, f"{label} ({type(e).__name__}: {e})") from e
    pmap = PositionMap.make(x.positions, out_shape, M, label)
    return lw.width(node, map_vec(lw, pmap, x.vec), x.size, out_shape)


def pad(lw, node, x, pads, mode="constant", value=None):
    pads = tuple(int(p) for p in pads)
    nd = len(x.positions) if isinstance(x, Width) else 0
    if len(pads) > 2 * nd:
        raise lw.unsupported(node, f"padding {pads} reaches beyond the {nd} position axes of a feature map "
                             "(padding the channels or the batch has no infinite-width meaning)")
    if mode == "constant" and value not in (None, 0, 0.0):
        raise lw.unsupported(node, f"padding with the constant {value} (an affine map: only zeros are supported)")
    return _resample(lw, node, x, lambda t: F.pad(t, pads, mode=mode), f"pad{pads} ({mode})")


@rule(F.pad)
def _pad_function(lw, node, x, pad_, mode="constant", value=None):
    return pad(lw, node, x, pad_, mode, value)


@rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
      nn.ReplicationPad1d, nn.ReplicationPad2d, *([nn.CircularPad1d, nn.CircularPad2d]
                                                  if hasattr(nn, "CircularPad2d") else []))
def _pad_module(lw, node, m, x):
    modes = (("Reflection", "reflect"), ("Replication", "replicate"), ("Circular", "circular"))
    mode = next((mode for prefix, mode in modes if type(m).__name__.startswith(prefix)), "constant")
    return pad(lw, node, x, m.padding, mode, getattr(m, "value", None))


def interpolate(lw, node, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    def op(t):
        return F.interpolate(t, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                             recompute_scale_factor=recompute_scale_factor, antialias=antialias)
    return _resample(lw, node, x, op, f"interpolate ({mode})")


@rule(F.interpolate, torch.nn.functional.upsample)
def _interpolate_function(lw, node, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                          recompute_scale_factor=None, antialias=False):
    return interpolate(lw, node, x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


@rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample_module(lw, node, m, x):
    return interpolate(lw, node, x, m.size, m.scale_factor, m.mode, m.align_corners,
                       getattr(m, "recompute_scale_factor", None))
