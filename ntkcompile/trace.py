"""Frontend: trace a user's ``nn.Module`` into a torch.fx graph.

Modules that have a Tensor Program rule (``passes.lower.MODULE_RULES``) stay
leaves; everything else is traced through, so user-defined containers and
custom ``forward`` methods work as written.  Stack traces are recorded so every
later error can point at the user's source line.

Functions registered as nonlinearities (``leaf_function``, called by
``ntkcompile.register_elementwise``) stay single ``call_function`` nodes, as
``torch.fx.wrap`` would keep them, without the user calling it: while the root
``forward`` runs, every name through which a ``forward`` can reach such a
function (its module's globals, its closure variables, module attributes, and
the function's own module, for ``mylib.fn(x)``) is bound to a wrapper that
records the call.  A function reached any other way is traced into; that is
detected from the nodes' stack traces and reported with the ``torch.fx.wrap``
line to add.
"""
from __future__ import annotations

import functools
import os
import re
import traceback
import types

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError, UnsupportedOpError


# id -> function: user nonlinearities, found by identity (the registry holds them alive)
LEAF_FUNCTIONS: dict = {}


def leaf_function(fn) -> None:
    """Trace every call of ``fn`` as one ``call_function`` node (see the module docstring)."""
    LEAF_FUNCTIONS[id(fn)] = fn


_FX_DIR = os.path.dirname(fx.__file__) + os.sep      # fx's own frames: not the user's code


class _Tracer(fx.Tracer):
    def __init__(self, is_rule_module):
        super().__init__()
        self._is_rule_module = is_rule_module

    def create_node(self, *args, **kwargs):
        # Each node's user source line, as fx's record_stack_traces would record it; fx's way
        # (CapturedTraceback) imports torch._dynamo on first use: 1.1 s of a cold start.
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            stack = traceback.extract_stack()
            first = next((i for i, f in enumerate(stack) if f.name == "forward"), len(stack))
            frames = [f for f in stack[first:] if not f.filename.startswith(_FX_DIR) and f.filename != __file__]
            if frames:
                node.stack_trace = "".join(traceback.StackSummary.from_list(frames).format()).strip()
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_rule_module(m)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # Patch inside fx's own patching (which runs between this and the call), so that
        # a name the user did torch.fx.wrap is left to fx: it no longer holds the function.
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if not LEAF_FUNCTIONS:
            return fn, args

        @functools.wraps(fn)
        def run(*a, **kw):
            undo = _bind_leaves(self, self.root)
            try:
                return fn(*a, **kw)
            finally:
                for restore in reversed(undo):
                    restore()

        return run, args


def _is_leaf(value) -> bool:
    return id(value) in LEAF_FUNCTIONS and LEAF_FUNCTIONS[id(value)] is value


def _leaf(tracer, fn):
    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
            return tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)
    return leaf


def _bind_leaves(tracer, root):
    """Bind every name through which a ``forward`` can reach a registered function to
    ``_leaf``; returns the functions that undo it."""
    spaces, cells = {}, []
    for m in root.modules():
        spaces[id(m.__dict__)] = m.__dict__
        for f in (getattr(type(m), "forward", None), m.__dict__.get("forward")):
            f = getattr(f, "__func__", f)
            if isinstance(f, types.FunctionType):
                spaces[id(f.__globals__)] = f.__globals__
                cells += f.__closure__ or ()
    for fn in LEAF_FUNCTIONS.values():
        if isinstance(getattr(fn, "__globals__", None), dict):
            spaces[id(fn.__globals__)] = fn.__globals__
    undo = []
    for space in spaces.values():
        for name, value in list(space.items()):
            if _is_leaf(value):
                space[name] = _leaf(tracer, value)
                undo.append(functools.partial(space.__setitem__, name, value))
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:          # an empty cell
            continue
        if _is_leaf(value):
            cell.cell_contents = _leaf(tracer, value)
            undo.append(functools.partial(setattr, cell, "cell_contents", value))
    return undo


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _check_leaves(graph) -> None:
    """Refuse a trace that went *into* a registered function (it then lowers its insides)."""
    if not LEAF_FUNCTIONS:
        return
    lines = {}
    for fn in LEAF_FUNCTIONS.values():
        code = getattr(fn, "__code__", None)
        if code is not None:
            for _, _, line in code.co_lines():
                if line is not None:
                    lines[(code.co_filename, line)] = fn
    for node in graph.nodes:
        for file, line in _FRAME.findall(node.meta.get("stack_trace") or ""):
            fn = lines.get((file, int(line)))
            if fn is not None:
                name = getattr(fn, "__name__", repr(fn))
                err = TraceError(
                    f"torch.fx traced into the registered nonlinearity {name!r} ({file}, line {line}) "
                    f"instead of keeping it as one op (at node '{node.name}'). ntkcompile keeps it when "
                    "forward calls it through a global or imported name, a closure variable or a module "
                    "attribute.\n  Reached otherwise (from a container such as a list, or from a helper "
                    f"function in another module), call it by one of those names, or, for a helper, add "
                    f"torch.fx.wrap({name!r}) at the top level of the helper's module, after {name} is "
                    "defined or imported there.")
                err.export_would_too = True        # torch.export would trace into it as well
                raise err


