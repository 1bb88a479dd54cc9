"""Lowering: torch.fx graph -> Tensor Program IR, one small rule per op.

An interpreter walks the traced graph.  Each node's value is one of

* ``Fixed``   a tensor computed from the input alone (batch + fixed axes); it is
  evaluated concretely by ``prep`` at kernel time, so any torch op is allowed
  there as long as it has no trainable parameter;
* ``Width``   a width vector in canonical form (``ir.Vec``);
* ``Moment``  a per-input scalar such as ``x.mean(-1, keepdim=True)``;
* ``Output``  the readout and what follows it;
* a plain Python value (ints, floats, shapes).

Rules live in three tables (``MODULE_RULES`` by module type, ``FUNCTION_RULES``
by callable, ``METHOD_RULES`` by method name), each filled right beside its
rule with ``@rule``; registering a key twice is an error.  Elementwise
nonlinearities come from ``kernels.elementwise`` (``register_elementwise``).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ir
from ..errors import GIACheckError, UnsupportedOpError, WidthInferenceError
from ..kernels import elementwise as ew
from ..kernels.spatial import ConvGeometry
from ..trace import describe, source_line
from .width import find_readout


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Fixed:
    node: fx.Node


@dataclass(frozen=True)
class Width:
    vec: Any           # ir.Vec
    size: int          # finite width in the traced model (ratios matter for concatenation)
    spatial: tuple = ()            # fixed positions (conv feature maps: (H, W)); width axis is 1
    pool: Optional[str] = None     # "gap" / "flatten": positions already pooled, readout only
    pooled: tuple = ()             # the positions that were pooled


@dataclass(frozen=True)
class Moment:
    s: Any             # ir scalar node


@dataclass(frozen=True)
class Output:
    pass


# --------------------------------------------------------------------------- #
# Rule tables
# --------------------------------------------------------------------------- #

MODULE_RULES: dict = {}
FUNCTION_RULES: dict = {}
METHOD_RULES: dict = {}


def rule(table, *keys):
    def deco(fn):
        for k in keys:
            if k in table:
                raise ValueError(f"a lowering rule for {k!r} is already registered")
            table[k] = fn
        return fn
    return deco


def is_rule_module(m: nn.Module) -> bool:
    """Leaf modules for tracing: those with a rule or an elementwise entry."""
    if type(m) in MODULE_RULES:
        return True
    try:
        return ew.from_module(m) is not None
    except ValueError:
        return True     # known activation with bad arguments: let the rule report it


# --------------------------------------------------------------------------- #
# Lowering context
# --------------------------------------------------------------------------- #

class Lowering:
    """Walks the fx graph in order, producing an ``ir.Program``."""

    def __init__(self, gm: fx.GraphModule, W_std, b_std, std, example_input):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.W_std, self.b_std = float(W_std), float(b_std)
        self.std = dict(std or {})
        self.b = ir.Builder()
        self.matrices: dict = {}
        self.biases: dict = {}
        self.fixed_nodes: list = []
        self.fixed_dims: list = []
        self.readout = None
        self.readout_node, self.post_nodes, self.out_scale = find_readout(gm)
        self.example = example_input
        self.env: dict = {}
        self.names: dict = {}
        self._shapes = _propagate_shapes(gm, example_input)

    # ------------------------------------------------------------------ utils
    def std_for(self, qualname: str):
        if qualname in self.std:
            w, bb = self.std[qualname]
            return float(w), float(bb)
        return self.W_std, self.b_std

    def shape(self, node):
        return self._shapes[node.name]

    def error(self, node, msg, cls=UnsupportedOpError):
        return cls(f"{msg}\n  at {describe(node)}\n  source: {source_line(node)}")

    def unsupported(self, node, what=None):
        what = what or f"op {describe(node)}"
        return self.error(
            node,
            f"ntkcompile has no Tensor Program rule for {what}.\n"
            "  To add one: a pointwise function can be registered with "
            "ntkcompile.register_elementwise(fn, name) (closed forms optional); any other "
            "op needs a lowering rule in ntkcompile/passes/lower.py "
            "(@rule(MODULE_RULES, ModuleType) / FUNCTION_RULES / METHOD_RULES).",
        )

    def width(self, node, vec, size, spatial=(), pool=None, pooled=()):
        self.names.setdefault(vec, node.name)
        for _, var in vec.pieces:
            self.names.setdefault(var, node.name)
        return Width(vec, size, tuple(spatial), pool, tuple(pooled))

    def fixed_index(self, node, ndim=2):
        shp = self.shape(node)
        if len(shp) != ndim:
            raise self.error(
                node, f"an input layer expects a fixed input with {ndim} axes, got shape {tuple(shp)}")
        if node not in self.fixed_nodes:
            self.fixed_nodes.append(node)
            self.fixed_dims.append(tuple(int(v) for v in shp[1:]))
        return self.fixed_nodes.index(node)

    # ------------------------------------------------------------------- walk
    def run(self) -> ir.Program:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"the model's forward takes {len(placeholders)} tensor arguments; ntkcompile "
                "supports exactly one input tensor")
        for node in self.gm.graph.nodes:
            if node.op == "output":
                break
            self.env[node] = self.lower_node(node)
        if self.readout is None:
            raise GIACheckError("the model has no readout Linear (see the Simple GIA Check)")
        prep = _make_prep(self.gm, self.fixed_nodes)
        return ir.Program(
            builder=self.b, readout=self.readout,
            fixed_names=[n.name for n in self.fixed_nodes], fixed_dims=self.fixed_dims,
            prep=prep, input_shape=tuple(self.example.shape[1:]), names=self.names,
        )

    def lower_node(self, node):
        try:
            return self._lower_node(node)
        except UnsupportedOpError:
            raise
        except NotImplementedError as e:
            raise self.unsupported(node, str(e)) from e

    def _lower_node(self, node):
        if node.op == "placeholder":
            return Fixed(node)
        if node.op == "get_attr":
            return Fixed(node)      # parameters/buffers: checked where they are used
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        flat = [v for v in _flatten((args, kwargs))]
        if node in self.post_nodes:
            return Output()
        if node is self.readout_node:
            return self.lower_readout(node, args)
        if any(isinstance(v, Output) for v in flat):
            raise self.error(node, "only shapes and scaling by a number may follow the readout",
                             GIACheckError)
        tensors = [v for v in flat if isinstance(v, (Fixed, Width, Moment))]
        if any(isinstance(v, Width) and v.pool for v in flat) and not _is_shape_op(node, self.modules):
            raise self.unsupported(
                node, f"{describe(node)} after global average pooling or flattening of positions "
                "(only a readout Linear may follow them so far)")
        if node.op == "call_module":
            m = self.modules[node.target]
            if tensors and all(isinstance(v, Fixed) for v in tensors) and not _is_linear_module(m):
                if any(p.requires_grad for p in m.parameters()):
                    raise self.unsupported(
                        node, f"module {type(m).__name__} with trainable parameters applied to a "
                        "fixed (non-width) tensor")
                return Fixed(node)
            r = MODULE_RULES.get(type(m))
            if r is not None:
                return r(self, node, m, *args, **kwargs)
            fn = self.elementwise(node, lambda: ew.from_module(m))
            if fn is not None:
                return elementwise_rule(self, node, fn, args[0])
            raise self.unsupported(node, f"module {type(m).__module__}.{type(m).__name__}")
        if node.op in ("call_function", "call_method"):
            if not any(isinstance(v, (Width, Moment)) for v in flat) and node.target not in _INPUT_LAYER_FUNCTIONS:
                if any(isinstance(v, Fixed) and v.node.op == "get_attr" and
                       _is_trainable_attr(self.gm, v.node.target) for v in flat):
                    raise self.unsupported(node, f"trainable parameter used directly in {describe(node)}")
                return Fixed(node)
            table = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
            r = table.get(node.target)
            if r is not None:
                return r(self, node, *args, **kwargs)
            if node.op == "call_function":
                fn = self.elementwise(node, lambda: ew.from_function(node.target, tuple(args[1:]), kwargs))
            else:
                fn = self.elementwise(node, lambda: ew.from_method(node.target, tuple(args[1:]), kwargs))
            if fn is not None:
                return elementwise_rule(self, node, fn, args[0])
            raise self.unsupported(node)
        raise self.unsupported(node)

    def elementwise(self, node, resolve):
        try:
            return resolve()
        except ValueError as e:
            raise self.error(node, f"unsupported arguments: {e}") from e

    # ---------------------------------------------------------------- params
    def matrix(self, node, name, kind, fan_in):
        W_std, _ = self.std_for(name)
        m = self.matrices.get(name)
        if m is None:
            m = self.b.param(ir.Matrix(name=name, kind=kind, W_std=W_std, fan_in=fan_in))
            self.matrices[name] = m
        elif m.kind != kind:
            raise self.error(node, f"the Linear '{name}' is applied both to a fixed input and to "
                             "a width vector; ntkcompile cannot assign it one role")
        return m

    def bias_atom(self, name, module_name):
        _, b_std = self.std_for(module_name)
        if b_std == 0.0:
            return None      # contributes 0 to NNGP and NTK
        p = self.biases.get(name)
        if p is None:
            p = self.b.param(ir.Bias(name=name, b_std=b_std))
            self.biases[name] = p
        return self.b.make(ir.GBias, p)

    def linear(self, node, x, name, in_features, out_features, has_bias):
        one = self.b.sconst(1.0)
        if isinstance(x, Width) and x.spatial:
            raise self.error(node, "nn.Linear applied to a feature map with positions acts on the last "
                             "spatial axis, not on channels; flatten or pool the positions first",
                             WidthInferenceError)
        if isinstance(x, Fixed):
            mat = self.matrix(node, name, "input", in_features)
            terms = [(one, self.b.make(ir.GInput, mat, self.fixed_index(x.node)))]
        elif isinstance(x, Width):
            mat = self.matrix(node, name, "hidden", in_features)
            terms = [(one, self.b.make(ir.GMatMul, mat, x.vec))]
        else:
            raise self.error(node, "Linear applied to a per-input scalar", WidthInferenceError)
        if has_bias:
            atom = self.bias_atom(name + ".bias", name)
            if atom is not None:
                terms.append((one, atom))
        return self.width(node, self.b.single(self.b.var(terms)), out_features)

    def lower_readout(self, node, args):
        if node.op == "call_module":
            m = self.modules[node.target]
            name, has_bias, out = node.target, m.bias is not None, m.out_features
        else:
            wnode = node.args[1]
            name = _module_of(wnode.target)
            has_bias = len(node.args) > 2 and node.args[2] is not None or node.kwargs.get("bias") is not None
            out = int(self.shape(wnode)[0])
        x = args[0]
        if not isinstance(x, Width):
            raise self.error(
                node, "the readout Linear is applied to a fixed (non-width) tensor: the model has "
                "no hidden layer, so it has no infinite-width limit to compile", WidthInferenceError)
        if name in self.matrices:
            raise self.error(node, f"the readout weight '{name}' is also used inside the network "
                             "(Simple GIA Check: the readout must be a fresh matrix used nowhere else)",
                             GIACheckError)
        W_std, b_std = self.std_for(name)
        if x.spatial:
            raise self.error(node, "the readout Linear is applied to a feature map with positions; "
                             "flatten or pool them first", WidthInferenceError)
        self.readout = ir.Readout(name=name, W_std=W_std, b_std=b_std, has_bias=has_bias and b_std != 0,
                                  out_features=out, vec=x.vec, scale=self.out_scale,
                                  pool=x.pool, spatial=x.pooled)
        return Output()


_INPUT_LAYER_FUNCTIONS = (F.linear, F.conv1d, F.conv2d)


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _module_of(qualname: str) -> str:
    return qualname.rsplit(".", 1)[0] if "." in qualname else qualname


def _is_linear_module(m):
    """Modules whose parameters make a fixed input into a width vector (input layers)."""
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))


def _is_trainable_attr(gm, target):
    try:
        obj = gm.get_parameter(target)
    except AttributeError:
        return False
    return obj.requires_grad


def _propagate_shapes(gm, example):
    """Run the module once on ``example`` and record every node's output shape."""
    shapes = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    # on a copy: a training-mode BatchNorm would update the user's running statistics
    with torch.no_grad():
        _Rec(copy.deepcopy(gm)).run(example)
    return shapes


