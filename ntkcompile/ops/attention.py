"""Attention: the Tensor Program limit with logits scaled by 1/n, and refusals of what has none.

* Logits scaled by ``1/n`` (Tensor Programs; ``n`` the width the logits sum over):
  ``L_st = q_s . k_t / n`` converges to the deterministic ``E[Z^{q_s} Z^{k_t}]`` of each
  input, so the attention weights ``A = softmax_t(c L + mask)`` are a fixed ``(Tq, Tk)``
  matrix per input and the output ``o_s = sum_t A_st v_t`` is a linear map of the value
  vectors' positions (``GAttend``): Gaussian when ``v`` is, with covariances
  ``E[o_s o'_u] = sum_{t,r} A_st A'_ur E[v_t v'_r]`` (``kernels/attention.py``).  Query and
  key from one matrix (``q = k``) give logits ``E[Z^{q_s} Z^{q_t}]``, the covariance of the
  input's own positions; from independent matrices the limit logits are 0 and attention
  is uniform (over the positions a mask allows).
* The NTK: the logits' dependence on the parameters vanishes.  ``dL_st/dW^q_ij =
  q-side input_j k_t,i / (n sqrt(n))`` with ``df/dL_st = O(1)``, so the query and key
  matrices' NTK term is ``n^2`` entries of ``O(n^-3)``: ``O(1/n)``; the logits' gradient
  reaching earlier vectors is ``O(1/n)`` per coordinate against ``O(1/sqrt(n))`` through
  the values, a cross term ``O(1/sqrt(n))``.  So in the limit ``A`` is a constant in the
  backward (as NTK4A treats it): ``dv = A^T do``, and ``W^q, W^k`` add nothing to the NTK
  (they appear only inside the weights' scalar ``SAttn``, which the backward pass treats
  like every moment).  Finite-width NTKs converge to this at rate ``n^-1/2``.
* Several heads: the width reshaped to ``(H, n / H)`` (``q.view(N, T, H, -1).transpose(1, 2)``)
  is ``H`` blocks of the width stacked along a position axis (``ops/stack.py``), each head's
  logits are those of its own blocks (``n`` is then the head's width), and the weights act
  on the flattened positions ``(H, T)`` with ``-inf`` between different heads.  With one
  mask for all heads the heads' limit logits are equal (independent copies of one law), so
  they attend alike; a mask per head (``(H, T, T)``) makes them differ.
* ``c = scale * n`` is the temperature, held fixed as the width grows.  Logits without any
  scaling (``c = n``) are refused as an unknown scale; ``1/sqrt(n)`` (``nn.MultiheadAttention``,
  ``nn.Transformer*``, SDPA's default) is refused: ``q.k / sqrt(d)`` stays an O(1) *random*
  number at any width, so with a fixed number of heads the attention weights never become
  deterministic and there is no Gaussian limit (it needs infinitely many heads, Hron et al.
  2020).
* ``softmax`` over the width axis is not coordinatewise (every coordinate is O(1/n)).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError, WidthInferenceError
from ..ir import Scalar, node
from ..kernels import attention as ka
from ..kernels.planner import ADJOINT, COVARIANCE, MEAN, SAME_INPUT, SCALARS, register
from ..passes.backward import consumers
from ..passes.lower import PROGRAM_CHECKS, Derived, Fixed, Width, rule
from .positions import MapOfPositions, side_inputs

_ONE_OVER_N = ("Tensor Programs' limit scales the logits by 1/n instead (n the width the logits sum over: "
               "torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], -1) @ v, or "
               "F.scaled_dot_product_attention(q, k, v, scale=1 / q.shape[-1])), where they converge to "
               "deterministic numbers and ntkcompile compiles attention")

_SQRT = ("{what} scales the attention logits by 1/sqrt(head_dim): q.k/sqrt(d) stays an O(1) random number "
         "at any width, so with a fixed number of heads the attention weights never become deterministic "
         "and the network has no Gaussian infinite-width limit (its NTK limit needs infinitely many heads, "
         "Hron et al. 2020). " + _ONE_OVER_N + ".")


def _refuse(lw, node, what):
    raise lw.error(node, _SQRT.format(what=what), UnsupportedOpError)


# -- IR ------------------------------------------------------------------------------

@node
class SAttn(Scalar):
    """The attention weights of each input, a ``(|Pq|, |Pk|)`` matrix over the flattened
    positions of the query and the key: ``softmax_b(c E[Z^{q_a} Z^{k_b}] + mask_ab)``
    (``softmax=False``: linear attention ``(c E[...] + mask) keep``); heads are position
    axes that the mask keeps apart."""
    q: Any                 # Vec with positions pq
    k: Any                 # Vec with positions pk
    c: float
    mask: Any              # kernels.attention.Mask over (|pq|, |pk|)
    softmax: bool
    pq: tuple
    pk: tuple
    uid: int = -1

    def children(self):
        return (self.q, self.k)

    def describe(self, shown):
        inner = f"{self.c:g} <{shown[0]}, {shown[1]}>/n + {self.mask.label}"
        return f"softmax({inner})" if self.softmax else f"linear({inner})"

    def check(self, program):
        pq, pk = tuple(program.positions(self.q)), tuple(program.positions(self.k))
        if (pq, pk) != (self.pq, self.pk) or self.mask.array.shape != (math.prod(pq), math.prod(pk)):
            return [f"attention weights for positions {self.pq} x {self.pk} from a query with positions {pq}, "
                    f"a key with positions {pk} and a mask of shape {self.mask.array.shape}"]
        return []


@node
class GAttend(MapOfPositions):
    """``o_a = sum_b A_ab v_b``: the per-input attention weights ``weights`` (an ``SAttn``)
    applied to the positions of the value vector ``arg``."""
    weights: Any
    arg: Any
    uid: int = -1

    def children(self):
        return (self.weights, self.arg)

    def positions(self, positions_of):
        return self.weights.pq

    def describe(self, show):
        kind = "G" if self.gaussian else "linear in H-vars"
        w = self.weights
        return f"attend[{w.describe((show(w.q), show(w.k)))}] ({show(self.arg)})    # {kind}"

    def backward_label(self, show):
        return f"attend#{self.weights.uid}^T d{show(self)}"

    def check(self, program):
        pos = tuple(program.positions(self.arg))
        if pos not in (self.weights.pk, ()):
            return [f"attends over a vector with positions {pos} with weights for {self.weights.pk}"]
        return []


# -- lowering ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Logits(Derived):
    """``coef * q k^T`` of a query ``(N, *lead, Tq, n)`` and a transposed key ``(N, *lead, n, Tk)``
    (``lead``: heads, position axes of independent width blocks, paired axis by axis), then
    an additive ``mask`` of shape ``(*lead, Tq, Tk)``; ``softmax``: the weights after a
    softmax over the keys."""
    q: Width
    k: Width
    coef: float = 1.0
    mask: Optional[np.ndarray] = None
    softmax: bool = False

    @property
    def shape(self):
        """The logits tensor's shape without the batch axis."""
        return tuple(self.q.positions[r] for r in self.q.axes[1:-1]) + (self.k.positions[self.k.axes[-1]],)

    def but(self, **changes):
        fields = dict(q=self.q, k=self.k, coef=self.coef, mask=self.mask, softmax=self.softmax)
        fields.update(changes)
        return Logits(**fields)

    def with_mask(self, m) -> "Logits":
        """The logits plus the additive mask ``m`` (of ``shape``)."""
        return self.but(mask=m if self.mask is None else self.mask + m)


