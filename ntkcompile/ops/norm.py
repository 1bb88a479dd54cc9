"""Normalization: LayerNorm and RMSNorm over the width axis, GroupNorm, BatchNorm.

* LayerNorm (tensor_programs.md Sec. 5) tracks first moments:
  ``y = (x - mu) / sqrt(Var + eps)`` with ``mu = E[Z^x]`` and ``Var = E[(Z^x)^2] - mu^2``
  per input, both moments (constants in the limit); on a sequence or a channels-last
  map (width last) per input *and position* (a Transformer's per-token LayerNorm),
  scalars with the vector's positions (``ir.Positions``); RMSNorm divides by
  ``sqrt(E[(Z^x)^2] + eps)``.  Their backward is ``dy / sqrt(Var + eps)``: the
  moments' own derivatives contribute ``E[dy] = 0`` (``passes.backward``).
* BatchNorm in eval mode with the initial running statistics is the affine map
  ``x / sqrt(1 + eps)``; training mode couples the examples of a batch (``ops/batchnorm.py``).
* Elementwise affine parameters (gain 1, shift 0 at PyTorch's init) are trained as
  stored (no NTK rescaling): an ``Affine`` parameter, read off at a ``GProbe`` (a
  zero vector added to ``y``).  The shift adds ``D(y, y')`` to the NTK, the gain
  ``E[(dy xhat)(dy' xhat')]``, which factorizes into ``D * C(xhat, xhat')`` only
  when ``dy`` does not depend on ``xhat`` (it does for ``tanh(LayerNorm(x))``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidModelError, UnsupportedOpError, WidthInferenceError
from ..ir import Param, Var, node
from ..ir.nodes import Atom
from ..kernels.planner import COVARIANCE, NTK_TERMS, register
from ..passes.lower import Fixed, Width, module_of, rule
from .batchnorm import batch_norm_train
from .blocks import block_rule


@dataclass(frozen=True, eq=False)
class Affine(Param):
    """Elementwise gain and/or shift of a normalization layer; ``xhat`` is the normalized
    input (a Var) the gain multiplies."""
    gain: bool
    shift: bool
    xhat: Any
    block: Any = None          # (root, lo, hi): a block of the width (ops/blocks.py)

    def describe(self) -> str:
        kinds = "+".join(k for k, on in (("gain", self.gain), ("shift", self.shift)) if on)
        return f"norm affine     {kinds} (PyTorch init, unscaled)"


@node
class GProbe(Atom):
    """A zero vector added where the backward pass must be read off (an ``Affine``)."""
    param: Any
    uid: int = -1
    gaussian = True
    read_off = True
    is_zero = True            # its value: expectations drop it (kernels.planner.Planner.canonical)

    @property
    def cov_group(self):
        return self            # a zero vector: independent of everything

    def children(self):
        return (self.param.xhat,)

    def positions(self, positions_of):
        return positions_of(self.param.xhat)       # read off at every position it normalizes

    def describe(self, show):
        return f"0 (probe for {self.param.name} gain/shift)    # G"

    def check(self, program):
        if not isinstance(self.param, Affine) or not isinstance(self.param.xhat, Var):
            return ["a probe reads off an Affine parameter with a normalized Var"]
        return []


@register(COVARIANCE, GProbe)
def _probe_cov(pl, a, b, pair):
    return None


@block_rule(GProbe)
def _probe_block(sl, a, lo, hi):
    """A block of the width of a normalization's output: the block of its gain and shift,
    which multiply the block of the normalized vector."""
    root, start, stop = sl.interval(a.param, lo, hi)
    param = sl.param(a.param, lo, hi, xhat=sl.var(root.xhat, start, stop))
    return sl.b.atom_var(sl.b.make(GProbe, param))


@register(NTK_TERMS, Affine)
def _affine_ntk(pl, param, probes):
    """Gain ``E[(dy xhat)(dy' xhat')]`` and shift ``D(y, y')``, summed over the positions
    the per-channel parameter is shared by."""
    terms = []
    positions = pl.p.positions(param.xhat)
    for probe in probes:
        if param.gain:
            terms.append(pl.spatial_sum((yield from pl.D(probe, probe, weight=param.xhat)), positions))
        if param.shift:
            terms.append(pl.spatial_sum((yield from pl.D(probe, probe)), positions))
    return terms


def _affine(lw, node, x, vec, name, gain_param, shift_param):
    """Trainable elementwise gain and shift at PyTorch's initialization (1 and 0)."""
    bb = lw.b
    for p, init in ((gain_param, 1.0), (shift_param, 0.0)):
        if p is not None and not torch.all(p.detach() == init):
            raise lw.error(node, f"the normalization parameters of '{name}' are not at PyTorch's "
                           "initialization (gain 1, shift 0); the kernel at initialization assumes them")
    if gain_param is not None or shift_param is not None:
        if len(vec.pieces) != 1:
            raise lw.unsupported(node, "a normalization with elementwise affine over a concatenation")
        aff = bb.param(Affine, name=name, gain=gain_param is not None, shift=shift_param is not None,
                       xhat=vec.pieces[0][1])
        probe = bb.single(bb.atom_var(bb.make(GProbe, aff)))
        vec = bb.lincomb([(bb.sconst(1.0), vec), (bb.sconst(1.0), probe)])
    return lw.width(node, vec, x.size, x.positions, layout=x.layout)


def _check_eps(lw, node, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise lw.error(node, f"the normalization's eps must be a finite number >= 0, got {eps!r}", InvalidModelError)


def _normalize(lw, node, x, name, eps, center, gain_param, shift_param, normalized_shape):
    bb = lw.b
    _check_eps(lw, node, eps)
    if not isinstance(x, Width):
        raise lw.unsupported(node, "normalization of a non-width tensor")
    ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
    if len(ns) != 1 or ns[0] != x.size or x.axes[-1] != "w":
        where = "" if x.axes[-1] == "w" else (
            " (the last axis of this tensor is a fixed axis, positions: LayerNorm normalizes the last "
            "axis, so move the channels last first, e.g. x.permute(0, 2, 3, 1), or use GroupNorm)")
        raise lw.error(node, f"normalization over shape {ns}: only the width axis (size {x.size}) is "
                       f"supported{where}", WidthInferenceError)
    sq = bb.smoment("sq", x.vec)
    if center:
        mu = bb.smoment("mean", x.vec)
        var = bb.sadd(sq, bb.sneg(bb.smul(mu, mu)))
        r = bb.srsqrt(var, eps)
        vec = bb.lincomb([(r, x.vec), (bb.sneg(bb.smul(r, mu)), bb.one_vec())])
    else:
        vec = bb.lincomb([(bb.srsqrt(sq, eps), x.vec)])
    return _affine(lw, node, x, vec, name, gain_param, shift_param)


@rule(nn.LayerNorm, batch_safe=True)
def _layernorm_module(lw, node, m, x):
    return _normalize(lw, node, x, node.target, m.eps, True, m.weight,
                      getattr(m, "bias", None), m.normalized_shape)


@rule(F.layer_norm, batch_safe=True)
def _layernorm_function(lw, node, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    params = []
    for i, key in ((2, "weight"), (3, "bias")):
        n = node.args[i] if len(node.args) > i else node.kwargs.get(key)
        params.append(lw.gm.get_parameter(n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else None)
        if isinstance(n, fx.Node) and n.op != "get_attr":
            raise lw.unsupported(node, "F.layer_norm with computed weight/bias")
    name = module_of(node.args[2].target) if params[0] is not None else node.name
    return _normalize(lw, node, x, name, eps, True, params[0], params[1], normalized_shape)


if hasattr(nn, "RMSNorm"):
    @rule(nn.RMSNorm, batch_safe=True)
    def _rmsnorm_module(lw, node, m, x):
        eps = m.eps if m.eps is not None else torch.finfo(torch.get_default_dtype()).eps
        return _normalize(lw, node, x, node.target, eps, False, m.weight, None, m.normalized_shape)

if hasattr(F, "rms_norm"):
    @rule(F.rms_norm, batch_safe=True)
    def _rmsnorm_function(lw, node, x, normalized_shape, weight=None, eps=None):
        if weight is not None:
            raise lw.unsupported(node, "F.rms_norm with a weight (use nn.RMSNorm)")
        eps = eps if eps is not None else torch.finfo(torch.get_default_dtype()).eps
        return _normalize(lw, node, x, node.name, eps, False, None, None, normalized_shape)


def group_norm(lw, node, x, name, groups, eps, weight, bias):
    """GroupNorm with a fixed number of groups: each group is a block of the channels, of
    width ``n / G``, normalized by its moments over its channels and every position.  A
    vector's coordinates are exchangeable, so in the limit every group has the same moments,
    ``mu = mean_s E[Z^{x_s}]`` and ``E[(Z^x)^2]`` averaged over positions: per input, without
    positions (``SOp posmean``)."""
    _check_eps(lw, node, eps)
    if not isinstance(x, Width) or (x.positions and x.axes[1] != "w"):
        raise lw.unsupported(node, "GroupNorm of a tensor that is not a width vector or a channels-first map")
    if len(x.vec.pieces) != 1:
        raise lw.unsupported(node, "GroupNorm of a concatenation along the channels (its groups may hold vectors of "
                             "different laws)")
    if groups >= x.size:
        raise lw.error(node, f"GroupNorm with {groups} groups of {x.size} channels: a group of one channel is "
                       "InstanceNorm, refused (its statistics are over the positions of one channel, a finite "
                       "number of coordinates, so they stay random: no width average)", UnsupportedOpError)
    bb = lw.b
    mu = bb.sposmean(bb.smoment("mean", x.vec))
    var = bb.sadd(bb.sposmean(bb.smoment("sq", x.vec)), bb.sneg(bb.smul(mu, mu)))
    r = bb.srsqrt(var, eps)
    vec = bb.lincomb([(r, x.vec), (bb.sneg(bb.smul(r, mu)), bb.one_vec())])
    return _affine(lw, node, x, vec, name, weight, bias)


@rule(nn.GroupNorm)
def _groupnorm_module(lw, node, m, x):
    return group_norm(lw, node, x, node.target, m.num_groups, m.eps, m.weight if m.affine else None,
                      m.bias if m.affine else None)


@rule(F.group_norm)
def _groupnorm_function(lw, node, x, num_groups, weight=None, bias=None, eps=1e-5):
    if weight is not None or bias is not None:
        raise lw.unsupported(node, "F.group_norm with a weight or bias (use nn.GroupNorm)")
    return group_norm(lw, node, x, node.name, num_groups, eps, None, None)


@rule(nn.InstanceNorm1d, nn.InstanceNorm2d, F.instance_norm)
def _instancenorm(lw, node, *args, **kwargs):
    raise lw.error(node, "InstanceNorm normalizes each channel by its own statistics over the positions: a "
                   "finite number of coordinates, so the statistics stay random at any width (no width average) "
                   "and the output is a nonlinearity of all the channel's positions, not compiled. GroupNorm with "
                   "a fixed number of groups has a deterministic limit.", UnsupportedOpError)


@rule(nn.BatchNorm1d, nn.BatchNorm2d, batch_safe=True)
def _batchnorm_module(lw, node, m, x):
    return batchnorm(lw, node, x, node.target, m.training, m.track_running_stats, m.running_mean,
                     m.running_var, m.eps, m.weight if m.affine else None, m.bias if m.affine else None)


def batchnorm(lw, node, x, name, training, has_stats, running_mean, running_var, eps, weight, bias):
    """BatchNorm: in eval mode with its initial running statistics ``x / sqrt(1 + eps)``; with
    batch statistics (training mode, or no running statistics) it couples the examples of a
    batch (``ops/batchnorm.py``).  (Shared by the module, ``F.batch_norm`` and ATen's.)"""
    _check_eps(lw, node, eps)
    if training or not has_stats or running_mean is None or running_var is None:
        return batch_norm_train(lw, node, x, name, eps, weight, bias)
    if not isinstance(x, Width):
        raise lw.unsupported(node, "BatchNorm of a fixed (non-width) tensor")
    if not (torch.all(running_mean == 0) and torch.all(running_var == 1)):
        raise lw.error(node, f"the running statistics of '{name}' are not at initialization "
                       "(mean 0, variance 1); the kernel at initialization assumes them")
    vec = lw.b.lincomb([(lw.b.sconst((1.0 + eps) ** -0.5), x.vec)])
    return _affine(lw, node, x, vec, name, weight, bias)


@rule(F.batch_norm, batch_safe=True)
def _batchnorm_function(lw, node, x, running_mean, running_var, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5):
    def tensor(v):
        return operator.attrgetter(v.node.target)(lw.gm) if isinstance(v, Fixed) and v.node.op == "get_attr" else None
    for v, what in ((weight, "weight"), (bias, "bias")):
        if v is not None and tensor(v) is None:
            raise lw.unsupported(node, f"F.batch_norm with a {what} that is not a module parameter")
    name = next((module_of(v.node.target) for v in (weight, bias, running_mean, running_var)
                 if isinstance(v, Fixed) and v.node.op == "get_attr"), node.name)
    mean, var = tensor(running_mean), tensor(running_var)
    return batchnorm(lw, node, x, name, bool(training), mean is not None, mean, var, eps, tensor(weight),
                     tensor(bias))
