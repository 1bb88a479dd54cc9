"""Frontend for ``torch.export``: an ``ExportedProgram`` -> the GraphModule the lowering reads.

torch.export records a model as a graph of ATen ops: ``aten.linear``,
``aten.conv2d``, ``aten.relu``, ... (torch's default "training" IR), or, after
``run_decompositions()`` and in older torch versions, the core ATen set
(``aten.addmm`` of a transposed weight, ``aten.convolution``, ``aten.view``).
``ops/aten.py`` lowers ATen ops through the same rule tables as torch-level
code; this module only brings the graph into the form those rules expect
(``canonicalize``, one small rewrite per step):

* parameters are ``get_attr`` nodes named ``module.weight`` (``ep.module()``
  unlifts them so), one placeholder (the input), and an output that is one node
  rather than a pytree;
* no runtime guards or shape assertions (``_guards_fn``, ``aten._assert_*``);
* a linear layer in core ATen, ``addmm(b, x, t(W))`` or ``mm(x, t(W))``, is
  ``aten.linear(x, W, b)`` again, so input layers and the readout are found by
  the rule of ``F.linear``; on a sequence ``(B, T, d)`` core ATen folds the positions
  into the batch (``view(linear(view(x, [B*T, d])), [B, T, n])``): that is
  ``aten.linear(x, W, b)`` too, the matrix at every position;
* views that hold the batch size the program was exported with read it from the
  input instead, so the fixed-input computation (``prep``) runs on any batch.

``graph_of`` is the one entry point of both frontends: an ``nn.Module`` is
traced with torch.fx (``trace.py``), and exported instead when fx cannot trace
it (Python control flow on shapes, say); the ATen nodes keep the user's
``stack_trace``, so errors still name the source line.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError
from .trace import trace

aten = torch.ops.aten

__all__ = ["Graph", "graph_of", "export_module", "from_exported", "is_exported_program"]


class Graph:
    """What ``compile`` needs from a frontend.

    ``gm``: the GraphModule the lowering reads (None while an export waits for
    the input shape); ``module``: the ``nn.Module`` whose parameters it holds;
    ``name``: the user's class name; ``input_shape``: the feature shape of one
    input when the frontend knows it (an exported program does).
    """

    def __init__(self, gm, module, name, input_shape=None, fx_error=None):
        self.gm, self.module, self.name = gm, module, name
        self.input_shape = input_shape
        self.fx_error = fx_error      # why torch.fx could not trace the model (export waits for a shape)

    def export(self, example: torch.Tensor) -> fx.GraphModule:
        """Export the model on ``example`` (only when fx could not trace it)."""
        if self.gm is None:
            self.gm = canonicalize(export_module(self.module, example, self.fx_error).module())
        return self.gm


def is_exported_program(obj) -> bool:
    return isinstance(obj, torch.export.ExportedProgram)


def graph_of(model, input_shape, is_rule_module) -> Graph:
    """The graph of ``model``: an ``ExportedProgram``, or an ``nn.Module`` traced with
    torch.fx, or exported with torch.export when fx cannot trace it."""
    if is_exported_program(model):
        return from_exported(model)
    if not isinstance(model, nn.Module):
        raise TypeError("ntkcompile.compile expects an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    try:
        return Graph(trace(model, is_rule_module), model, type(model).__name__)
    except TraceError as err:
        if getattr(err, "export_would_too", False):
            raise
        graph = Graph(None, model, type(model).__name__, fx_error=err)
    if input_shape is not None:      # else exported on the first call, when the shape is known
        graph.export(torch.zeros((2,) + tuple(input_shape), dtype=_dtype(model)))
    return graph


def from_exported(ep) -> Graph:
    """The graph of an ``ExportedProgram`` (``torch.export.export`` or ``torch.export.load``)."""
    gm = canonicalize(ep.module())
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    shape = tuple(val.shape[1:]) if isinstance(val, torch.Tensor) else None
    if shape is not None and not all(isinstance(s, int) for s in shape):
        shape = None                 # exported with dynamic feature axes: fixed by the first call
    return Graph(gm, gm, _class_name(ep, gm), shape)


def export_module(model: nn.Module, example: torch.Tensor, fx_error: Optional[Exception] = None):
    """``torch.export.export(model, (example,))`` with a dynamic batch axis where torch allows it."""
    dims = [None]
    Dim = getattr(torch.export, "Dim", None)
    if Dim is not None:
        dims.insert(0, {0: getattr(Dim, "AUTO", None) or Dim("batch")})
    errors = []
    with _quiet():        # a failed attempt logs whole graphs; the error below says what failed
        for dim in dims:
            try:
                shapes = None if dim is None else (dim,)
                return torch.export.export(model, (example,), dynamic_shapes=shapes)
            except Exception as e:   # torch.export raises many types; the last one is reported
                errors.append(e)
    why = str(fx_error).splitlines()[0] if fx_error else f"{type(model).__name__} was not traced with torch.fx"
    raise TraceError(
        f"{why}; torch.export could not export it either: "
        f"{type(errors[-1]).__name__}: {str(errors[-1]).strip().splitlines()[0]}\n"
        "ntkcompile needs a forward pass that one of them can capture (no control flow on "
        "tensor values; control flow on shapes and Python attributes is fine for torch.export)."
    ) from errors[-1]


@contextlib.contextmanager
def _quiet():
    """No log records below CRITICAL (torch sets its own loggers' levels, so this is global) and
    nothing on stderr (a failed export prints its partial graph there)."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL - 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(before)


# --------------------------------------------------------------------------- #
# canonicalize: one rewrite per step
# --------------------------------------------------------------------------- #

def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """``ep.module()`` rewritten into the form the lowering rules expect (see the module docstring)."""
    graph = gm.graph
    for step in (_drop_guards, _single_output, _fuse_linear, _linear_over_positions, _batch_from_input):
        step(gm, graph)
    graph.eliminate_dead_code()
    graph._codegen = fx.graph.CodeGen()        # plain positional inputs, not a pytree
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, _ in list(out.named_children()):
        if name == "_guards_fn":
            delattr(out, name)
    return out


def _drop_guards(gm, graph):
    """Runtime checks of the exported input (they return nothing the model uses)."""
    for node in list(graph.nodes):
        if node.users:
            continue
        target = str(node.target)
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and ("_assert" in target or "constrain_range" in target)):
            graph.erase_node(node)