def _refuse_packed_sequences(model, error: Exception) -> None:
    """A failure inside ``torch.nn.utils.rnn`` (``pack_padded_sequence``, ``pack_sequence``):
    variable-length batches, which the fixed time axis of a kernel cannot hold."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("torch/nn/utils/rnn.py"):
            raise UnsupportedOpError(
                f"{type(model).__name__} packs its sequences (torch.nn.utils.rnn.{tb.tb_frame.f_code.co_name}): "
                "ntkcompile's kernels have one time axis of fixed length T for every input, so packed "
                "sequences and variable lengths are not supported. Pad every sequence to the same length "
                "and pass the padded (N, T, d) tensor to the recurrent module directly, or compile one "
                "kernel per length.") from error
        tb = tb.tb_next


def trace(model: nn.Module, is_rule_module) -> fx.GraphModule:
    """Symbolically trace ``model``; ``is_rule_module(m)`` decides the leaves."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"ntkcompile.compile expects an nn.Module, got {type(model).__name__}")
    tracer = _Tracer(is_rule_module)
    try:
        graph = tracer.trace(model)
    except fx.proxy.TraceError as e:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {e}\n"
            "The forward pass must not branch on tensor values (if/while on data, "
            "x.item(), len(x) of a traced tensor). Write the architecture without "
            "data-dependent control flow, or branch on Python attributes instead."
        ) from e
    except Exception as e:  # fx raises plain exceptions for many untraceable constructs
        _refuse_packed_sequences(model, e)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "ntkcompile needs a forward pass that torch.fx can trace symbolically "
            "(no data-dependent control flow)."
        ) from e
    _check_leaves(graph)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def source_line(node: fx.Node) -> str:
    """The user's source line for ``node``: the innermost recorded frame outside torch."""
    frame = _user_frame(node)
    if frame is not None:
        where, code = frame
        return f"{where}: {code}" if code else where
    module = _module_of(node)
    if not node.meta.get("stack_trace") and module is None:
        return "<source line unavailable>"
    where = (f"module '{node.target}'" if node.op == "call_module" else
             f"module '{module[0]}' ({_short(module[1])})" if module else f"node '{node.name}'")
    return f"{where}, called from torch code (e.g. inside an nn.Sequential)"


def origin(node: fx.Node, modules=None) -> str:
    """Where a node of the user's model comes from, for the program printout: a torch module
    (``0 (Linear)``, the name as in ``model.named_modules()``), else the user's source line
    (``models.py:58  h = torch.tanh(self.a(x))``), else the node's name."""
    if node.op == "call_module":
        m = (modules or {}).get(node.target)
        return f"{node.target} ({type(m).__name__})" if m is not None else str(node.target)
    module = _module_of(node)
    if module and module[1].startswith("torch.nn."):      # inside a torch layer (exported graphs)
        return f"{module[0]} ({_short(module[1])})"
    frame = _user_frame(node)
    if frame is not None:
        where, code = frame
        m = re.match(r'File "([^"]*)", line (\d+)', where)
        place = f"{os.path.basename(m.group(1))}:{m.group(2)}" if m else where
        return f"{place}  {code}" if code else place
    return f"{module[0]} ({_short(module[1])})" if module else node.name


def _user_frame(node):
    """``('File "...", line N, in f', code)`` of the innermost recorded frame outside torch, or None."""
    st = node.meta.get("stack_trace")
    if not st:
        return None
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else "")
              for i in range(len(lines)) if lines[i].startswith("File ")]
    user = [f for f in frames if _TORCH_DIR not in f[0] and _OWN_DIR not in f[0]]
    return user[-1] if user else None


def _module_of(node):
    """``(qualified name, class path)`` of the innermost non-root module torch.export recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)
    return (path, cls) if path else None


def _short(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def describe(node: fx.Node) -> str:
    """``node 'name' (op target)`` for error messages."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):        # an ATen op (torch.export)
        target = str(target)
    elif callable(target) and not isinstance(target, str):
        target = getattr(target, "__module__", "") + "." + getattr(target, "__name__", repr(target))
    return f"node '{node.name}' ({node.op} {target})"


def is_tensor_like(x) -> bool:
    return isinstance(x, (torch.Tensor, fx.Node))
