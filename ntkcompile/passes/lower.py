"""Lowering: torch.fx graph -> Tensor Program IR.

An interpreter walks the traced graph.  Each node's value is one of

* ``Fixed``   a tensor computed from the input alone (batch + fixed axes); it is
  evaluated concretely by ``prep`` at kernel time, so any torch op is allowed
  there as long as it has no trainable parameter;
* ``Width``   a width vector in canonical form (``ir.Vec``);
* ``Moment``  a per-input scalar such as ``x.mean(-1, keepdim=True)``;
* ``Derived`` another value computed from width vectors (attention logits ``q k^T / n``);
* ``Output``  the readout and what follows it;
* a plain Python value (ints, floats, shapes).

The rules themselves live with their ops in ``ntkcompile/ops/``, registered into
three tables: ``MODULE_RULES`` by module type, ``FUNCTION_RULES`` by callable,
``METHOD_RULES`` by method name (``@rule``; registering a key twice is an error).
``rule(..., shape_only=True)`` marks an op that only reshapes (the one list of
shape-only ops, also used by readout discovery); ``input_layer=True`` an op
whose parameters turn a fixed input into a width vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .. import ir
from ..errors import GIACheckError, UnsupportedOpError, WidthInferenceError
from ..trace import describe, origin, source_line
from .prune import prune
from .readout import SHAPE_ONLY, find_readout
from .run import BatchPrep, make_prep as _make_prep, propagate_shapes as _propagate_shapes


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
    positions: tuple = ()          # fixed positions (conv feature maps: (H, W); a sequence: (T,))
    pool: Optional[str] = None     # "gap" / "flatten": positions already pooled, readout only
    pooled: tuple = ()             # the positions that were pooled
    layout: Optional[tuple] = None  # the role of each tensor axis (``Width.axes``)

    @property
    def axes(self) -> tuple:
        """The role of each axis of the torch tensor: ``"n"`` the batch, ``"w"`` the width,
        ``k`` (an int) position axis ``k``.  A feature map is ``("n", "w", 0, 1)`` (the
        default); a batch-first sequence ``("n", 0, "w")``; a time-first one ``(0, "n", "w")``."""
        return self.layout if self.layout is not None else ("n", "w") + tuple(range(len(self.positions)))


@dataclass(frozen=True)
class Moment:
    s: Any             # ir scalar node


@dataclass(frozen=True)
class Output:
    pass


class Derived:
    """Base of other values derived from width vectors, defined by their ops (attention
    logits and weights: ``ops/attention.py``); ops without a rule for them refuse them."""


class BatchCoupled(UnsupportedOpError):
    """Raised while lowering a model one input at a time when an op couples the inputs of a
    batch (BatchNorm in training mode, ``h - h.mean(0)``): ``CompiledKernel`` then lowers it
    again with the batch as a fixed axis (``Lowering(..., batch=sizes)``).  Outside that
    retry it is the error the user sees."""


@dataclass(frozen=True)
class Refused:
    """A value an op produces but ntkcompile cannot compile (an LSTM's ``c_n``): using it
    raises ``UnsupportedOpError`` with ``what``; leaving it unused is fine."""
    what: str


# --------------------------------------------------------------------------- #
# Rule tables
# --------------------------------------------------------------------------- #

MODULE_RULES: dict = {}
FUNCTION_RULES: dict = {}
METHOD_RULES: dict = {}
INPUT_LAYERS: set = set()      # keys of ops whose parameters make a fixed input a width vector
CONCRETE: set = set()          # keys of ops whose value is a Python value (a size), also of fixed tensors
INTEGER_INPUTS: set = set()    # keys of ops that read integer inputs (token ids: an embedding)
BATCH_SAFE: set = set()        # keys of ops whose rules handle a batch-coupled model's batch axis
PROGRAM_CHECKS: list = []      # check(lowering, program) of the pruned program, registered by ops
# pool -> unpool(lowering, node, x): a globally pooled feature map (kept for the readout, which
# reads it more cheaply) as an ordinary vector, when another op uses it (an MLP head)
UNPOOL: dict = {}
FLATTEN_READERS: set = set()   # keys of ops that read a flattened feature map themselves (a hidden Linear)


def table_for(key) -> dict:
    if isinstance(key, str):
        return METHOD_RULES
    if isinstance(key, type) and issubclass(key, nn.Module):
        return MODULE_RULES
    return FUNCTION_RULES


def rule(*keys, shape_only=False, input_layer=False, concrete=False, integer_input=False, batch_safe=False):
    """Register the decorated lowering rule for module types, callables and method names.

    A module rule is called ``rule(lowering, node, module, *args, **kwargs)``, a
    function or method rule ``rule(lowering, node, *args, **kwargs)``, with the
    arguments' values (``Fixed``, ``Width``, ``Moment``, Python values).
    ``concrete=True``: the rule also runs on fixed tensors (it returns a Python value,
    such as a size); ``integer_input=True``: the op reads integer inputs (token ids), so
    the model is run on integer examples when it reads its input directly;
    ``batch_safe=True``: the rule handles width vectors of a batch-coupled model, whose
    position axis 0 is the batch (``Lowering.batch``); other ops refuse them there.
    """
    def deco(fn):
        for k in keys:
            table = table_for(k)
            if k in table:
                raise ValueError(f"a lowering rule for {k!r} is already registered")
            table[k] = fn
            for flag, where in ((shape_only, SHAPE_ONLY), (input_layer, INPUT_LAYERS), (concrete, CONCRETE),
                                (integer_input, INTEGER_INPUTS), (batch_safe, BATCH_SAFE)):
                if flag:
                    where.add(k)
        return fn
    return deco


def is_rule_module(m: nn.Module) -> bool:
    """Leaf modules for tracing: those with a rule."""
    return type(m) in MODULE_RULES


# --------------------------------------------------------------------------- #
# Lowering context
# --------------------------------------------------------------------------- #

class Lowering:
    """Walks the fx graph in order, producing an ``ir.Program``."""

    def __init__(self, gm: fx.GraphModule, W_std, b_std, std, example_input, batch=None):
        self.gm = gm
        # Batch-coupled models (``BatchCoupled``) are lowered with the batch as a fixed axis:
        # the inputs of one call are one input whose position axis 0 runs over the examples of
        # the batches ``batch`` (their sizes, e.g. ``(B1, B2)`` for a cross kernel), each batch
        # normalized by its own statistics.  Tensors ``(B, n)`` have the layout ``(0, "w")``.
        self.batch = None if batch is None else tuple(int(b) for b in batch)
        self.modules = dict(gm.named_modules())
        self.W_std, self.b_std = float(W_std), float(b_std)
        self.std = dict(std or {})
        self.b = ir.Builder()
        self.matrices: dict = {}
        self.biases: dict = {}
        self.blocks: dict = {}         # (root param id, lo, hi) -> (block param, node): ops/blocks.py
        self.uses: dict = {}           # parameter name -> how a bare parameter is used: ops/params.py
        self.fixed_nodes: list = []
        self.fixed_dims: list = []
        self.fixed_perms: list = []     # the permutation prep applies to each fixed input (or None)
        self.positions = ir.Positions()  # the fixed positions of IR nodes built so far
        self.readout = None
        self.readout_node, self.post_nodes, self.out_scale = find_readout(gm)
        self.example = example_input
        self.env: dict = {}
        self.names: dict = {}
        self.sources: dict = {}        # fx node name -> the user's source line
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"the model's forward takes {len(placeholders)} tensor arguments "
                f"({', '.join(n.name for n in placeholders)}); ntkcompile supports models of exactly one "
                "input tensor. Wrap the model so that its forward takes one tensor (concatenate the "
                "inputs, or fix the other arguments in a wrapper module).")
        self._shapes, self._dtypes, self._values = _propagate_shapes(gm, example_input)
        self._derived: dict = {}

    # ------------------------------------------------------------------ utils
    def std_for(self, *qualnames: str):
        """``(W_std, b_std)`` of the first of ``qualnames`` (a module's or a parameter's
        qualified name) that ``std`` overrides, else the defaults."""
        for qualname in qualnames:
            if qualname in self.std:
                w, bb = self.std[qualname]
                return float(w), float(bb)
        return self.W_std, self.b_std

    def shape(self, node):
        return self._shapes[node.name]

    def constant(self, v):
        """The value of a fixed tensor ``v`` that does not depend on the input (a buffer, an
        attention mask built from sizes), as computed on the example input; None if it
        depends on the input or was too large to keep."""
        if not isinstance(v, Fixed):
            return None
        seen, stack = set(), [v.node]
        while stack:
            n = stack.pop()
            if n in seen or (n is not v.node and n.name not in self._shapes):
                continue           # a Python value (a size) cuts the dependence
            if n.op == "placeholder":
                return None
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return self._values.get(v.node.name)

    def dtype(self, node):
        """The dtype of ``node``'s value in the finite model run on the example input."""
        return self._dtypes[node.name]

    def error(self, node, msg, cls=UnsupportedOpError):
        return cls(f"{msg}\n  at {describe(node)}\n  source: {source_line(node)}")

    def batch_coupled(self, node, what):
        """The error (or the retry signal, ``BatchCoupled``) for an op that couples a batch."""
        if self.batch is not None:
            return self.error(node, f"{what} in a batch-coupled model: only MLPs and CNNs made of Linear, Conv, "
                              "nonlinearities, LayerNorm, BatchNorm in training mode, h - h.mean(0), x - x.mean(0) "
                              "and a mean over a map's positions before the readout (global average pooling "
                              "written h.mean((2, 3))) are compiled so far")
        return self.error(node, f"{what} couples the examples of a batch", BatchCoupled)

    def unsupported(self, node, what=None):
        what = what or f"op {describe(node)}"
        if self._pointwise_shaped(node):
            how = ("  If it is an elementwise function, register it with ntkcompile.register_elementwise("
                   "fn, name) (closed forms optional); otherwise it needs a lowering rule in a file of "
                   "ntkcompile/ops/ (@rule(ModuleType / function / 'method'); see docs/architecture.md).")
        else:
            how = ("  It changes the shape of its input, so it is not an elementwise function: it needs a "
                   "lowering rule in a file of ntkcompile/ops/ (@rule(ModuleType / function / 'method'); "
                   "see docs/architecture.md, \"How to add an op\").")
        return self.error(node, f"ntkcompile has no Tensor Program rule for {what}.\n{how}")

    def _pointwise_shaped(self, node) -> bool:
        """True if ``node`` maps one tensor to a tensor of the same shape (it might be pointwise)."""
        inputs = [a for a in node.all_input_nodes if a.name in self._shapes]
        if node.op == "call_module":
            inputs = inputs[:1]
        return (len(inputs) == 1 and node.name in self._shapes
                and self._shapes[node.name] == self._shapes[inputs[0].name])

    def width(self, node, vec, size, positions=(), pool=None, pooled=(), layout=None):
        """The value of ``node``: a width vector.  Without ``layout`` it keeps the layout of
        the node's first width argument with the same positions (elementwise ops), else
        the default (``Width.axes``)."""
        where = origin(node, self.modules)         # the user's module or source line, for printouts
        self.sources.setdefault(where, source_line(node))
        self.names.setdefault(vec, where)
        for _, var in vec.pieces:
            self.names.setdefault(var, where)
        positions = tuple(positions)
        if layout is None and positions and not pool:
            for a in node.all_input_nodes:
                v = self.env.get(a)
                if isinstance(v, Width) and v.positions == positions and v.layout is not None:
                    layout = v.layout
                    break
        return Width(vec, size, positions, pool, tuple(pooled), None if layout is None else tuple(layout))

    def width_axis(self, node, dim, ndim, x=None):
        """Check that ``dim`` is the width axis (of ``x``'s layout; 1 by default: features or
        channels)."""
        d = dim if dim >= 0 else dim + ndim
        axes = x.axes if isinstance(x, Width) and len(x.axes) == ndim else None
        if not (0 <= d < ndim) or (axes[d] != "w" if axes is not None else d != 1):
            raise self.error(node, f"a reduction or concatenation along axis {dim} of a width vector: "
                             "only the width axis (features or channels) is supported", WidthInferenceError)

    def fixed_index(self, node, ndim=2, perm=None):
        """The index of the fixed input ``node`` among the program's fixed inputs (added on
        first use); ``perm``: the axes permutation ``prep`` applies to it (a dense layer on
        ``(N, *P, d)`` reads it as ``(N, d, *P)``, like a convolution)."""
        shp = self.shape(node)
        if self.batch is not None:
            shp = (1,) + tuple(shp)       # one input whose positions are the batch (``batch``)
        if len(shp) != ndim:
            raise self.error(
                node, f"an input layer expects a fixed input with {ndim} axes, got shape {tuple(shp)}")
        perm = None if perm is None or tuple(perm) == tuple(range(ndim)) else tuple(perm)
        for i, (n, p) in enumerate(zip(self.fixed_nodes, self.fixed_perms)):
            if n is node and p == perm:
                return i
        self.sources.setdefault("input" if node.op == "placeholder" else origin(node, self.modules),
                                source_line(node))
        self.fixed_nodes.append(node)
        self.fixed_perms.append(perm)
        dims = tuple(int(v) for v in shp)
        self.fixed_dims.append(tuple(dims[i] for i in perm)[1:] if perm else dims[1:])
        return len(self.fixed_nodes) - 1

    def fixed_transposed(self, node, dim0=0, dim1=1):
        """The fixed tensor of ``node`` with two axes swapped, as a new node of the graph
        (a time-first sequence made batch first: the kernel's fixed inputs are)."""
        key = (node, dim0, dim1)
        if key not in self._derived:
            with self.gm.graph.inserting_after(node):
                t = self.gm.graph.call_method("transpose", (node, dim0, dim1))
            t.meta.update(node.meta)
            shape = list(self._shapes[node.name])
            shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
            self._shapes[t.name] = tuple(shape)
            self._derived[key] = t
        return self._derived[key]

    # ------------------------------------------------------------------- walk
    def run(self) -> ir.Program:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                break
            self.env[node] = self.lower_node(node)
        if self.readout is None:
            raise GIACheckError("the model has no readout Linear (see the Simple GIA Check)")
        if self.batch is None:
            prep = _make_prep(self.gm, self.fixed_nodes, self.fixed_perms)
            self._check_per_example(prep)
        else:
            prep = BatchPrep(_make_prep(self.gm, self.fixed_nodes), self.batch, self.fixed_perms)
        program = ir.Program(
            builder=self.b, readout=self.readout,
            fixed_names=tuple("input" if n.op == "placeholder" else origin(n, self.modules)
                              for n in self.fixed_nodes), fixed_dims=tuple(self.fixed_dims),
            prep=prep, input_shape=tuple(self.example.shape[1:]), names=self.names, sources=self.sources,
        )
        program = prune(program)
        for check in PROGRAM_CHECKS:
            check(self, program)
        return program

    def _check_per_example(self, prep):
        """Refuse fixed inputs that mix the examples of a batch (``x - x.mean(0)`` before the
        first layer): their kernel would change with how the inputs are tiled.  Compared
        on random examples, whole batch against one example at a time."""
        shape = tuple(self.example.shape[1:])
        g = torch.Generator().manual_seed(0)
        if self.example.is_floating_point():
            x = torch.randn((4,) + shape, generator=g, dtype=torch.float64)
        else:
            x = torch.randint(0, 2, (4,) + shape, generator=g, dtype=self.example.dtype)
        try:
            with torch.no_grad():
                whole = prep(x)
                each = [prep(x[i:i + 1]) for i in range(len(x))]
        except Exception:       # the model may not run on these values; the call checks inputs again
            return
        for k, node in enumerate(self.fixed_nodes):
            one = torch.cat([e[k] for e in each])
            if one.shape != whole[k].shape or not torch.allclose(
                    whole[k].double(), one.double(), rtol=1e-9, atol=1e-9 * float(one.abs().max().nan_to_num()),
                    equal_nan=True):
                raise self.error(
                    node, "the input of this layer, computed from the model's input before its first "
                    "Linear/Conv, mixes the examples of a batch (e.g. x - x.mean(0), a BatchNorm in "
                    "training mode)", BatchCoupled)

    def lower_node(self, node):
        try:
            return self._lower_node(node)
        except UnsupportedOpError:
            raise
        except NotImplementedError as e:
            raise self.unsupported(node, str(e)) from e

    def _lower_node(self, node):
        if node.op in ("placeholder", "get_attr"):
            return Fixed(node)      # parameters/buffers: checked where they are used
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        flat = list(_flatten((args, kwargs)))
        for v in (*args, *kwargs.values()):
            if isinstance(v, Refused):
                raise self.unsupported(node, v.what)
        if node in self.post_nodes:
            return Output()
        if node is self.readout_node:
            return self.lower_readout(node, args)
        if any(isinstance(v, Output) for v in flat):
            raise self.error(node, "only shapes and scaling by a number may follow the readout",
                             GIACheckError)
        tensors = [v for v in flat if isinstance(v, (Fixed, Width, Moment, Derived))]
        key = type(self.modules[node.target]) if node.op == "call_module" else node.target
        if self.batch is not None and any(isinstance(v, Width) for v in flat) and not in_table(key, BATCH_SAFE):
            # its rule would take the batch axis for a position of one example
            raise self.batch_coupled(node, str(getattr(key, "__name__", key)))
        if not tensors and node.op == "call_function" and _python_op(key):
            return key(*args, **kwargs)       # arithmetic on sizes: n = x.size(1) // 3
        if any(isinstance(v, Width) and v.pool for v in flat) and key not in SHAPE_ONLY:
            # positions pooled for the readout, used by another op: a global average becomes an
            # ordinary vector; a flatten only a Linear reads (FLATTEN_READERS)
            unpool = lambda v: UNPOOL[v.pool](self, node, v) if isinstance(v, Width) and v.pool in UNPOOL else v  # noqa: E731
            args, kwargs = fx.node.map_aggregate(args, unpool), fx.node.map_aggregate(kwargs, unpool)
            flat = list(_flatten((args, kwargs)))
            tensors = [v for v in flat if isinstance(v, (Fixed, Width, Moment, Derived))]
            if any(isinstance(v, Width) and v.pool for v in flat) and key not in FLATTEN_READERS:
                raise self.unsupported(
                    node, f"{describe(node)} after flattening the positions of a feature map (only a Linear "
                    "may follow a flatten)")
        if node.op == "call_module":
            m = self.modules[node.target]
            if tensors and all(isinstance(v, Fixed) for v in tensors) and key not in INPUT_LAYERS:
                if any(p.requires_grad for p in m.parameters()):
                    raise self.unsupported(
                        node, f"module {type(m).__name__} with trainable parameters applied to a "
                        "fixed (non-width) tensor")
                return Fixed(node)
            r = MODULE_RULES.get(key)
            if r is None:
                raise self.unsupported(node, f"module {type(m).__module__}.{type(m).__name__}")
            return r(self, node, m, *args, **kwargs)
        if node.op in ("call_function", "call_method"):
            if not any(isinstance(v, (Width, Moment, Derived)) for v in flat) and key not in INPUT_LAYERS and \
                    not in_table(key, CONCRETE):
                if any(isinstance(v, Fixed) and v.node.op == "get_attr" and
                       _is_trainable_attr(self.gm, v.node.target) for v in flat):
                    raise self.unsupported(node, f"trainable parameter used directly in {describe(node)}")
                return Fixed(node)
            table = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
            try:
                r = table.get(key)
            except TypeError:       # an unhashable target
                r = None
            if r is None:
                raise self.unsupported(node)
            return r(self, node, *args, **kwargs)
        raise self.unsupported(node)

    # ---------------------------------------------------------------- params
    def matrix(self, node, name, kind, fan_in, geometry=None, module=None):
        """The matrix ``name`` of module ``module`` (default: ``name``), created on first use
        with its role and geometry."""
        W_std, _ = self.std_for(module or name)
        m = self.matrices.get(name)
        if m is None:
            m = self.b.param(ir.Matrix, name=name, kind=kind, W_std=W_std, fan_in=fan_in, geometry=geometry)
            self.matrices[name] = m
        elif m.kind != kind:
            raise self.error(node, f"the Linear '{name}' is applied both to a fixed input and to "
                             "a width vector; ntkcompile cannot assign it one role")
        elif m.geometry != geometry:
            shapes = [g.in_shape if g is not None else () for g in (m.geometry, geometry)]
            raise self.error(node, f"'{name}' is applied to inputs of different positions or sizes "
                             f"({shapes[0]} and {shapes[1]}): ntkcompile does not compile one matrix with uses "
                             "of different positions (a Linear on vectors and on sequences, a convolution on "
                             "maps of different sizes)")
        return m

    def bias_atom(self, name, module_name, positions=(), node=None):
        """The bias atom of parameter ``name`` of module ``module_name``, shared by every position
        (None when its ``b_std`` is 0: it contributes nothing)."""
        _, b_std = self.std_for(name, module_name)
        if b_std == 0.0:
            return None
        p = self.biases.get(name)
        if p is None:
            p = self.b.param(ir.Bias, name=name, b_std=b_std, positions=tuple(positions))
            self.biases[name] = p
        elif p.positions != tuple(positions):
            raise self.error(node, f"the bias '{name}' is added to vectors of different positions "
                             f"({p.positions} and {tuple(positions)})")
        return self.b.make(ir.GBias, p)

    def lower_readout(self, node, args):
        if node.op == "call_module":
            m = self.modules[node.target]
            name, has_bias, out = node.target, m.bias is not None, m.out_features
        else:
            wnode = node.args[1]
            name = module_of(wnode.target)
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
        pool, positions = x.pool, x.pooled
        if x.positions:
            if x.axes[-1] != "w":
                raise self.error(node, "the readout Linear is applied to a feature map with channels before "
                                 "its positions; flatten or pool the positions first, or move the channels "
                                 "last (x.permute(0, 2, 3, 1)) for an output at every position",
                                 WidthInferenceError)
            if x.axes[0] != "n" and self.batch is None:
                raise self.error(node, "the readout Linear at every position of a time-first sequence gives "
                                 "outputs (T, N, out); make it batch first before the readout "
                                 "(h.transpose(0, 1)), so that kernels and targets are (N, T, ...)",
                                 WidthInferenceError)
            # an output at every position (a per-step readout of a sequence): kernels over
            # pairs of positions, (N1, N2, *P, *P)
            pool, positions = "steps", x.positions
        self.readout = ir.Readout(name=name, W_std=W_std, b_std=b_std, has_bias=has_bias and b_std != 0,
                                  out_features=out, vec=x.vec, scale=self.out_scale,
                                  pool=pool, positions=positions)
        return Output()


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def in_table(key, table) -> bool:
    try:
        return key in table
    except TypeError:       # an unhashable target
        return False


_PYTHON_MODULES = ("_operator", "operator", "builtins", "math")


def _python_op(key) -> bool:
    """A function of the operator module, a builtin or a math function: on Python values
    (sizes) it is evaluated while lowering."""
    return callable(key) and getattr(key, "__module__", None) in _PYTHON_MODULES


def module_of(qualname: str) -> str:
    """The module of a parameter's qualified name (``"a.b.weight"`` -> ``"a.b"``)."""
    return qualname.rsplit(".", 1)[0] if "." in qualname else qualname


def _is_trainable_attr(gm, target):
    try:
        obj = gm.get_parameter(target)
    except AttributeError:
        return False
    return obj.requires_grad


def reads_integers(gm) -> bool:
    """True if the model may read integer inputs: an exported program recorded one, or the
    input reaches an op registered with ``integer_input=True`` (an embedding) before any
    input layer."""
    ph = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = ph.meta.get("val") if ph is not None else None
    if isinstance(val, torch.Tensor) and not val.is_floating_point():
        return True
    modules = dict(gm.named_modules())
    seen, stack = set(), [ph] if ph is not None else []
    while stack:
        n = stack.pop()
        for user in n.users:
            key = type(modules[user.target]) if user.op == "call_module" else user.target
            if in_table(key, INTEGER_INPUTS):
                return True
            if user not in seen and not in_table(key, INPUT_LAYERS):
                seen.add(user)
                stack.append(user)
    return False


def lower(gm: fx.GraphModule, example_input, W_std, b_std, std, batch=None) -> ir.Program:
    """The forward Tensor Program of ``gm`` (pruned to what the readout uses, frozen);
    ``batch``: the batch sizes of a batch-coupled model (``Lowering``)."""
    return Lowering(gm, W_std, b_std, std, example_input, batch).run()