def _sequence_like(x, width_at=-1) -> bool:
    """A width vector ``(N, *lead, T, n)``: batch first, positions, the width at ``width_at``
    (last; a transposed key ``(N, *lead, n, T)``: -2)."""
    return (isinstance(x, Width) and len(x.positions) >= 1 and x.axes[0] == "n" and x.axes[width_at] == "w"
            and len(x.axes) == len(x.positions) + 2)


def logits(lw, node, q, k) -> Logits:
    """``q @ k^T`` for a query ``(N, *lead, Tq, n)`` and a transposed key ``(N, *lead, n, Tk)``."""
    if not (_sequence_like(q) and _sequence_like(k, width_at=-2)):
        raise lw.unsupported(node, "a product of width vectors other than attention logits q @ k.transpose(-1, "
                             "-2) of sequences (N, T, n) or (N, heads, T, head_dim)")
    if q.size != k.size:
        raise lw.error(node, f"attention logits of a query of width {q.size} and a key of width {k.size}",
                       WidthInferenceError)
    qlead, klead = q.axes[1:-2], k.axes[1:-2]
    if len(qlead) != len(klead) or any(q.positions[a] != k.positions[b] for a, b in zip(qlead, klead)):
        raise lw.error(node, f"attention logits of a query {q.positions} and a key {k.positions} whose leading "
                       "axes (heads) do not match", WidthInferenceError)
    return Logits(q, k)


