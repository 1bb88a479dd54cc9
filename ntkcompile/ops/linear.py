"""Dense linear layers: ``nn.Linear``/``F.linear`` as input layer or hidden layer, and biases.

* Lowering: a Linear applied to a fixed input is an input layer (``GInput``, fan-in
  ``in_features``), applied to a width vector a hidden layer (``GMatMul``); the
  same module applied several times is one matrix with several uses.
* A Linear acts on the last axis; any other axes between the batch and it are
  positions (a sequence ``(N, T, d)``, layout ``("n", 0, "w")``): the same matrix at
  every position, i.e. a 1x1 convolution over the positions (``GConvInput``/``GConv``
  of ``ops/conv.py`` with a kernel-1 geometry; a fixed input is read as ``(N, d, *P)``),
  and the layout is kept.  A Linear on a feature map ``(N, C, H, W)`` acts on ``W``,
  a position axis: refused.
* A Linear applied to zeros (``torch.zeros``, ``x.new_zeros``: a hand-written RNN's
  initial state) is its bias alone.
* Covariances (tensor_programs.md Sec. 3): ``W_std^2 xi.xi'/d`` at the input
  layer, ``W_std^2 E[z z']`` for two uses ``W z``, ``W z'`` of one hidden matrix,
  ``b_std^2`` for a bias.
* Backward: ``Cov(W^T dy, W^T dy') = W_std^2 E[dy dy']`` for uses of one matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WidthInferenceError
from ..ir import ConvGeometry, GBias, GInput, GMatMul
from ..kernels.planner import ADJOINT, COVARIANCE, NOMINAL, register
from ..passes.lower import FLATTEN_READERS, Fixed, Width, module_of, rule
from ..plan import Contract, SetDiagonal, ToPairs
from .conv import GConv, GConvInput, input_sides
from .positions import map_positions

_aten = torch.ops.aten
_ZEROS = {torch.zeros, torch.zeros_like, _aten.zeros.default, _aten.zeros_like.default,
          _aten.new_zeros.default, "new_zeros", "zero_"}


def is_zeros(value) -> bool:
    """True if ``value`` is a fixed tensor made by ``torch.zeros``-like ops (a hand-written
    RNN's initial state: ``W h0 = 0``, ``z * h0 = 0``)."""
    node = value.node if isinstance(value, Fixed) else None
    try:
        return node is not None and node.op in ("call_function", "call_method") and node.target in _ZEROS
    except TypeError:
        return False


def _positions(lw, node, x):
    """The positions a Linear maps at, and the layout of its output: the axes between the
    batch and the last axis, which the matrix acts on."""
    if isinstance(x, Width):
        if x.positions and x.axes[-1] != "w":
            raise lw.error(node, "nn.Linear applied to a width vector whose last axis is a fixed axis (positions) "
                           "acts on that axis, not on the width: a Linear over a fixed axis (MLP-Mixer's token "
                           "mixing) is a finite random matrix, with no deterministic infinite-width kernel. For "
                           "a map of channels, flatten or pool the positions first, or move the channels last "
                           "(x.permute(0, 2, 3, 1))", WidthInferenceError)
        return x.positions, x.layout
    shape = tuple(lw.shape(x.node))
    if lw.batch is not None:         # a batch-coupled model: the examples are positions
        return shape[:1], (0, "w")
    positions = shape[1:-1]
    return positions, ("n", *range(len(positions)), "w") if positions else None


def _flattened(lw, node, x, name, in_features, out_features, bias_name):
    """A hidden Linear on ``flatten(1)`` of a feature map ``(N, C, *P)``: every position has
    its own block of the matrix, which is a convolution whose kernel covers the whole map
    (fan-in ``C |P|``, no padding, one output position) -- then read as a vector."""
    fmap = Width(x.vec, x.size, x.pooled)
    geom = ConvGeometry.make(x.pooled, 1, 0, 1, x.pooled)
    mat = lw.matrix(node, name, "hidden", in_features, geom)
    terms = [(lw.b.sconst(1.0), lw.b.make(GConv, mat, fmap.vec))]
    conv = lw.width(node, lw.b.single(lw.b.var(terms)), out_features, geom.out_shape)
    out = map_positions(lw, node, conv, {}, "the one position of a full-map convolution",
                        {k: False for k in range(len(geom.out_shape))})
    if bias_name is not None:
        atom = lw.bias_atom(bias_name, name, (), node)
        if atom is not None:
            vec = lw.b.lincomb([(lw.b.sconst(1.0), out.vec), (lw.b.sconst(1.0), lw.b.single(lw.b.atom_var(atom)))])
            out = lw.width(node, vec, out_features, ())
    return out


def linear(lw, node, x, name, in_features, out_features, bias_name):
    """``W x + b`` of module ``name`` (its bias parameter ``bias_name``, or None)."""
    one = lw.b.sconst(1.0)
    if not isinstance(x, (Fixed, Width)):
        raise lw.error(node, "Linear applied to a per-input scalar", WidthInferenceError)
    if isinstance(x, Width) and x.pool == "flatten":
        return _flattened(lw, node, x, name, in_features, out_features, bias_name)
    if isinstance(x, Width) and x.pool:
        raise RuntimeError(f"internal error: a Linear got positions pooled for the readout ({x.pool})")
    positions, layout = _positions(lw, node, x)
    nd = len(positions)
    geom = ConvGeometry.make((1,) * nd, 1, 0, 1, positions) if positions else None
    terms = []
    if isinstance(x, Fixed) and not is_zeros(x):
        mat = lw.matrix(node, name, "input", in_features, geom)
        if geom is None:
            terms.append((one, lw.b.make(GInput, mat, lw.fixed_index(x.node))))
        else:        # read as (N, d, *P), a 1x1 convolution's input
            index = lw.fixed_index(x.node, 2 + nd, perm=(0, nd + 1, *range(1, nd + 1)))
            terms.append((one, lw.b.make(GConvInput, mat, index)))
    elif isinstance(x, Width):
        mat = lw.matrix(node, name, "hidden", in_features, geom)
        terms.append((one, lw.b.make(GMatMul if geom is None else GConv, mat, x.vec)))
    if bias_name is not None:
        atom = lw.bias_atom(bias_name, name, positions, node)
        if atom is not None:
            terms.append((one, atom))
    return lw.width(node, lw.b.single(lw.b.var(terms)), out_features, positions, layout=layout)


FLATTEN_READERS.update({nn.Linear, F.linear})


@rule(nn.Linear, input_layer=True, batch_safe=True)
def _linear_module(lw, node, m, x):
    bias = node.target + ".bias" if m.bias is not None else None
    return linear(lw, node, x, node.target, m.in_features, m.out_features, bias)


@rule(F.linear, input_layer=True, batch_safe=True)
def _linear_function(lw, node, x, weight, bias=None):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if wnode.op != "get_attr":
        raise lw.unsupported(node, "F.linear with a weight that is not a module parameter")
    if bnode is not None and getattr(bnode, "op", None) != "get_attr":
        raise lw.unsupported(node, "F.linear with a bias that is not a parameter (add it to the output instead)")
    out_f, in_f = lw.shape(wnode)
    return linear(lw, node, x, module_of(wnode.target), in_f, out_f, None if bnode is None else bnode.target)


@register(COVARIANCE, GInput)
def _input_cov(pl, a, b, pair):
    """``W_std^2 xi.xi' / fan_in``."""
    fa, fb = input_sides(pl, a, b, pair)
    W2n = a.param.W_std ** 2 / a.param.fan_in
    shapes = ((NOMINAL, a.param.fan_in),) * 2
    if pair != "x":
        return pl.plan.mul(W2n, pl.plan.make(Contract, "ad,ad->a", (fa, fb), shapes))
    dot = pl.plan.make(ToPairs, pl.plan.make(Contract, "ad,bd->ab", (fa, fb), shapes))
    if a is b:
        # the diagonal of x1 against itself is bit-identical to the same-input
        # variances, so c = 1 exactly there (arccos amplifies rounding ~1e-8)
        same = pl.plan.make(Contract, "ad,ad->a", (fa, fa), shapes)
        dot = pl.plan.make(SetDiagonal, dot, same, False)
    return pl.plan.mul(W2n, dot)


@register(COVARIANCE, GMatMul)
def _matmul_cov(pl, a, b, pair):
    """``W_std^2 E[z z']`` for two uses ``W z``, ``W z'`` of one matrix (weight sharing)."""
    inner = yield from pl.cov(a.arg, b.arg, pair)
    return pl.plan.mul(a.param.W_std ** 2, inner)


@register(COVARIANCE, GBias)
def _bias_cov(pl, a, b, pair):
    return a.param.b_std ** 2


@register(ADJOINT, GMatMul)
def _matmul_adjoint(pl, u, w):
    """``Cov(W^T dy, W^T dy') = W_std^2 D(y, y')`` for two uses of one matrix."""
    if u.param is not w.param:
        return None
    d = yield from pl.D(u, w)
    return pl.plan.mul(u.param.W_std ** 2, d)
