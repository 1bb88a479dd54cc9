"""Running the traced model concretely while lowering: shapes, dtypes and small values of
every node on the example input (``propagate_shapes``), and the graph that computes the
fixed inputs of the input layers at kernel time (``make_prep``)."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..errors import InputShapeError


_KEEP = 1 << 16       # values of fixed tensors up to this size are kept (``Lowering.constant``)


def propagate_shapes(gm, example):
    """Run the module once on ``example`` and record every node's output shape and dtype, and
    the values of small tensors."""
    shapes, dtypes, values = {}, {}, {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
                dtypes[n.name] = out.dtype
                if out.numel() <= _KEEP and not out.requires_grad:
                    values[n.name] = out.detach().clone()
            return out

    # on a copy: a training-mode BatchNorm would update the user's running statistics
    try:
        with torch.no_grad():
            _Rec(copy.deepcopy(gm)).run(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise InputShapeError(
            f"the model does not run on inputs of shape (N, {', '.join(map(str, example.shape[1:]))}) "
            f"and dtype {example.dtype}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. The kernel's input shape is "
            "fixed by compile(..., input_shape=...) or by the first call; inputs are (N, *shape), batch "
            "axis first") from e
    return shapes, dtypes, values


def make_prep(gm: fx.GraphModule, fixed_nodes, perms=None):
    """A GraphModule computing the fixed inputs of the input layers from the input, each
    permuted by its ``perms`` entry and in the input's dtype (the kernel's: a cast to
    float32 or to integers inside the model does not reach the kernel's arithmetic)."""
    graph = fx.Graph()
    env = {}
    needed = set()
    stack = list(fixed_nodes)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    x = None
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
            x = env[n] if n.op == "placeholder" else x
    dtype = graph.call_function(getattr, (x, "dtype"))
    outs = []
    for n, perm in zip(fixed_nodes, perms or [None] * len(fixed_nodes)):
        out = env[n] if perm is None else graph.call_method("permute", (env[n], *perm))
        outs.append(graph.call_method("to", (out, dtype)))
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph)


class BatchPrep:
    """The fixed inputs of a batch-coupled model (``Lowering(..., batch=sizes)``): the kernel's
    one input ``(1, B1 + B2 + ..., *shape)`` holds the batches side by side; ``prep`` (the
    fixed graph, unpermuted) runs on each batch alone, so that statistics of the input
    (``x - x.mean(0)``) are each batch's own, and each fixed tensor ``(B, d)`` becomes one input
    with the examples as positions, permuted by its ``perms`` entry (``(1, d, B)`` for a Linear)."""

    def __init__(self, prep, sizes, perms):
        self.prep, self.sizes, self.perms = prep, tuple(sizes), list(perms)

    def __call__(self, x):
        if x.shape[0] != 1 or x.shape[1] != sum(self.sizes):
            raise ValueError(f"internal error: a batch-coupled kernel got inputs {tuple(x.shape)} for batches "
                             f"{self.sizes}")
        parts, start = [], 0
        for b in self.sizes:
            parts.append(self.prep(x[0, start:start + b]))
            start += b
        outs = []
        for k, perm in enumerate(self.perms):
            t = torch.cat([p[k] for p in parts]).unsqueeze(0)
            outs.append(t if perm is None else t.permute(*perm))
        return tuple(outs)