def _make_prep(gm: fx.GraphModule, fixed_nodes):
    """A GraphModule computing the fixed inputs of the input layers from the input."""
    graph = fx.Graph()
    env = {}
    needed = set()

    def mark(n):
        if n in needed:
            return
        needed.add(n)
        for a in n.all_input_nodes:
            mark(a)

    for n in fixed_nodes:
        mark(n)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
        elif n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in fixed_nodes))
    return fx.GraphModule(gm, graph)


# --------------------------------------------------------------------------- #
# Rules
# --------------------------------------------------------------------------- #

def elementwise_rule(lw: Lowering, node, fn, x):
    if isinstance(x, Fixed):
        return Fixed(node)
    if not isinstance(x, Width):
        raise lw.unsupported(node, f"elementwise {fn.name} of a per-input scalar")
    return lw.width(node, lw.b.apply(lambda es: lw.b.ecall(fn, es[0]), [x.vec]), x.size, x.spatial)


@rule(MODULE_RULES, nn.Linear)
def _linear_module(lw, node, m, x):
    return lw.linear(node, x, node.target, m.in_features, m.out_features, m.bias is not None)


@rule(FUNCTION_RULES, F.linear)
def _linear_function(lw, node, x, weight, bias=None):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if wnode.op != "get_attr":
        raise lw.unsupported(node, "F.linear with a weight that is not a module parameter")
    name = _module_of(wnode.target)
    out_f, in_f = lw.shape(wnode)
    return lw.linear(node, x, name, in_f, out_f, bias is not None)