def _mask_of(lw, node, mask, shape, bool_fill=None):
    """An additive mask of the logits' ``shape`` (no batch axis) from a fixed tensor that does
    not depend on the input."""
    value = lw.constant(mask)
    if value is None:
        raise lw.unsupported(node, "an attention mask that depends on the input or is not a fixed tensor (use a "
                             "buffer or a tensor built from sizes, e.g. torch.ones(T, T).triu(1).bool())")
    value = value.detach().to("cpu")
    while value.ndim > len(shape) and value.shape[0] == 1:
        value = value[0]
    try:
        value = torch.broadcast_to(value, shape)
    except RuntimeError:
        raise lw.error(node, f"an attention mask of shape {tuple(value.shape)} for logits of shape (N, "
                       f"{', '.join(map(str, shape))}): the mask must be the same for every input and broadcast "
                       "to the logits without their batch axis", WidthInferenceError) from None
    if bool_fill is not None:         # masked_fill(mask, value): value where mask is True
        return np.where(value.bool().numpy(), float(bool_fill), 0.0)
    if value.dtype == torch.bool:     # SDPA's boolean mask: True where attention is allowed
        return np.where(value.numpy(), 0.0, -np.inf)
    return value.double().numpy()


def add_mask(lw, node, lg: Logits, mask) -> Logits:
    if lg.softmax:
        raise lw.unsupported(node, "arithmetic on attention weights after the softmax")
    return lg.with_mask(_mask_of(lw, node, mask, lg.shape))


def scale(lw, node, lg: Logits, factor) -> Logits:
    if lg.softmax:
        raise lw.unsupported(node, "arithmetic on attention weights after the softmax")
    if lg.mask is not None:
        raise lw.unsupported(node, "scaling attention logits after a mask was added (scale first, then mask)")
    return lg.but(coef=lg.coef * float(factor))


def _temperature(lw, node, lg: Logits, what) -> float:
    """``c`` of logits scaled by ``c/n`` (``n`` the width they sum over: a head's), checked."""
    n = lg.q.size
    if lg.coef == 1.0:
        raise lw.error(node, f"{what}: the logits q.k are not scaled, so their scale is unknown (a sum over the "
                       "width grows like n). " + _ONE_OVER_N + ".", UnsupportedOpError)
    if abs(lg.coef * math.sqrt(n) - 1.0) < 1e-9 and n > 1:
        _refuse(lw, node, what + f" (logits scaled by 1/sqrt({n}))")
    return lg.coef * n


def _flat_mask(lg: Logits) -> np.ndarray:
    """The mask over the flattened positions of the query and the key, in the IR's order of
    positions: the user's mask where the heads agree, ``-inf`` between different heads."""
    q, k = lg.q, lg.k
    user = lg.mask if lg.mask is not None else np.zeros(lg.shape)
    qi = np.indices(q.positions).reshape(len(q.positions), -1)        # (rank, Q): each query position
    ki = np.indices(k.positions).reshape(len(k.positions), -1)
    same = np.ones((qi.shape[1], ki.shape[1]), dtype=bool)
    for a, b in zip(q.axes[1:-2], k.axes[1:-2]):
        same &= qi[a][:, None] == ki[b][None, :]
    lead = tuple(qi[a][:, None] * np.ones_like(ki[0])[None, :] for a in q.axes[1:-2])
    vals = user[(*lead, qi[q.axes[-2]][:, None], ki[k.axes[-1]][None, :])]
    return np.where(same, vals, -np.inf)


