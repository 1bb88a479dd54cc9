"""Frontend: trace a user's ``nn.Module`` into a torch.fx graph.

Modules that have a Tensor Program rule (``passes.lower.MODULE_RULES``) stay
leaves; everything else is traced through, so user-defined containers and
custom ``forward`` methods work as written.  Stack traces are recorded so every
later error can point at the user's source line.
"""
from __future__ import annotations

import os
import re

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError


class _Tracer(fx.Tracer):
    def __init__(self, is_rule_module):
        super().__init__()
        self.record_stack_traces = True
        self._is_rule_module = is_rule_module

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_rule_module(m)


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
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "ntkcompile needs a forward pass that torch.fx can trace symbolically "
            "(no data-dependent control flow)."
        ) from e
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