@rule(MODULE_RULES, nn.Identity)
def _identity(lw, node, m, x, *a, **k):
    return x


def _dropout(lw, node, p, training, x):
    if training and p > 0:
        raise lw.error(node, "Dropout is active (training mode): the kernel of a network with "
                       "random dropout masks is not computed. Call model.eval() before compiling.")
    return x


@rule(MODULE_RULES, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
def _dropout_module(lw, node, m, x):
    return _dropout(lw, node, m.p, m.training, x)


@rule(FUNCTION_RULES, F.dropout)
def _dropout_fn(lw, node, x, p=0.5, training=True, inplace=False):
    return _dropout(lw, node, p, training, x)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_scalar(lw, v):
    if _is_number(v):
        return lw.b.sconst(v)
    if isinstance(v, Moment):
        return v.s
    return None


def _one_vec(lw):
    return lw.b.single(lw.b.atom_var(lw.b.ONE))


def _add(lw, node, a, b, sign=1.0, alpha=1.0):
    """``a + sign*alpha*b``: width vectors, numbers and moments."""
    bb = lw.b
    if isinstance(a, Width) and isinstance(b, Width):
        if a.size != b.size or a.spatial != b.spatial:
            raise lw.error(node, f"adding width vectors of sizes {a.size}{a.spatial} and {b.size}{b.spatial}")
        vec = bb.lincomb([(bb.sconst(1.0), a.vec), (bb.sconst(sign * alpha), b.vec)])
        return lw.width(node, vec, a.size, a.spatial)
    if isinstance(a, Width) or isinstance(b, Width):
        w, other, cw, co = (a, b, 1.0, sign * alpha) if isinstance(a, Width) else (b, a, sign * alpha, 1.0)
        s = _as_scalar(lw, other)
        if s is None:
            raise lw.error(node, "adding a fixed-dimensional tensor to a width vector: the sizes may "
                           "match in this finite model, but a fixed tensor has no infinite-width "
                           "limit as a width vector", WidthInferenceError)
        vec = bb.lincomb([(bb.sconst(cw), w.vec), (bb.smul(bb.sconst(co), s), _one_vec(lw))])
        return lw.width(node, vec, w.size, w.spatial)
    sa, sb = _as_scalar(lw, a), _as_scalar(lw, b)
    if sa is not None and sb is not None:
        return Moment(bb.sadd(sa, bb.smul(bb.sconst(sign * alpha), sb)))
    raise lw.unsupported(node, f"{describe(node)} mixing fixed tensors and width-derived values")


@rule(FUNCTION_RULES, operator.add, torch.add)
@rule(METHOD_RULES, "add")
def _add_rule(lw, node, a, b, alpha=1.0):
    return _add(lw, node, a, b, 1.0, alpha)


@rule(FUNCTION_RULES, operator.sub, torch.sub)
@rule(METHOD_RULES, "sub")
def _sub_rule(lw, node, a, b, alpha=1.0):
    return _add(lw, node, a, b, -1.0, alpha)


@rule(FUNCTION_RULES, operator.neg, torch.neg)
@rule(METHOD_RULES, "neg")
def _neg_rule(lw, node, a):
    return _mul(lw, node, a, -1.0)


def _mul(lw, node, a, b):
    bb = lw.b
    if isinstance(a, Width) and isinstance(b, Width):
        if a.spatial != b.spatial:
            raise lw.error(node, "multiplying feature maps with different positions", WidthInferenceError)
        vec = bb.apply(lambda es: bb.emul(es), [a.vec, b.vec])
        return lw.width(node, vec, a.size, a.spatial)
    if isinstance(a, Width) or isinstance(b, Width):
        w, other = (a, b) if isinstance(a, Width) else (b, a)
        s = _as_scalar(lw, other)
        if s is None:
            raise lw.error(node, "multiplying a width vector by a fixed-dimensional tensor",
                           WidthInferenceError)
        return lw.width(node, bb.lincomb([(s, w.vec)]), w.size, w.spatial)
    sa, sb = _as_scalar(lw, a), _as_scalar(lw, b)
    if sa is not None and sb is not None:
        return Moment(bb.smul(sa, sb))
    raise lw.unsupported(node)


@rule(FUNCTION_RULES, operator.mul, torch.mul)
@rule(METHOD_RULES, "mul")
def _mul_rule(lw, node, a, b):
    return _mul(lw, node, a, b)


_RECIPROCAL = ew.from_callable(torch.reciprocal, "reciprocal")


def _div(lw, node, a, b):
    bb = lw.b
    if _is_number(b):
        return _mul(lw, node, a, 1.0 / b)
    if isinstance(b, Moment):
        return _mul(lw, node, a, Moment(bb.make(ir.SOp, "pow", (b.s,), -1.0)))
    if isinstance(b, Width):
        return _mul(lw, node, a, elementwise_rule(lw, node, _RECIPROCAL, b))
    raise lw.unsupported(node)


@rule(FUNCTION_RULES, operator.truediv, torch.div)
@rule(METHOD_RULES, "div")
def _div_rule(lw, node, a, b):
    return _div(lw, node, a, b)


def _pow(lw, node, a, p):
    if isinstance(a, Moment) and _is_number(p):
        return Moment(lw.b.make(ir.SOp, "pow", (a.s,), float(p)))
    if isinstance(a, Width) and _is_number(p):
        fn = ew.from_callable(lambda t, p=p: t ** p, f"pow({p})")
        return elementwise_rule(lw, node, fn, a)
    raise lw.unsupported(node)


@rule(FUNCTION_RULES, operator.pow, torch.pow)
@rule(METHOD_RULES, "pow")
def _pow_rule(lw, node, a, p):
    return _pow(lw, node, a, p)


@rule(FUNCTION_RULES, torch.sqrt, torch.rsqrt)
def _sqrt_rule(lw, node, a):
    p = 0.5 if node.target is torch.sqrt else -0.5
    if isinstance(a, Moment):
        return Moment(lw.b.make(ir.SOp, "pow", (a.s,), p))
    fn = ew.from_callable(node.target, node.target.__name__)
    return elementwise_rule(lw, node, fn, a)


def _width_axis(lw, node, dim, ndim):
    d = dim if dim >= 0 else dim + ndim
    if d != 1:
        raise lw.error(node, f"a reduction or concatenation along axis {dim} of a width vector: "
                       "only the width axis (1: features or channels) is supported", WidthInferenceError)


@rule(FUNCTION_RULES, torch.cat, torch.concat)
def _cat(lw, node, tensors, dim=0):
    if all(isinstance(t, Fixed) for t in tensors):
        return Fixed(node)
    if not all(isinstance(t, Width) for t in tensors):
        raise lw.error(node, "concatenating width vectors with fixed tensors", WidthInferenceError)
    _width_axis(lw, node, dim, len(lw.shape(node)))
    if len({t.spatial for t in tensors}) != 1:
        raise lw.error(node, "concatenating feature maps with different positions", WidthInferenceError)
    total = sum(t.size for t in tensors)
    pieces = []
    for t in tensors:
        for frac, var in t.vec.pieces:
            pieces.append((frac * Fraction(t.size, total), var))
    return lw.width(node, lw.b.vec(pieces), total, tensors[0].spatial)


def _mean_rule_impl(lw, node, x, dim, keepdim, which):
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if x.spatial:
        nd = len(lw.shape(node.args[0]))
        if sorted(d % nd for d in dims) != list(range(2, nd)):
            raise lw.unsupported(node, "a mean over some but not all positions of a feature map")
        return _gap(lw, node, x)
    if len(dims) != 1:
        raise lw.unsupported(node, "a reduction over several axes of a width vector")
    _width_axis(lw, node, dims[0], len(lw.shape(node.args[0])))
    if not keepdim:
        raise lw.error(node, "a width average without keepdim=True is a per-input number; it can "
                       "only scale width vectors (use keepdim=True) and cannot be the output")
    return Moment(lw.b.smoment(which, x.vec))


@rule(METHOD_RULES, "mean")
def _mean_method(lw, node, x, dim=None, keepdim=False, dtype=None):
    return _mean_rule_impl(lw, node, x, dim, keepdim, "mean")


@rule(FUNCTION_RULES, torch.mean)
def _mean_fn(lw, node, x, dim=None, keepdim=False, dtype=None):
    return _mean_rule_impl(lw, node, x, dim, keepdim, "mean")


# Shape-only ops: the identity on (batch, width); on a feature map, flattening the
# positions into the width axis (a flatten readout); after global pooling, dropping
# the size-1 position axes.
def _shape_identity(lw, node, x, *args, **kwargs):
    if not isinstance(x, Width):
        raise lw.unsupported(node)
    before, after = tuple(lw.shape(node.args[0])), tuple(lw.shape(node))
    if before == after:
        return x
    if x.spatial and after == (before[0], math.prod(before[1:])):
        return lw.width(node, x.vec, after[1], (), "flatten", x.spatial)
    if x.pool == "gap" and len(after) >= 2 and after[:2] == before[:2] and math.prod(after[2:]) == 1:
        return x
    raise lw.unsupported(node, f"reshaping a width vector from {before} to {after}")


_SHAPE_METHODS = ("view", "reshape", "flatten", "contiguous", "clone", "squeeze", "unsqueeze",
                  "float", "double", "to", "type_as")
_SHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.squeeze, torch.clone)
for _name in _SHAPE_METHODS:
    rule(METHOD_RULES, _name)(_shape_identity)
