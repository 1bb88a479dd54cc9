"""ATen ops, as ``torch.export`` records them: the torch-level rules under their ATen names.

An exported program (``export.py``) is a graph of ATen operators.  Each one
here gets one lowering rule in the same tables as the torch-level ops, and
that rule is the torch-level op's own, found in the table
(``FUNCTION_RULES[F.linear]`` for ``aten.linear``), wherever the argument
layouts agree; the few ops whose signatures differ (``aten.convolution``,
``aten.layer_norm``, ``aten.batch_norm``, ``aten.elu``) get a small adapter.
Which ops appear depends on the torch version: the training IR of torch >= 2.5
keeps ``aten.linear``/``aten.conv2d``/``aten.gelu``; the core ATen set of older
versions and of ``run_decompositions()`` has ``aten.convolution``, ``aten.view``,
``aten.native_layer_norm``, and ``addmm(b, x, t(W))``, which ``export.py``
turns back into ``aten.linear``.

Nonlinearities are found by name: ``aten.<name>`` is the registered nonlinearity
of ``torch.<name>``, ``torch.special.<name>`` or ``torch.nn.functional.<name>``,
with its arguments bound by the names in the ATen schema (so
``aten.leaky_relu(x, 0.2)`` is ``F.leaky_relu(x, negative_slope=0.2)``, and an
argument the torch function does not take is refused, never dropped).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes.lower import BATCH_SAFE, FUNCTION_RULES, Fixed, in_table, module_of, rule
from ..passes.readout import LINEAR_FUNCTIONS, POST_READOUT_SCALE
from . import activations  # noqa: F401  (registers the nonlinearities looked up below)
from .elementwise import apply, from_function
from .embedding import embedding_of
from .norm import batchnorm
from .shape import shape_identity

aten = torch.ops.aten


def _ops(*names):
    """The ATen overloads ``"packet.overload"`` this torch version has."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out


def _same_as(torch_key, *names, **flags):
    """Register the torch-level rule of ``torch_key`` for ATen ops with its argument layout."""
    flags.setdefault("batch_safe", in_table(torch_key, BATCH_SAFE))
    rule(*_ops(*names), **flags)(FUNCTION_RULES[torch_key])


# -- layers ------------------------------------------------------------------------

_same_as(F.linear, "linear", input_layer=True)
LINEAR_FUNCTIONS.add(aten.linear.default)           # a readout, too
_same_as(F.conv2d, "conv1d", "conv2d", "conv1d.padding", "conv2d.padding", input_layer=True)


