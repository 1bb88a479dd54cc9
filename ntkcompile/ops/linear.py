"""Dense linear layers: ``nn.Linear``/``F.linear`` as input layer or hidden layer, and biases.

* Lowering: a Linear applied to a fixed input is an input layer (``GInput``, fan-in
  ``in_features``), applied to a width vector a hidden layer (``GMatMul``); the
  same module applied several times is one matrix with several uses.
* Covariances (tensor_programs.md Sec. 3): ``W_std^2 xi.xi'/d`` at the input
  layer, ``W_std^2 E[z z']`` for two uses ``W z``, ``W z'`` of one hidden matrix,
  ``b_std^2`` for a bias.
* Backward: ``Cov(W^T dy, W^T dy') = W_std^2 E[dy dy']`` for uses of one matrix.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import WidthInferenceError
from ..ir import GBias, GInput, GMatMul
from ..kernels.planner import ADJOINT, COVARIANCE, NOMINAL, SIDES, register
from ..passes.lower import Fixed, Width, module_of, rule
from ..plan import Contract, Input, SetDiagonal, ToPairs


def linear(lw, node, x, name, in_features, out_features, has_bias):
    one = lw.b.sconst(1.0)
    if isinstance(x, Width) and x.positions:
        raise lw.error(node, "nn.Linear applied to a feature map with positions acts on the last "
                       "spatial axis, not on channels; flatten or pool the positions first",
                       WidthInferenceError)
    if isinstance(x, Fixed):
        mat = lw.matrix(node, name, "input", in_features)
        terms = [(one, lw.b.make(GInput, mat, lw.fixed_index(x.node)))]
    elif isinstance(x, Width):
        mat = lw.matrix(node, name, "hidden", in_features)
        terms = [(one, lw.b.make(GMatMul, mat, x.vec))]
    else:
        raise lw.error(node, "Linear applied to a per-input scalar", WidthInferenceError)
    if has_bias:
        atom = lw.bias_atom(name + ".bias", name)
        if atom is not None:
            terms.append((one, atom))
    return lw.width(node, lw.b.single(lw.b.var(terms)), out_features)


@rule(nn.Linear, input_layer=True)
def _linear_module(lw, node, m, x):
    return linear(lw, node, x, node.target, m.in_features, m.out_features, m.bias is not None)


@rule(F.linear, input_layer=True)
def _linear_function(lw, node, x, weight, bias=None):
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if wnode.op != "get_attr":
        raise lw.unsupported(node, "F.linear with a weight that is not a module parameter")
    out_f, in_f = lw.shape(wnode)
    return linear(lw, node, x, module_of(wnode.target), in_f, out_f, bias is not None)


def input_sides(pl, a, b, pair):
    """The fixed inputs of two input-layer atoms on the sides of ``pair``."""
    left, right = SIDES[pair]
    return pl.plan.make(Input, abs(left), a.fixed), pl.plan.make(Input, abs(right), b.fixed)


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
