"""Attention and softmax: what has no Gaussian limit is refused, saying why and what does.

* Logits scaled by ``1/sqrt(d)`` (``nn.MultiheadAttention``, the ``nn.Transformer*``
  layers, ``F.scaled_dot_product_attention``'s default): ``q.k / sqrt(d)`` is a sum of
  ``d`` products of O(1) coordinates over ``sqrt(d)``, an O(1) *random* number at any
  width, so with a fixed number of heads the attention weights never become
  deterministic and the network has no Gaussian infinite-width limit (the NTK limit
  needs infinitely many heads, Hron et al. 2020).
* Logits scaled by ``1/n`` (Tensor Programs): ``q.k / n`` converges to ``E[Z^q Z^k]``,
  attention becomes a deterministic average over positions.  Not compiled yet: refused
  with that explanation, so that no kernel ignores the op.
* ``softmax`` over the width axis is not coordinatewise: every coordinate is O(1/n).
  Over positions it is attention's weights (above).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from ..passes.lower import Width, rule

_ONE_OVER_N = ("Tensor Programs' limit scales the logits by 1/n instead (n the width: "
               "torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], -1) @ v, or "
               "F.scaled_dot_product_attention(q, k, v, scale=1 / q.shape[-1])), where they converge to "
               "deterministic numbers; ntkcompile does not compile attention in that form yet either")

_SQRT = ("{what} scales the attention logits by 1/sqrt(head_dim): q.k/sqrt(d) stays an O(1) random number "
         "at any width, so with a fixed number of heads the attention weights never become deterministic "
         "and the network has no Gaussian infinite-width limit (its NTK limit needs infinitely many heads, "
         "Hron et al. 2020). " + _ONE_OVER_N + ".")


def _refuse(lw, node, what):
    raise lw.error(node, _SQRT.format(what=what), UnsupportedOpError)


@rule(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
      nn.TransformerDecoder, nn.Transformer)
def _attention_module(lw, node, m, *args, **kwargs):
    _refuse(lw, node, f"nn.{type(m).__name__}")


@rule(F.multi_head_attention_forward)
def _mha_function(lw, node, *args, **kwargs):
    _refuse(lw, node, "F.multi_head_attention_forward")


@rule(F.scaled_dot_product_attention)
def _sdpa(lw, node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if scale is None:
        _refuse(lw, node, "F.scaled_dot_product_attention without scale=")
    raise lw.error(node, f"F.scaled_dot_product_attention with scale={scale}: attention is not compiled yet. "
                   "With scale=1/n (n the width) its limit is deterministic (Tensor Programs), with any "
                   "other scale it has no Gaussian limit at a fixed number of heads.", UnsupportedOpError)


@rule(torch.softmax, F.softmax, "softmax", torch.log_softmax, F.log_softmax, "log_softmax")
def _softmax(lw, node, x, dim=None, *args, **kwargs):
    if not isinstance(x, Width) or dim is None:
        raise lw.unsupported(node, "a softmax of a value that is not a width vector")
    role = x.axes[dim % len(x.axes)]
    if role == "w":
        raise lw.error(node, "a softmax over the width axis is not a coordinatewise function (every "
                       "coordinate is O(1/n) and depends on all others): it has no Tensor Program limit as "
                       "written. Apply softmax to the model's outputs instead (after the readout, e.g. in "
                       "the loss: simulate(loss='cross_entropy')).", UnsupportedOpError)
    raise lw.error(node, "a softmax over positions of a width vector (a nonlinearity of each coordinate's "
                   "values at every position) is not compiled yet. If these are attention logits: attention "
                   "logits are per-input numbers q.k/n, not width vectors. " + _ONE_OVER_N + ".",
                   UnsupportedOpError)


@rule(torch.matmul, "matmul", torch.bmm, "bmm", operator.matmul)
def _matmul(lw, node, a, b, *args, **kwargs):
    if isinstance(a, Width) and isinstance(b, Width):
        raise lw.error(node, "a product of two width vectors over the width axis (attention logits q @ k^T): "
                       "its entries are sums over n coordinates. " + _ONE_OVER_N + ".", UnsupportedOpError)
    raise lw.unsupported(node, "a matrix product with a width vector (use nn.Linear for a learned map; a "
                         "fixed matrix over positions, e.g. MLP-Mixer's token mixing as a Linear over a "
                         "fixed axis, is a finite random matrix with no deterministic limit)")