for _fn in _SHAPE_FUNCTIONS:
    rule(FUNCTION_RULES, _fn)(_shape_identity)


def _is_shape_op(node, modules) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Flatten, nn.Identity))
    return False


@rule(MODULE_RULES, nn.Flatten)
def _flatten_module(lw, node, m, x):
    return _shape_identity(lw, node, x)


@rule(METHOD_RULES, "size")
def _size(lw, node, x, *args):
    shp = lw.shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return torch.Size(shp)[args[0]] if args else torch.Size(shp)


@rule(FUNCTION_RULES, getattr)
def _getattr(lw, node, x, name):
    if name == "shape":
        return torch.Size(lw.shape(node.args[0]))
    raise lw.unsupported(node)


@rule(FUNCTION_RULES, operator.getitem)
def _getitem(lw, node, x, idx):
    if isinstance(x, (tuple, list, torch.Size)):
        return x[idx]
    raise lw.unsupported(node, "indexing a width vector")


# Convolutions and pooling ----------------------------------------------------

def _gap(lw, node, x):
    return lw.width(node, x.vec, x.size, (), "gap", x.spatial)


def _conv(lw, node, x, name, weight_shape, has_bias, stride, padding, dilation, groups, padding_mode="zeros"):
    """``nn.Conv{1,2}d``: a matrix per kernel tap, positions fixed (tensor_programs.md Sec. 5)."""
    if groups != 1:
        raise lw.unsupported(node, f"a grouped convolution (groups={groups})")
    if padding_mode != "zeros":
        raise lw.unsupported(node, f"a convolution with padding_mode={padding_mode!r} (only zeros)")
    out_c, in_c, *kernel = weight_shape
    if isinstance(x, Fixed):
        in_shape = tuple(lw.shape(x.node)[2:])
    elif isinstance(x, Width) and x.spatial:
        in_shape = x.spatial
    else:
        raise lw.error(node, "a convolution applied to a tensor without positions", WidthInferenceError)
    try:
        geom = ConvGeometry.make(kernel, stride, padding, dilation, in_shape)
    except ValueError as e:
        raise lw.unsupported(node, f"this convolution ({e})") from e
    if geom.out_shape != tuple(lw.shape(node)[2:]):
        raise lw.unsupported(node, f"a convolution whose output shape {lw.shape(node)} differs from the "
                             f"computed {geom.out_shape}")
    one = lw.b.sconst(1.0)
    fan_in = in_c * geom.size
    if isinstance(x, Fixed):
        mat = lw.matrix(node, name, "input", fan_in)
        atom = lw.b.make(ir.GInput, mat, lw.fixed_index(x.node, 2 + len(in_shape)))
    else:
        mat = lw.matrix(node, name, "hidden", fan_in)
        atom = lw.b.make(ir.GMatMul, mat, x.vec)
    if mat.conv is None:
        mat.conv = geom
    elif mat.conv != geom:
        raise lw.unsupported(node, f"the convolution '{name}' applied to inputs of different sizes")
    terms = [(one, atom)]
    if has_bias:
        b = lw.bias_atom(name + ".bias", name)
        if b is not None:
            b.param.spatial = geom.out_shape
            terms.append((one, b))
    return lw.width(node, lw.b.single(lw.b.var(terms)), out_c, geom.out_shape)