def _attend(lw, node, lg: Logits, v, what):
    k = lg.k
    if not lg.softmax and lg.mask is not None and np.isinf(lg.mask).any():
        raise lw.unsupported(node, "linear attention (no softmax) with a -inf mask")
    if not _sequence_like(v) or tuple(v.positions) != tuple(k.positions) or \
            tuple(v.axes) != tuple(k.axes[:-2]) + (k.axes[-1], "w"):
        raise lw.unsupported(node, "attention weights applied to a value that is not laid out like the key "
                             "(N, *heads, T, n)")
    flat = _flat_mask(lg)
    if lg.softmax and np.isinf(flat).all(axis=1).any():
        raise lw.error(node, "the attention mask masks every key of some query: its softmax is undefined",
                       WidthInferenceError)
    c = _temperature(lw, node, lg, what)
    b = lw.b
    w = b.make(SAttn, lg.q.vec, k.vec, float(c), ka.Mask.make(flat, "mask" if lg.mask is not None else "heads"),
               bool(lg.softmax), tuple(lg.q.positions), tuple(k.positions))
    atom = b.make(GAttend, w, v.vec)
    return lw.width(node, b.single(b.atom_var(atom)), v.size, lg.q.positions, layout=lg.q.axes)


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
    if kw.get("enable_gqa"):
        raise lw.unsupported(node, "F.scaled_dot_product_attention with enable_gqa")
    if dropout_p:
        raise lw.unsupported(node, "attention dropout (dropout_p > 0): the kernel of random dropout masks is not "
                             "computed; pass dropout_p=0 (eval)")
    if not _sequence_like(k):
        raise lw.unsupported(node, "F.scaled_dot_product_attention of tensors other than sequences (N, T, n) or "
                             "(N, heads, T, head_dim)")
    kt = Width(k.vec, k.size, k.positions, layout=k.axes[:-2] + ("w", k.axes[-2]))
    lg = logits(lw, node, q, kt).but(coef=float(scale))
    if is_causal:
        tq, tk = lg.shape[-2:]
        lg = lg.with_mask(np.broadcast_to(np.where(np.tril(np.ones((tq, tk), dtype=bool)), 0.0, -np.inf), lg.shape))
    if attn_mask is not None:
        lg = add_mask(lw, node, lg, attn_mask)
    return _attend(lw, node, lg.but(softmax=True), v, f"F.scaled_dot_product_attention(scale={scale:g})")


@rule(torch.softmax, F.softmax, "softmax", torch.log_softmax, F.log_softmax, "log_softmax")
def _softmax(lw, node, x, dim=None, *args, **kwargs):
    log = "log" in getattr(node.target, "__name__", str(node.target))
    if isinstance(x, Logits):
        if dim is None or dim % (len(x.shape) + 1) != len(x.shape):
            raise lw.unsupported(node, "a softmax of attention logits over the query axis (softmax over the keys, "
                                 "dim=-1)")
        if log or x.softmax:
            raise lw.unsupported(node, "log_softmax or a second softmax of attention logits")
        return x.but(softmax=True)
    if not isinstance(x, Width) or dim is None:
        raise lw.unsupported(node, "a softmax of a value that is not a width vector")
    role = x.axes[dim % len(x.axes)]
    if role == "w":
        raise lw.error(node, "a softmax over the width axis is not a coordinatewise function (every "
                       "coordinate is O(1/n) and depends on all others): it has no Tensor Program limit as "
                       "written. Apply softmax to the model's outputs instead (after the readout, e.g. in "
                       "the loss: simulate(loss='cross_entropy')).", UnsupportedOpError)
    raise lw.error(node, "a softmax over positions of a width vector (a nonlinearity of each coordinate's "
                   "values at every position) has no Tensor Program rule. If these are attention logits: they "
                   "are per-input numbers q @ k.transpose(-1, -2) / n, not width vectors. " + _ONE_OVER_N + ".",
                   UnsupportedOpError)


@rule(torch.matmul, "matmul", torch.bmm, "bmm", operator.matmul)
def _matmul(lw, node, a, b, *args, **kwargs):
    if isinstance(a, Width) and isinstance(b, Width):
        return logits(lw, node, a, b)
    if isinstance(a, Logits) and isinstance(b, Width):
        if not a.softmax:
            return _attend(lw, node, a, b, "linear attention (q @ k^T) @ v")
        return _attend(lw, node, a, b, "attention")
    raise lw.unsupported(node, "a matrix product with a width vector (use nn.Linear for a learned map; a "
                         "fixed matrix over positions, e.g. MLP-Mixer's token mixing as a Linear over a "
                         "fixed axis, is a finite random matrix with no deterministic limit)")


@rule("masked_fill", torch.masked_fill)
def _masked_fill(lw, node, x, mask, value):
    if not isinstance(x, Logits) or x.softmax:
        raise lw.unsupported(node, "masked_fill of a value other than attention logits")
    number = lw.constant(value) if isinstance(value, Fixed) else None
    if number is not None and number.numel() == 1:
        value = float(number)                      # ATen's masked_fill.Tensor: a 0-d tensor
    if not isinstance(value, (int, float)):
        raise lw.unsupported(node, "masked_fill with a value that is not a number")
    m = _mask_of(lw, node, mask, x.shape, bool_fill=value)
    if np.isfinite(value) and value != 0.0:
        raise lw.unsupported(node, "masked_fill of attention logits with a finite value (use -inf, or add a mask)")
    return x.with_mask(m)


