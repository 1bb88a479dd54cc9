"""Embeddings: ``nn.Embedding`` / ``F.embedding`` of integer token inputs.

PyTorch initializes an embedding's rows as ``w ~ N(0, 1)``; here the row of token
``i`` is ``W_std * w_i`` (no fan-in factor: one row is read per token), trained with
respect to ``w``.  The embedding of the tokens is an input layer whose G-var at
position ``s`` is the row of ``tok_s``, so (TP II Sec. 3, different rows independent)

    E[e_s e'_t] = W_std^2 [tok_s == tok'_t]        (0 for a ``padding_idx`` token: its row is 0)

and the weight's NTK term is ``W_std^2 sum_{s,t} [tok_s == tok'_t] D_{st}``.  It is the
input layer ``Linear(V, n, bias=False)`` on one-hot tokens with
``W_std_linear = W_std sqrt(V)``, without the one-hot arrays.  Tokens ``(N,)`` give a
vector, ``(N, *P)`` a vector with positions ``P`` (layout ``("n", 0, ..., "w")``), which
a Linear maps at every position and ``mean``/``x[:, -1]`` read (``ops/positions.py``).

The model then takes integer inputs: compile runs it on integer examples (the op is
registered with ``integer_input=True``), and ``kfn(tokens)`` takes ``(N, *P)`` integer
(or integral float) tensors, ``(N,)`` included.  ``max_norm`` (renormalized rows) and
``scale_grad_by_freq`` (a different gradient) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import nn

from ..errors import WidthInferenceError
from ..ir import GInput, node
from ..kernels import tokens
from ..kernels.planner import COVARIANCE, SAME_INPUT, register
from ..passes.lower import Fixed, module_of, rule
from ..plan import ToPairs
from .conv import input_sides


@dataclass(frozen=True)
class Vocabulary:
    """An embedding table's geometry (``Matrix.geometry``): its number of rows, its padding
    token, and the positions of the token arrays it reads (``in_shape``)."""
    size: int
    padding_idx: Optional[int]
    in_shape: tuple

    @property
    def out_shape(self) -> tuple:
        return self.in_shape


@node
class GEmbed(GInput):
    """``E[tok]``: the rows of embedding ``param`` at the tokens of fixed input ``fixed``."""
    homogeneous = False          # scaling token ids does not scale the rows

    def positions(self, positions_of):
        return self.param.geometry.out_shape

    def describe(self, show):
        return f"E[{self.param.name}][x{self.fixed}]    # G (embedding rows of the tokens)"

    def check(self, program):
        dims = program.fixed_dims[self.fixed] if 0 <= self.fixed < len(program.fixed_dims) else None
        if not isinstance(self.param.geometry, Vocabulary) or tuple(dims or ()) != self.param.geometry.in_shape:
            return [f"reads tokens of shape {dims} with an embedding for positions "
                    f"{getattr(self.param.geometry, 'in_shape', None)}"]
        return []


def embedding(lw, node, x, name, num_embeddings, dim, padding_idx, max_norm, scale_grad_by_freq):
    if max_norm is not None:
        raise lw.unsupported(node, "an embedding with max_norm (rows renormalized to a fixed norm have "
                             "coordinates of order 1/sqrt(width))")
    if scale_grad_by_freq:
        raise lw.unsupported(node, "an embedding with scale_grad_by_freq (its gradient, and so its NTK, "
                             "depends on the token counts of each batch)")
    if not isinstance(x, Fixed):
        raise lw.error(node, "an embedding of a width vector: its input must be integer tokens",
                       WidthInferenceError)
    shape = tuple(lw.shape(x.node))
    positions = shape[1:]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_embeddings
    mat = lw.matrix(node, name, "input", 1, Vocabulary(num_embeddings, padding_idx, positions))
    atom = lw.b.make(GEmbed, mat, lw.fixed_index(x.node, len(shape)))
    layout = ("n", *range(len(positions)), "w") if positions else None
    return lw.width(node, lw.b.single(lw.b.atom_var(atom)), dim, positions, layout=layout)


@rule(nn.Embedding, input_layer=True, integer_input=True)
def _embedding_module(lw, node, m, x):
    return embedding(lw, node, x, node.target, m.num_embeddings, m.embedding_dim, m.padding_idx, m.max_norm,
                     m.scale_grad_by_freq)


def embedding_of(lw, node, x, wnode, padding_idx=None, max_norm=None, scale_grad_by_freq=False):
    """The embedding with weight ``wnode`` (a parameter's fx node) of the tokens ``x``."""
    if getattr(wnode, "op", None) != "get_attr":
        raise lw.unsupported(node, "an embedding whose weight is not a parameter")
    rows, dim = lw.shape(wnode)
    return embedding(lw, node, x, module_of(wnode.target), rows, dim, padding_idx, max_norm, scale_grad_by_freq)


@rule(F.embedding, input_layer=True, integer_input=True)
def _embedding_function(lw, node, x, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    return embedding_of(lw, node, x, wnode, padding_idx, max_norm, scale_grad_by_freq)


@register(COVARIANCE, GEmbed)
def _embed_cov(pl, a, b, pair):
    """``W_std^2 [tok_s == tok'_t]`` (same embedding: ``a.param is b.param``)."""
    voc = a.param.geometry
    W2 = a.param.W_std ** 2
    pad = -1 if voc.padding_idx is None else voc.padding_idx
    fa, fb = input_sides(pl, a, b, pair)
    k = len(voc.in_shape)
    if pair in SAME_INPUT:      # an array over positions, even without padding (a convolution reads it)
        return W2 if pad < 0 and k == 0 else pl.plan.mul(W2, pl.call(tokens.same_tokens, fa, pad, pl.like))
    if pair in ("f1", "f2"):
        return pl.plan.mul(W2, pl.call(tokens.token_pairs_same, fa, k, pad, pl.like))
    if pl.diag:
        cross = pl.call(tokens.token_aligned, fa, fb, pad, pl.like)
    else:
        cross = pl.call(tokens.token_pairs, fa, fb, k, pad, pl.like)
    return pl.plan.mul(W2, pl.plan.make(ToPairs, cross))
