"""Width-axis inference: which values are width vectors, which are fixed.

Decided by data flow, never by sizes (a hidden width may equal the input
dimension):

* the model input, and anything computed from fixed values alone, is **fixed**
  (batch and feature axes; it is computed concretely at kernel time);
* a Linear applied to a fixed value is an **input layer**: its output is width;
* the model output must be fixed, so walking back from the output through
  shape-only ops (view, squeeze, flatten, scaling by a Python number) must reach
  a Linear applied to a width vector: the **readout** (TP II Sec. 3, "Readout").
  Anything else there (a width average, a nonlinearity of the output) has no
  readout matrix and fails the Simple GIA Check.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import GIACheckError, UnsupportedOpError
from ..trace import describe, source_line

# Ops allowed between the readout Linear and the model output.  Each maps the
# node to the factor it multiplies the output by (None: not transparent).
_SHAPE_METHODS = {"view", "reshape", "squeeze", "unsqueeze", "flatten", "contiguous", "clone"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.squeeze, torch.unsqueeze, torch.flatten}


def _python_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def output_scale(node: fx.Node, modules) -> "float | None":
    """Factor by which a post-readout op scales the output, or None if it is not allowed."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return 1.0
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return 1.0
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.Flatten, nn.Identity)):
            return 1.0
        if isinstance(m, nn.Dropout) and (not m.training or m.p == 0):
            return 1.0
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        a, b = node.args[:2]
        if _python_number(a):
            return float(a)
        if _python_number(b):
            return float(b)
    if node.op == "call_function" and node.target in (operator.truediv, torch.div) and _python_number(node.args[1]):
        return 1.0 / float(node.args[1])
    if node.op == "call_function" and node.target in (operator.neg, torch.neg):
        return -1.0
    return None


def is_linear_node(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Linear)
    return node.op == "call_function" and node.target is F.linear


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