@rule(*_ops("convolution"), input_layer=True, batch_safe=True)
def _convolution(lw, node, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise lw.unsupported(node, "a transposed convolution")
    return FUNCTION_RULES[F.conv2d](lw, node, x, weight, bias, stride, padding, dilation, groups)


# -- padding and resampling (ops/resample.py) ----------------------------------------------

_same_as(F.pad, "pad")


@rule(*_ops("constant_pad_nd"))
def _constant_pad_nd(lw, node, x, pad, value=0):
    return FUNCTION_RULES[F.pad](lw, node, x, pad, "constant", value)


@rule(*_ops("upsample_nearest1d.vec", "upsample_nearest2d.vec"))
def _upsample_nearest(lw, node, x, output_size, scale_factors):
    return FUNCTION_RULES[F.interpolate](lw, node, x, None if scale_factors else output_size, scale_factors,
                                         "nearest")


@rule(*_ops("upsample_linear1d.vec", "upsample_bilinear2d.vec", "upsample_bicubic2d.vec"))
def _upsample_linear(lw, node, x, output_size, align_corners, scale_factors):
    mode = {"upsample_linear1d": "linear", "upsample_bilinear2d": "bilinear"}.get(
        node.target._overloadpacket.__name__, "bicubic")
    return FUNCTION_RULES[F.interpolate](lw, node, x, None if scale_factors else output_size, scale_factors,
                                         mode, align_corners)


# -- arithmetic, pooling, reductions, concatenation -----------------------------------------

_same_as(torch.add, "add.Tensor", "add.Scalar")
_same_as(torch.sub, "sub.Tensor", "sub.Scalar")
_same_as(torch.mul, "mul.Tensor", "mul.Scalar")
_same_as(torch.div, "div.Tensor", "div.Scalar")
_same_as(torch.neg, "neg")
_same_as(torch.pow, "pow.Tensor_Scalar")
_same_as(torch.maximum, "maximum")
_same_as(torch.minimum, "minimum")
_same_as(torch.cat, "cat")
_same_as(torch.mean, "mean.dim")
_same_as(F.avg_pool2d, "avg_pool1d", "avg_pool2d")
_same_as(F.adaptive_avg_pool2d, "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d")
_same_as(F.dropout, "dropout")


_same_as(torch.matmul, "matmul", "bmm")
_same_as(torch.masked_fill, "masked_fill.Scalar", "masked_fill.Tensor")
_same_as(F.scaled_dot_product_attention, "scaled_dot_product_attention")


@rule(*_ops("softmax.int", "_softmax", "_safe_softmax", "log_softmax.int", "_log_softmax"))
def _softmax(lw, node, x, dim, *rest):
    """``aten.softmax(x, dim, dtype)`` / ``aten._softmax(x, dim, half_to_float)``: the torch rule."""
    return FUNCTION_RULES[torch.softmax](lw, node, x, dim)


_same_as(torch.sqrt, "sqrt")
_same_as(torch.rsqrt, "rsqrt")


# After the readout: the same scalings as their torch-level forms.
for _key, _names in ((torch.mul, ("mul.Tensor", "mul.Scalar")), (torch.div, ("div.Tensor", "div.Scalar")),
                     (torch.neg, ("neg",))):
    for _op in _ops(*_names):
        POST_READOUT_SCALE[_op] = POST_READOUT_SCALE[_key]
for _op in _ops("dropout"):
    POST_READOUT_SCALE[_op] = lambda node, m: 1.0 if (len(node.args) > 2 and not node.args[2]) else None


@rule(*_ops("rsub.Scalar", "rsub.Tensor"), batch_safe=True)
def _rsub(lw, node, a, b, alpha=1.0):
    """``b - alpha * a`` (``1 - z`` in core ATen)."""
    return FUNCTION_RULES[torch.sub](lw, node, b, a, alpha)


# -- shapes, slices, blocks, stacking ---------------------------------------------------

rule(*_ops("view", "reshape", "_unsafe_view", "flatten.using_ints", "squeeze", "squeeze.dim", "squeeze.dims",
           "unsqueeze", "clone", "alias", "detach", "contiguous", "_to_copy", "to.dtype", "to.dtype_layout",
           "to.device", "type_as", "lift_fresh_copy"), shape_only=True)(shape_identity)


@rule(*_ops("sym_size.int"), concrete=True)
def _sym_size(lw, node, x, dim):
    return int(lw.shape(node.args[0])[dim])


_same_as(torch.chunk, "chunk")
_same_as(torch.split, "split.Tensor", "split_with_sizes")
_same_as(torch.tensor_split, "tensor_split.sections", "tensor_split.indices")
_same_as(torch.unbind, "unbind.int")
_same_as(torch.narrow, "narrow")
_same_as(torch.stack, "stack")
_same_as(torch.permute, "permute")
_same_as(torch.transpose, "transpose.int")


def _index_at(lw, node, x, dim, index):
    ndim = len(lw.shape(node.args[0]))
    if isinstance(x, tuple) and dim % ndim == 0:
        return x[index]               # h_n[-1]: one state of a recurrent module's States
    return FUNCTION_RULES[operator.getitem](lw, node, x, tuple(index if d == dim % ndim else slice(None)
                                                                 for d in range(ndim)))


@rule(*_ops("slice.Tensor"))
def _slice(lw, node, x, dim=0, start=None, end=None, step=1):
    if start in (None, 0) and (end is None or end >= 2 ** 62) and step == 1:
        return x                      # x[:, t] records the whole first axis as a slice
    return _index_at(lw, node, x, dim, slice(start, end, step))


@rule(*_ops("select.int"))
def _select(lw, node, x, dim, index):
    return _index_at(lw, node, x, dim, index)


@rule(*_ops("embedding"), input_layer=True, integer_input=True)
def _embedding(lw, node, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return embedding_of(lw, node, indices, node.args[0], None if padding_idx < 0 else padding_idx, None,
                        scale_grad_by_freq)


# -- normalization -----------------------------------------------------------------

@rule(*_ops("layer_norm"), batch_safe=True)
def _layer_norm(lw, node, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return FUNCTION_RULES[F.layer_norm](lw, node, x, normalized_shape, weight, bias, eps)


@rule(*_ops("native_layer_norm"), batch_safe=True)
def _native_layer_norm(lw, node, x, normalized_shape, weight, bias, eps):
    """Returns ``(y, mean, rstd)``; only ``y`` (``getitem`` 0) has a meaning here."""
    return (_layer_norm(lw, node, x, normalized_shape, weight, bias, eps), None, None)


if hasattr(F, "rms_norm"):
    _same_as(F.rms_norm, "rms_norm")


def _tensor(lw, value):
    """The tensor behind a ``get_attr`` value (a parameter or buffer), or None."""
    if not isinstance(value, Fixed) or value.node.op != "get_attr":
        return None
    return operator.attrgetter(value.node.target)(lw.gm)


def _attr_name(node_arg):
    return module_of(node_arg.target) if isinstance(node_arg, fx.Node) and node_arg.op == "get_attr" else None


@rule(*_ops("batch_norm"), batch_safe=True)
def _batch_norm(lw, node, x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn=True):
    return _bn(lw, node, x, weight, bias, running_mean, running_var, training, eps)


@rule(*_ops("_native_batch_norm_legit_no_training"), batch_safe=True)
def _batch_norm_eval(lw, node, x, weight, bias, running_mean, running_var, momentum, eps):
    return (_bn(lw, node, x, weight, bias, running_mean, running_var, False, eps), None, None)


def _bn(lw, node, x, weight, bias, running_mean, running_var, training, eps):
    name = next((n for n in map(_attr_name, node.args[1:5]) if n), node.name)
    mean, var = _tensor(lw, running_mean), _tensor(lw, running_var)
    return batchnorm(lw, node, x, name, bool(training), mean is not None, mean, var, float(eps),
                     _tensor(lw, weight), _tensor(lw, bias))


# -- nonlinearities, by name -----------------------------------------------------------

def _torch_functions(name):
    """``torch.<name>``, ``torch.special.<name>``, ``F.<name>`` (the functions a nonlinearity is found under)."""
    name = _RENAMED.get(name, name)
    special = name[len("special_"):] if name.startswith("special_") else name
    return [f for f in (getattr(torch, name, None), getattr(torch.special, special, None), getattr(F, name, None))
            if callable(f)]


def _bound(op, args, kwargs):
    """The arguments after the input, by their ATen schema names; defaults left out."""
    schema = op._schema.arguments[1:]
    out = {}
    for a, v in list(zip(schema, args[1:])) + [(next(s for s in schema if s.name == k), v) for k, v in kwargs.items()]:
        if not (a.has_default_value() and a.default_value == v):
            out[a.name] = v
    return out


def _nonlinearity(fn):
    def lower(lw, node, x, *args, **kwargs):
        named = _bound(node.target, (x, *args), kwargs)
        if node.target in _ops("elu"):
            fn_, named = _elu(named)
        else:
            fn_ = fn
        try:
            entry = from_function(fn_, (), named)
        except ValueError as e:
            raise lw.error(node, f"unsupported arguments: {e}") from e
        return apply(lw, node, entry, x)
    return lower


_SELU = (1.6732632423543772, 1.0507009873554805)


def _elu(named):
    """``aten.elu(x, alpha, scale, input_scale)``: ELU, or SELU as core ATen writes it."""
    alpha, scale = float(named.pop("alpha", 1.0)), float(named.pop("scale", 1.0))
    if float(named.get("input_scale", 1.0)) == 1.0:
        named.pop("input_scale", None)
        if (alpha, scale) == _SELU:
            return torch.selu, named
        if scale == 1.0:
            return F.elu, dict(named, alpha=alpha) if alpha != 1.0 else named
    return F.elu, dict(named, alpha=alpha, scale=scale)     # refused by F.elu's binding: says which


_ACTIVATIONS = ("relu", "relu6", "gelu", "tanh", "sigmoid", "erf", "special_erf", "special_ndtr", "silu", "mish",
                "elu", "selu", "celu", "leaky_relu", "softplus", "hardtanh", "hardswish", "hardsigmoid", "abs",
                "sign", "sgn", "sin", "cos", "exp", "atan", "log_sigmoid")
_RENAMED = {"log_sigmoid": "logsigmoid"}          # ATen name -> torch name where they differ


def _register_nonlinearities():
    for name in _ACTIVATIONS:
        op = getattr(getattr(aten, name, None), "default", None)
        fn = next((f for f in _torch_functions(name) if _known(f)), None)
        if op is not None and fn is not None and op not in FUNCTION_RULES:
            rule(op, batch_safe=True)(_nonlinearity(fn))


def _known(fn):
    try:
        return from_function(fn) is not None
    except ValueError:            # known, but needs arguments (e.g. heaviside's values)
        return True


_register_nonlinearities()