def _single_output(gm, graph):
    """``return (y,)`` -> ``return y``."""
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        out.args = (value[0],)


_TRANSPOSES = {aten.t.default: None, aten.permute.default: [1, 0], aten.transpose.int: None,
               aten.numpy_T.default: None}


def _param_transpose(node) -> Optional[fx.Node]:
    """``W`` for a node ``t(W)`` / ``permute(W, [1, 0])`` / ``transpose(W, 0, 1)`` of a 2-D attribute."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    w = node.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if node.target is aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    return w


def _fuse_linear(gm, graph):
    """``addmm(b, x, t(W))`` -> ``linear(x, W, b)``; ``mm(x, t(W))`` -> ``linear(x, W)`` (core ATen)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, wt = node.args[:3]
        else:
            (x, wt), bias = node.args[:2], None
        w = _param_transpose(wt)
        if w is None or (bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr")):
            continue
        with graph.inserting_before(node):
            args = (x, w) if bias is None else (x, w, bias)
            linear = graph.call_function(aten.linear.default, args)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        if not wt.users:
            graph.erase_node(wt)


_VIEWS = tuple(op for op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                             aten.expand.default) if op is not None)
_RESHAPES = _VIEWS[:3]


def _shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _linear_over_positions(gm, graph):
    """``view(linear(view(x, [B*T, d]), W, b), [B, T, n])`` -> ``linear(x, W, b)`` (core ATen)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default or len(node.users) != 1:
            continue
        flat, out = node.args[0], next(iter(node.users))
        if not (isinstance(flat, fx.Node) and flat.target in _RESHAPES and out.target in _RESHAPES):
            continue
        x = flat.args[0]
        xs, fs, os_ = _shape(x), _shape(flat), _shape(out)
        try:
            fits = (None not in (xs, fs, os_) and len(xs) > 2 and xs[:-1] == os_[:-1] and len(fs) == 2
                    and fs[0] == math.prod(xs[:-1]) and fs[1] == xs[-1])
        except Exception:     # symbolic sizes that cannot be compared without a guard
            fits = False
        if not fits:
            continue
        with graph.inserting_before(out):
            linear = graph.call_function(aten.linear.default, (x, *node.args[1:]), dict(node.kwargs))
        linear.meta = dict(out.meta)
        out.replace_all_uses_with(linear)
        graph.erase_node(out)
        graph.erase_node(node)
        if not flat.users:
            graph.erase_node(flat)


def _batch_from_input(gm, graph):
    """A view whose shape holds the exported batch size ``B`` literally reads ``x.size(0)``.

    Only the leading entry of views of tensors whose leading axis is ``B`` is
    rewritten (the batch axis of every tensor computed from the input).
    """
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if not (isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[0], int)):
        return
    batch, size = val.shape[0], None
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS or len(node.args) < 2:
            continue
        shape, src = node.args[1], node.args[0]
        src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not (isinstance(shape, (list, tuple)) and shape and shape[0] == batch and type(shape[0]) is int
                and isinstance(src_val, torch.Tensor) and src_val.dim() >= 1 and src_val.shape[0] == batch):
            continue
        if size is None:
            with graph.inserting_after(inputs[0]):
                size = graph.call_function(aten.sym_size.int, (inputs[0], 0))
            size.meta["val"] = batch
        node.args = (src, [size, *shape[1:]], *node.args[2:])


def _class_name(ep, gm) -> str:
    """The user's class name, from the module stack torch.export records."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, cls = next(iter(stack.values()))
            if path == "":
                return str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
    return type(ep).__name__


def _dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32)
