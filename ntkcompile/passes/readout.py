"""Readout discovery: the model output must be a readout ``Linear`` of a width vector.

Width is decided by data flow, never by sizes (a hidden width may equal the input
dimension): the model input and anything computed from fixed values alone is
fixed; a Linear applied to a fixed value is an input layer, whose output is
width.  The model output must be fixed, so walking back from the output through
shape-only ops and scaling by numbers must reach a Linear applied to a width
vector: the **readout** (TP II Sec. 3, "Readout").  Anything else there (a width
average, a nonlinearity of the output) has no readout matrix and fails the
Simple GIA Check.

``SHAPE_ONLY`` is the one list of ops that only reshape (filled by
``passes.lower.rule(..., shape_only=True)``); ``POST_READOUT_SCALE`` maps other
ops allowed after the readout (scaling by a number) to their factor.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import GIACheckError, UnsupportedOpError
from ..trace import describe, source_line

SHAPE_ONLY: set = set()          # module types, callables and method names of shape-only ops
LINEAR_FUNCTIONS: set = {F.linear}   # functions called as F.linear(x, weight, bias) (ops/aten.py adds aten.linear)
POST_READOUT_SCALE: dict = {}    # key -> (node, module or None) -> factor, or None if not allowed


def _key(node: fx.Node, modules):
    return type(modules[node.target]) if node.op == "call_module" else node.target


def output_scale(node: fx.Node, modules) -> "float | None":
    """Factor by which a post-readout op scales the output, or None if it is not allowed."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    key = _key(node, modules)
    try:
        if key in SHAPE_ONLY:
            return 1.0
        fn = POST_READOUT_SCALE.get(key)
    except TypeError:          # an unhashable target
        return None
    if fn is None:
        return None
    return fn(node, modules.get(node.target) if node.op == "call_module" else None)


def is_linear_node(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Linear)
    try:
        return node.op == "call_function" and node.target in LINEAR_FUNCTIONS
    except TypeError:          # an unhashable target
        return False


def find_readout(gm: fx.GraphModule):
    """Return ``(readout_node, post_nodes, scale)`` for the model output.

    ``post_nodes`` are the shape/scale ops between the readout and the output.
    """
    modules = dict(gm.named_modules())
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    out = outputs[0].args[0]
    if not isinstance(out, fx.Node):
        raise UnsupportedOpError(
            "ntkcompile supports models that return a single tensor; this model returns "
            f"{type(out).__name__}. Return the network output only."
        )
    node, scale, post = out, 1.0, []
    while True:
        if is_linear_node(node, modules):
            return node, post, scale
        s = output_scale(node, modules)
        if s is None:
            raise GIACheckError(
                f"The model output is computed by {describe(node)} at {source_line(node)}, not by a "
                "readout Linear. The Simple GIA Check needs the output to be f = v.x/sqrt(n) for a "
                "fresh readout matrix v used nowhere else (TP II Sec. 4); a width average, a "
                "nonlinearity applied to the output, or an output without a final Linear has "
                "no infinite-width NTK of this form. End the network with nn.Linear(width, out)."
            )
        post.append(node)
        scale *= s
        node = next(a for a in node.args if isinstance(a, fx.Node))
