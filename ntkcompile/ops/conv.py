"""Convolutions: ``nn.Conv1d/2d``, ``F.conv1d/2d`` with fixed positions (tensor_programs.md Sec. 5).

A convolution is one matrix per kernel tap over fixed positions; in the limit
``C^{h_s, h'_t} = (W_std^2 / |K|) sum_k C^{x_{s+k}, x'_{t+k}}`` (zero padding
drops out-of-range terms), with fan-in ``in_channels * prod(kernel_size)``, and
the backward uses the adjoint stencil.  The atoms (``GConvInput``, ``GConv``)
carry the output positions; the stencils themselves are runtime helpers in
``kernels/spatial.py``.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ..errors import WidthInferenceError
from ..ir import ConvGeometry, GInput, GMatMul, node
from ..kernels import spatial
from ..kernels.planner import ADJOINT, COVARIANCE, NOMINAL, SAME_INPUT, SIDES, register
from ..passes.lower import Fixed, Width, module_of, rule
from ..plan import Contract, Input, SetDiagonal, ToPairs


def input_sides(pl, a, b, pair):
    """The fixed inputs of two input-layer atoms on the sides of ``pair``."""
    left, right = SIDES[pair]
    return pl.plan.make(Input, abs(left), a.fixed), pl.plan.make(Input, abs(right), b.fixed)


def _pointwise(g) -> bool:
    """A 1x1 convolution without stride or padding: one matrix at every position (a Linear
    over positions, ``ops/linear.py``)."""
    return g is not None and g.size == 1 and g.in_shape == g.out_shape


@node
class GConvInput(GInput):
    """``U * xi``: an input-layer convolution of fixed input ``fixed``."""

    def positions(self, positions_of):
        return self.param.geometry.out_shape

    def describe(self, show):
        if _pointwise(self.param.geometry):
            return f"U[{self.param.name}] x{self.fixed} at every position    # G (input layer)"
        return f"U[{self.param.name}] conv* x{self.fixed}    # G (input layer)"

    def check(self, program):
        g = self.param.geometry
        dims = program.fixed_dims[self.fixed] if 0 <= self.fixed < len(program.fixed_dims) else None
        if g is None or dims is None or tuple(dims[1:]) != tuple(g.in_shape):
            return [f"reads a fixed input of shape {dims} with a geometry for positions "
                    f"{None if g is None else g.in_shape}"]
        return []


@node
class GConv(GMatMul):
    """``W * x``: a hidden convolution of the feature map ``arg``."""

    @property
    def window_geometry(self):
        """The windows its outputs read (``kernels.bands``: the rows a band needs)."""
        return self.param.geometry

    def positions(self, positions_of):
        return self.param.geometry.out_shape

    def describe(self, show):
        if _pointwise(self.param.geometry):
            return f"W[{self.param.name}] ({show(self.arg)}) at every position    # G"
        return f"W[{self.param.name}] conv* ({show(self.arg)})    # G"

    def check(self, program):
        g = self.param.geometry
        pos = program.positions(self.arg)
        if g is None or tuple(pos) != tuple(g.in_shape):
            return [f"convolves a vector with positions {pos} with a geometry for "
                    f"{None if g is None else g.in_shape}"]
        return []


def _check_groups(lw, node, x, groups, channels):
    """A grouped convolution with a fixed number of groups: each group is an independent
    matrix on its own ``1/groups`` of the channels of an exchangeable width vector, so in
    the limit it has the law (and the NTK) of one convolution with fan-in ``C/groups |K|``
    (its coordinates' averages over a group are the averages over the width).  Refused
    where that does not hold."""
    if isinstance(x, Fixed):
        raise lw.error(node, f"a grouped convolution (groups={groups}) of the input: its groups read "
                       "different input channels, so their outputs differ in law; not supported")
    if groups == channels:
        raise lw.error(node, f"a depthwise convolution (groups = channels = {channels}): each output "
                       "channel is a fixed-size filter of one input channel, not a sum over the width, so "
                       "its output is not Gaussian in the limit and has no Tensor Program G-var. A grouped "
                       "convolution with a fixed number of groups (groups=2, 4, ...) is supported")
    if isinstance(x, Width) and len(x.vec.pieces) != 1:
        raise lw.error(node, f"a grouped convolution (groups={groups}) of a concatenation: its groups "
                       "would read different vectors; not supported")


def _conv(lw, node, x, name, weight_shape, has_bias, stride, padding, dilation, groups, padding_mode="zeros"):
    if groups != 1:
        _check_groups(lw, node, x, groups, weight_shape[1] * groups)
    if padding_mode != "zeros":
        raise lw.unsupported(node, f"a convolution with padding_mode={padding_mode!r} (only zeros)")
    out_c, in_c, *kernel = weight_shape
    batched = lw.batch is not None       # a batch-coupled model: the examples are position axis 0
    if isinstance(x, Fixed):
        shape = tuple(lw.shape(x.node))
        in_shape = shape[:1] + shape[2:] if batched else shape[2:]
    elif isinstance(x, Width) and x.positions:
        in_shape = x.positions
        if batched and x.axes != (0, "w") + tuple(range(1, len(in_shape))):
            raise lw.batch_coupled(node, f"a convolution of a tensor laid out as {x.axes}")
    else:
        raise lw.error(node, "a convolution applied to a tensor without positions", WidthInferenceError)
    try:
        geom = ConvGeometry.make(kernel, stride, padding, dilation, in_shape[1:] if batched else in_shape)
        if batched:       # the same windows in every example: kernel 1 along the examples
            geom = ConvGeometry.make((1,) + geom.kernel, (1,) + geom.stride, (0,) + geom.padding,
                                     (1,) + geom.dilation, in_shape)
    except ValueError as e:
        raise lw.unsupported(node, f"this convolution ({e})") from e
    torch_out = tuple(lw.shape(node))
    if geom.out_shape != (torch_out[:1] + torch_out[2:] if batched else torch_out[2:]):
        raise lw.unsupported(node, f"a convolution whose output shape {lw.shape(node)} differs from the "
                             f"computed {geom.out_shape}")
    one = lw.b.sconst(1.0)
    fan_in = in_c * geom.size
    if isinstance(x, Fixed):
        mat = lw.matrix(node, name, "input", fan_in, geom)
        perm = (0, 2, 1, *range(3, 2 + len(in_shape))) if batched else None     # (1, C, B, *P)
        atom = lw.b.make(GConvInput, mat, lw.fixed_index(x.node, 2 + len(in_shape), perm=perm))
    else:
        mat = lw.matrix(node, name, "hidden", fan_in, geom)
        atom = lw.b.make(GConv, mat, x.vec)
    terms = [(one, atom)]
    if has_bias:
        b = lw.bias_atom(name + ".bias", name, geom.out_shape, node)
        if b is not None:
            terms.append((one, b))
    layout = (0, "w") + tuple(range(1, len(geom.out_shape))) if batched else None
    return lw.width(node, lw.b.single(lw.b.var(terms)), out_c, geom.out_shape, layout=layout)


@rule(nn.Conv1d, nn.Conv2d, input_layer=True, batch_safe=True)
def _conv_module(lw, node, m, x):
    return _conv(lw, node, x, node.target, tuple(m.weight.shape), m.bias is not None, m.stride,
                 m.padding, m.dilation, m.groups, m.padding_mode)


@rule(F.conv1d, F.conv2d, input_layer=True, batch_safe=True)
def _conv_function(lw, node, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if wnode.op != "get_attr":
        raise lw.unsupported(node, "a convolution whose weight is not a module parameter")
    return _conv(lw, node, x, module_of(wnode.target), tuple(lw.shape(wnode)), bias is not None,
                 stride, padding, dilation, groups)


@register(COVARIANCE, GConvInput)
def _conv_input_cov(pl, a, b, pair):
    """``W_std^2 / fan_in`` times the patch covariances under every tap: (N, C*|K|, prod(P))."""
    fa, fb = input_sides(pl, a, b, pair)
    geom = a.param.geometry
    g = pl.static(geom, "geom")
    P = geom.out_shape
    W2n = a.param.W_std ** 2 / a.param.fan_in
    shapes = ((NOMINAL, a.param.fan_in, math.prod(P)),) * 2
    pa = pl.call(spatial.patches, fa, g)

    def positions(equation, x, y, groups, *side):
        return pl.call(spatial.positions, pl.plan.make(Contract, equation, (x, y), shapes), P, groups, *side)

    if pair in ("f1", "f2"):      # both groups at the rows of this side's band, when banded (kernels.bands)
        side = int(pair[1])
        return pl.plan.mul(W2n, positions("acs,act->ast", pl.call(spatial.group_patches, pa, P, 0, side),
                                          pl.call(spatial.group_patches, pa, P, 1, side), 2, side))
    if pair in SAME_INPUT:
        return pl.plan.mul(W2n, positions("acs,acs->as", pa, pa, 1))
    pb = pl.call(spatial.patches, fb, g)
    if pl.diag:
        cross = positions("acs,bcs->abs", pa, pb, 1)
    else:       # each side at a band's rows of positions, when banded (kernels.bands)
        cross = positions("acs,bct->abst", pl.call(spatial.group_patches, pa, P, 0),
                          pl.call(spatial.group_patches, pb, P, 1), 2)
    cross = pl.plan.make(ToPairs, cross)
    if a is b:
        cross = pl.plan.make(SetDiagonal, cross, positions("acs,acs->as", pa, pa, 1), pl.diag)
    return pl.plan.mul(W2n, cross)


@register(COVARIANCE, GConv)
def _conv_cov(pl, a, b, pair):
    """The stencil: ``(W_std^2/|K|) sum_k C(s + k, t + k)`` (same taps on both position groups)."""
    inner = yield from pl.cov(a.arg, b.arg, pair)
    g = a.param.geometry
    if inner is None or isinstance(inner, float) and _pointwise(g):
        return pl.plan.mul(a.param.W_std ** 2, inner)     # a matrix at every position (a Linear over positions)
    if isinstance(inner, float):
        raise NotImplementedError("a convolution of a vector constant over positions")
    both = (pair == "x" and not pl.diag) or pair in ("f1", "f2")
    how = spatial.stencil_pair if both else spatial.stencil_same
    side = (int(pair[1]),) if pair in ("f1", "f2") else ()     # whose band, when banded
    return pl.plan.mul(a.param.W_std ** 2, pl.call(how, inner, pl.static(a.param.geometry, "geom"), *side))


@register(ADJOINT, GConv)
def _conv_adjoint(pl, u, w):
    """``W_std^2`` times the adjoint stencil of ``D(y, y')``."""
    if u.param is not w.param:
        return None
    d = yield from pl.D(u, w)
    if d is None:
        return None
    how = spatial.stencil_same_adjoint if pl.diag else spatial.stencil_pair_adjoint
    return pl.plan.mul(u.param.W_std ** 2,
                       pl.call(how, pl.tensor(d), pl.static(u.param.geometry, "geom"), pl.dbatch))