def _check_values(lw, program):
    """A value vector attended and also read by another linear map: the backward then needs the
    covariance of ``A^T do`` with that map's gradient, which is not computed: refused."""
    for us in consumers(program).values():
        if len({type(u) is GAttend for u in us}) > 1:
            raise UnsupportedOpError(
                "a vector is both attended (as the values of an attention) and read by another linear map or "
                "the readout: the covariance of their gradients is not computed. Use a separate Linear for "
                "the values.")


PROGRAM_CHECKS.append(_check_values)


# -- planning ------------------------------------------------------------------------

@register(SCALARS, SAttn)
def _weights(pl, s, side):
    lg = yield from pl.cov(s.q, s.k, f"f{side}")
    shape = (math.prod(s.pq), math.prod(s.pk))
    return pl.call(ka.weights, lg, s.c, s.softmax, side_inputs(pl, f"d{side}"), shape, pl.static(s.mask, "mask"))


def _shapes(*atoms):
    """``(pk, pq)`` of attentions that must agree on them."""
    shapes = {(a.weights.pk, a.weights.pq) for a in atoms}
    if len(shapes) != 1:
        raise NotImplementedError("two attentions over different positions combined")
    return shapes.pop()


def _lifted(pl, w, side):
    a = yield from pl.scalar(w, side)
    return pl.lift(a, side, "x", 0)


@register(COVARIANCE, GAttend)
def _attend_cov(pl, a, b, pair):
    if not (isinstance(a, GAttend) and isinstance(b, GAttend)):
        return (yield from _other_cov(pl, a, b, pair))
    if pair in SAME_INPUT:
        side = int(pair[1])
        inner = yield from pl.cov(a.arg, b.arg, "f" + pair[1])
        if inner is None:
            return None
        wa = yield from pl.scalar(a.weights, side)
        wb = yield from pl.scalar(b.weights, side)
        return pl.call(ka.same, wa, wb, inner, options=_shapes(a, b))
    inner = yield from pl.cov(a.arg, b.arg, pair)
    if inner is None:
        return None
    if pair == "x":
        wa = yield from _lifted(pl, a.weights, 1)
        wb = yield from _lifted(pl, b.weights, 2)
    else:                                   # f1, f2: one input, all pairs of positions
        side = int(pair[1])
        wa = yield from pl.scalar(a.weights, side)
        wb = yield from pl.scalar(b.weights, side)
    return pl.call(ka.pair, wa, wb, inner, options=_shapes(a, b))


def _other_cov(pl, a, b, pair):
    """``E[(A x)_s y'_u]`` for ``y`` not attended (a residual beside the attention)."""
    att, other = (a, b) if isinstance(a, GAttend) else (b, a)
    if att.independent_of(other):
        return None
    if tuple(pl.p.positions(other)) != tuple(pl.p.positions(att.arg)):
        raise NotImplementedError("an attention's output combined with a vector of other positions")
    y = pl.b.single(pl.b.atom_var(other))
    inner_pair = "f" + pair[1] if pair in SAME_INPUT else pair
    inner = yield from (pl.cov(att.arg, y, inner_pair) if att is a else pl.cov(y, att.arg, inner_pair))
    if inner is None:
        return None
    if pair == "x":
        w = yield from _lifted(pl, att.weights, 1 if att is a else 2)
    else:
        w = yield from pl.scalar(att.weights, int(pair[1]))
    if pair in SAME_INPUT:
        return pl.call(ka.left_same if att is a else ka.right_same, w, inner, options=_shapes(att))
    return pl.call(ka.left if att is a else ka.right, w, inner, options=_shapes(att))


@register(MEAN, GAttend)
def _attend_mean(pl, a, side):
    m = yield from pl.mean(a.arg, side)
    if m is None:
        return None
    w = yield from pl.scalar(a.weights, side)
    return pl.call(ka.mean, w, m, options=_shapes(a))


@register(ADJOINT, GAttend)
def _attend_adjoint(pl, u, w):
    """``Cov(A^T do, B^T do') = A^T D B`` per pair of inputs (A, B constants in the backward)."""
    d = yield from pl.D(u, w)
    if d is None:
        return None
    wu = yield from _lifted(pl, u.weights, 1)
    ww = yield from _lifted(pl, w.weights, 2)
    return pl.call(ka.adjoint, pl.tensor(d), wu, ww, options=_shapes(u, w))