@rule(MODULE_RULES, nn.Conv1d, nn.Conv2d)
def _conv_module(lw, node, m, x):
    return _conv(lw, node, x, node.target, tuple(m.weight.shape), m.bias is not None, m.stride,
                 m.padding, m.dilation, m.groups, m.padding_mode)


@rule(FUNCTION_RULES, F.conv1d, F.conv2d)
def _conv_function(lw, node, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if wnode.op != "get_attr":
        raise lw.unsupported(node, "a convolution whose weight is not a module parameter")
    return _conv(lw, node, x, _module_of(wnode.target), tuple(lw.shape(wnode)), bias is not None,
                 stride, padding, dilation, groups)


def _avg_pool(lw, node, x, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    """``nn.AvgPool{1,2}d``: a fixed average over windows of positions (a GPool atom)."""
    if not isinstance(x, Width) or not x.spatial:
        raise lw.unsupported(node, "average pooling of a tensor without positions")
    if ceil_mode or divisor_override is not None or (not count_include_pad and padding):
        raise lw.unsupported(node, "average pooling with ceil_mode, divisor_override or "
                             "count_include_pad=False and padding")
    try:
        geom = ConvGeometry.make(kernel_size, stride if stride else kernel_size, padding, 1, x.spatial)
    except ValueError as e:
        raise lw.unsupported(node, f"this pooling ({e})") from e
    atom = lw.b.make(ir.GPool, geom, x.vec)
    return lw.width(node, lw.b.single(lw.b.atom_var(atom)), x.size, geom.out_shape)


@rule(MODULE_RULES, nn.AvgPool1d, nn.AvgPool2d)
def _avg_pool_module(lw, node, m, x):
    return _avg_pool(lw, node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                     getattr(m, "divisor_override", None))


@rule(FUNCTION_RULES, F.avg_pool1d, F.avg_pool2d)
def _avg_pool_function(lw, node, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True, divisor_override=None):
    return _avg_pool(lw, node, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def _global_pool(lw, node, x, output_size):
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    if any(s not in (1, None) for s in size) or not isinstance(x, Width) or not x.spatial:
        raise lw.unsupported(node, f"adaptive average pooling to {output_size} (only to size 1)")
    return _gap(lw, node, x)


@rule(MODULE_RULES, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive_pool(lw, node, m, x):
    return _global_pool(lw, node, x, m.output_size)


@rule(FUNCTION_RULES, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def _adaptive_pool_fn(lw, node, x, output_size):
    return _global_pool(lw, node, x, output_size)


# Normalization ---------------------------------------------------------------

def _normalize(lw, node, x, name, eps, center, gain_param, shift_param, normalized_shape):
    """LayerNorm (``center=True``) or RMSNorm over the width axis (tensor_programs.md Sec. 5)."""
    bb = lw.b
    if not isinstance(x, Width) or x.spatial:
        raise lw.unsupported(node, "normalization of a non-width tensor or of a feature map with positions")
    ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
    if len(ns) != 1 or ns[0] != x.size:
        raise lw.error(node, f"normalization over shape {ns}: only the width axis (size {x.size}) is "
                       "supported", WidthInferenceError)
    sq = bb.smoment("sq", x.vec)
    if center:
        mu = bb.smoment("mean", x.vec)
        var = bb.sadd(sq, bb.sneg(bb.smul(mu, mu)))
        r = bb.srsqrt(var, eps)
        vec = bb.lincomb([(r, x.vec), (bb.sneg(bb.smul(r, mu)), _one_vec(lw))])
    else:
        vec = bb.lincomb([(bb.srsqrt(sq, eps), x.vec)])
    return _affine(lw, node, x, vec, name, gain_param, shift_param)


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
        aff = bb.param(ir.Affine(name=name, gain=gain_param is not None,
                                 shift=shift_param is not None, xhat=vec.pieces[0][1]))
        probe = bb.single(bb.atom_var(bb.make(ir.GProbe, aff)))
        vec = bb.lincomb([(bb.sconst(1.0), vec), (bb.sconst(1.0), probe)])
    return lw.width(node, vec, x.size, x.spatial)


@rule(MODULE_RULES, nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm_module(lw, node, m, x):
    """BatchNorm in eval mode with its initial running statistics: ``x / sqrt(1 + eps)``.

    In training mode BatchNorm couples the examples of a batch and the kernel depends
    on the batch composition (TP II App. D); that is not compiled.
    """
    if m.training and m.track_running_stats is not False:
        raise lw.unsupported(
            node, "BatchNorm in training mode (it couples the examples of a batch: TP II App. D). "
            "Call model.eval() for the eval-mode kernel with the initial running statistics")
    if m.training or not m.track_running_stats:
        raise lw.unsupported(node, "BatchNorm without running statistics")
    if not isinstance(x, Width):
        raise lw.unsupported(node, "BatchNorm of a fixed (non-width) tensor")
    if not (torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)):
        raise lw.error(node, f"the running statistics of '{node.target}' are not at initialization "
                       "(mean 0, variance 1); the kernel at initialization assumes them")
    vec = lw.b.lincomb([(lw.b.sconst((1.0 + m.eps) ** -0.5), x.vec)])
    return _affine(lw, node, x, vec, node.target, m.weight if m.affine else None,
                   m.bias if m.affine else None)


@rule(MODULE_RULES, nn.LayerNorm)
def _layernorm_module(lw, node, m, x):
    return _normalize(lw, node, x, node.target, m.eps, True, m.weight,
                      getattr(m, "bias", None), m.normalized_shape)


@rule(FUNCTION_RULES, F.layer_norm)
def _layernorm_fn(lw, node, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    params = []
    for i, key in ((2, "weight"), (3, "bias")):
        n = node.args[i] if len(node.args) > i else node.kwargs.get(key)
        params.append(lw.gm.get_parameter(n.target) if isinstance(n, fx.Node) and n.op == "get_attr" else None)
        if isinstance(n, fx.Node) and n.op != "get_attr":
            raise lw.unsupported(node, "F.layer_norm with computed weight/bias")
    name = _module_of(node.args[2].target) if params[0] is not None else node.name
    return _normalize(lw, node, x, name, eps, True, params[0], params[1], normalized_shape)


if hasattr(nn, "RMSNorm"):
    @rule(MODULE_RULES, nn.RMSNorm)
    def _rmsnorm_module(lw, node, m, x):
        eps = m.eps if m.eps is not None else torch.finfo(torch.get_default_dtype()).eps
        return _normalize(lw, node, x, node.target, eps, False, m.weight, None, m.normalized_shape)

if hasattr(F, "rms_norm"):
    @rule(FUNCTION_RULES, F.rms_norm)
    def _rmsnorm_fn(lw, node, x, normalized_shape, weight=None, eps=None):
        if weight is not None:
            raise lw.unsupported(node, "F.rms_norm with a weight (use nn.RMSNorm)")
        eps = eps if eps is not None else torch.finfo(torch.get_default_dtype()).eps
        return _normalize(lw, node, x, node.name, eps, False, None, None, normalized_shape)


def lower(gm: fx.GraphModule, example_input, W_std, b_std, std) -> ir.Program:
    return Lowering(gm, W_std, b_std, std, example_input).run()
