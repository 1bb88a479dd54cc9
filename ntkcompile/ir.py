"""The Tensor Program IR (TP II Sec. 2, NETSOR+ of TP II App. / TP IIb).

A compiled model is a set of width-`n` vectors, each written in *canonical
form*: a linear combination of **atoms** with per-input scalar coefficients.

* G-atoms are Gaussian in the limit (TP II Sec. 3):
  ``GInput`` (an input-layer matrix times a fixed input vector), ``GMatMul`` (a
  width-by-width matrix times a vector), ``GBias`` (a bias vector) and
  ``GProbe`` (a zero vector that only marks where the backward pass is read
  off, e.g. for LayerNorm gain and shift).  G-atoms of the same matrix are
  grouped by their ``param``: every pair of uses covaries.  A convolution is a
  matrix with a ``conv`` geometry; its atoms carry fixed positions.
* ``GPool`` is an average over windows of positions: a fixed linear map, Gaussian
  exactly when its argument is.
* H-atoms are ``phi(g_1, ..., g_k)``: an expression ``Expr`` of slots, each slot
  a purely Gaussian ``Var``.  A nonlinearity of H-vars is composed into one
  H-atom of the underlying G-vars, never nested.
* Coefficients are ``Scalar`` nodes: constants and *moments* (width averages
  such as a LayerNorm mean), which converge to deterministic per-input numbers.
* A ``Vec`` is a width vector made of pieces ``(fraction, Var)``; a vector has
  one piece unless it was built by concatenation along the width axis, where
  the coordinates are a mixture in proportion to the (finite) piece widths.

Nodes are immutable and interned by a ``Builder``: structurally equal nodes are
the same object, so the same ``nn.Linear`` applied twice to one vector yields
one G-atom, and identity comparisons are exact and cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional


# --------------------------------------------------------------------------- #
# Parameters (what the NTK sums over)
# --------------------------------------------------------------------------- #

@dataclass(eq=False)
class Matrix:
    """A trainable weight matrix, ``W = (W_std / sqrt(fan_in)) w``, ``w ~ N(0,1)``.

    ``kind`` is ``"input"`` (fixed-dimensional input, width output),
    ``"hidden"`` (width to width).  ``transposed_uses`` counts uses as ``W^T``
    (the Simple GIA Check forbids mixing them with ``W`` uses).
    """
    name: str
    kind: str
    W_std: float
    fan_in: Optional[int] = None
    conv: Any = None          # kernels.spatial.ConvGeometry for a convolution, else None
    uid: int = -1


@dataclass(eq=False)
class Bias:
    """A trainable bias vector ``b_std * beta``, ``beta ~ N(0, 1)``, shared by all uses."""
    name: str
    b_std: float
    spatial: tuple = ()       # positions it is broadcast over (a conv bias)
    uid: int = -1


@dataclass(eq=False)
class Affine:
    """Elementwise gain/shift of a normalization layer (PyTorch init: 1 and 0).

    They are trained as PyTorch stores them (no NTK rescaling), so they add
    ``E[(dy xhat)(dy' xhat')]`` (gain) and ``D(y, y')`` (shift) to the NTK, read
    off at the probe added to ``y``.  The gain term factorizes into
    ``D * C(xhat, xhat')`` only when ``dy`` is independent of ``xhat``.
    """
    name: str
    gain: bool
    shift: bool
    xhat: Any = None          # Var: the normalized input the gain multiplies
    uid: int = -1


@dataclass(eq=False)
class Readout:
    """``f = (W_std / sqrt(n)) v . x + b_std * beta`` times ``scale``, ``v`` fresh (GIA)."""
    name: str
    W_std: float
    b_std: float
    has_bias: bool
    out_features: int
    vec: Any                  # Vec
    scale: float = 1.0
    pool: Optional[str] = None   # None, "gap" (global average pool) or "flatten" over positions
    spatial: tuple = ()          # the positions pooled or flattened


# --------------------------------------------------------------------------- #
# Interned nodes
# --------------------------------------------------------------------------- #

class Node:
    """Base of interned IR nodes; equality is identity (see ``Builder``)."""
    __slots__ = ()
    uid: int

    def __repr__(self):
        return f"{type(self).__name__}#{self.uid}"


def _node(cls):
    cls = dataclass(frozen=True, eq=False, repr=False)(cls)
    return cls


# Scalars (per input) -------------------------------------------------------

@_node
class SConst(Node):
    value: float
    uid: int = field(default=-1, compare=False)


@_node
class SMoment(Node):
    """``which="mean"``: ``E[Z^x]``; ``which="sq"``: ``E[(Z^x)^2]`` (NETSOR+ moments)."""
    which: str
    vec: Any
    uid: int = field(default=-1, compare=False)


@_node
class SOp(Node):
    """``op`` in ``add, mul, neg, rsqrt`` applied to scalar nodes (or ``rsqrt_eps``)."""
    op: str
    args: tuple
    eps: float = 0.0
    uid: int = field(default=-1, compare=False)


# Expressions inside H-atoms ------------------------------------------------

@_node
class ESlot(Node):
    index: int
    uid: int = field(default=-1, compare=False)


@_node
class EConst(Node):
    value: float
    uid: int = field(default=-1, compare=False)


@_node
class ECall(Node):
    fn: Any                   # kernels.elementwise.Elementwise
    arg: Any
    uid: int = field(default=-1, compare=False)


@_node
class ELin(Node):
    """``sum_i coef_i * expr_i`` with ``Scalar`` coefficients."""
    terms: tuple
    uid: int = field(default=-1, compare=False)


@_node
class EMul(Node):
    args: tuple
    uid: int = field(default=-1, compare=False)


# Atoms -----------------------------------------------------------------------

class Atom(Node):
    __slots__ = ()
    gaussian = False


@_node
class GInput(Atom):
    """``U xi``: input-layer matrix ``param`` times fixed input number ``fixed``."""
    param: Any
    fixed: int
    uid: int = field(default=-1, compare=False)
    gaussian = True


@_node
class GMatMul(Atom):
    """``W x`` for a width-by-width matrix ``param`` and a width vector ``arg`` (Vec)."""
    param: Any
    arg: Any
    uid: int = field(default=-1, compare=False)
    gaussian = True


@_node
class GBias(Atom):
    param: Any
    uid: int = field(default=-1, compare=False)
    gaussian = True


@_node
class GProbe(Atom):
    """A zero vector added where the backward pass must be read off."""
    param: Any
    uid: int = field(default=-1, compare=False)
    gaussian = True


@_node
class GPool(Atom):
    """Average pooling of ``arg`` (a Vec with positions) over windows ``geom``.

    A deterministic linear map across positions: Gaussian exactly when ``arg`` is.
    Its covariance averages *all* pairs of positions of two windows.
    """
    geom: Any                 # kernels.spatial.ConvGeometry (kernel, stride, padding)
    arg: Any
    uid: int = field(default=-1, compare=False)

    @property
    def gaussian(self):
        return all(v.gaussian for _, v in self.arg.pieces)


@_node
class HAtom(Atom):
    """``expr(g_1, ..., g_k)`` with ``gargs = (g_1, ..., g_k)`` purely Gaussian ``Var``s."""
    expr: Any
    gargs: tuple
    uid: int = field(default=-1, compare=False)


# Vectors ---------------------------------------------------------------------

@_node
class Var(Node):
    """Canonical form ``sum_i coef_i * atom_i`` (``terms`` sorted by atom uid)."""
    terms: tuple
    uid: int = field(default=-1, compare=False)

    @property
    def gaussian(self) -> bool:
        return all(a.gaussian for _, a in self.terms)


@_node
class Vec(Node):
    """A width vector: pieces ``(Fraction, Var)`` whose fractions sum to 1."""
    pieces: tuple
    uid: int = field(default=-1, compare=False)


# --------------------------------------------------------------------------- #
# Builder: interning and algebra in canonical form
# --------------------------------------------------------------------------- #

def _key_of(value):
    if isinstance(value, Node):
        return ("n", value.uid)
    if isinstance(value, tuple):
        return tuple(_key_of(v) for v in value)
    if isinstance(value, (Matrix, Bias, Affine)):
        return ("p", id(value))
    if isinstance(value, (int, float, str, Fraction)) or value is None:
        return (type(value).__name__, value)
    return ("o", id(value))   # Elementwise and other immutable objects


class Builder:
    """Creates interned nodes and does linear algebra on canonical forms."""

    def __init__(self):
        self._table: dict = {}
        self.nodes: list = []
        self.params: list = []     # Matrix, Bias, Affine in creation order
        self.ONE = None
        self.ONE = self.hatom(self.econst(1.0), ())

    # interning ---------------------------------------------------------------
    def make(self, cls, *fields):
        key = (cls.__name__,) + tuple(_key_of(f) for f in fields)
        node = self._table.get(key)
        if node is None:
            node = cls(*fields, uid=len(self.nodes))
            self._table[key] = node
            self.nodes.append(node)
        return node

    def param(self, p):
        p.uid = len(self.params)
        self.params.append(p)
        return p

    # scalars -------------------------------------------------------------------
    def sconst(self, v):
        return self.make(SConst, float(v))

    def smul(self, a, b):
        if isinstance(a, SConst) and isinstance(b, SConst):
            return self.sconst(a.value * b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, SConst):
                if x.value == 1.0:
                    return y
                if x.value == 0.0:
                    return x
        return self.make(SOp, "mul", tuple(sorted((a, b), key=lambda n: n.uid)), 0.0)

    def sadd(self, a, b):
        if isinstance(a, SConst) and isinstance(b, SConst):
            return self.sconst(a.value + b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, SConst) and x.value == 0.0:
                return y
        return self.make(SOp, "add", tuple(sorted((a, b), key=lambda n: n.uid)), 0.0)

    def sneg(self, a):
        return self.smul(self.sconst(-1.0), a)

    def srsqrt(self, a, eps=0.0):
        if isinstance(a, SConst):
            return self.sconst((a.value + eps) ** -0.5)
        return self.make(SOp, "rsqrt", (a,), float(eps))

    def smoment(self, which, vec):
        if which == "mean" and all(v.gaussian for _, v in vec.pieces):
            return self.sconst(0.0)          # G-vars have mean zero
        return self.make(SMoment, which, vec)

    # expressions -------------------------------------------------------------
    def econst(self, v):
        return self.make(EConst, float(v))

    def eslot(self, i):
        return self.make(ESlot, i)

    def ecall(self, fn, arg):
        return self.make(ECall, fn, arg)

    def emul(self, args):
        consts = [a for a in args if isinstance(a, EConst)]
        rest = [a for a in args if not isinstance(a, EConst)]
        c = 1.0
        for a in consts:
            c *= a.value
        if c == 0.0:
            return self.econst(0.0)
        if not rest:
            return self.econst(c)
        core = rest[0] if len(rest) == 1 else self.make(EMul, tuple(rest))
        return core if c == 1.0 else self.elin([(self.sconst(c), core)])

    def elin(self, terms):
        """``sum coef * expr``, merging equal expressions and dropping zeros."""
        acc: dict = {}
        order = []
        for coef, e in terms:
            if isinstance(e, ELin):                      # flatten
                for c2, e2 in e.terms:
                    self._acc(acc, order, self.smul(coef, c2), e2)
            elif isinstance(e, EConst):
                if e.value != 0.0:
                    self._acc(acc, order, self.smul(coef, self.sconst(e.value)), self.econst(1.0))
            else:
                self._acc(acc, order, coef, e)
        out = [(acc[e], e) for e in order if not (isinstance(acc[e], SConst) and acc[e].value == 0.0)]
        if not out:
            return self.econst(0.0)
        if len(out) == 1:
            c, e = out[0]
            if isinstance(c, SConst):
                if isinstance(e, EConst):
                    return self.econst(c.value * e.value)
                if c.value == 1.0:
                    return e
        return self.make(ELin, tuple(out))

    def _acc(self, acc, order, coef, e):
        if e in acc:
            acc[e] = self.sadd(acc[e], coef)
        else:
            acc[e] = coef
            order.append(e)

    # atoms and vars ------------------------------------------------------------
    def hatom(self, expr, gargs):
        return self.make(HAtom, expr, tuple(gargs))

    def var(self, terms):
        """Canonical ``Var`` from ``(Scalar, Atom)`` pairs (merged, sorted, zeros dropped)."""
        acc: dict = {}
        for coef, atom in terms:
            acc[atom] = self.sadd(acc[atom], coef) if atom in acc else coef
        items = [(c, a) for a, c in acc.items() if not (isinstance(c, SConst) and c.value == 0.0)]
        items.sort(key=lambda t: t[1].uid)
        return self.make(Var, tuple(items))

    def atom_var(self, atom):
        return self.var([(self.sconst(1.0), atom)])

    def vec(self, pieces):
        return self.make(Vec, tuple((Fraction(a), v) for a, v in pieces))

    def single(self, var):
        return self.vec([(Fraction(1), var)])

    # vector algebra ------------------------------------------------------------
    @staticmethod
    def refine(*vecs):
        """Split every Vec at the union of piece boundaries; returns aligned piece lists."""
        def ends(v):
            out, pos = [], Fraction(0)
            for a, var in v.pieces:
                pos += a
                out.append((pos, var))
            return out

        cuts = sorted({pos for v in vecs for pos, _ in ends(v)})
        aligned = []
        for v in vecs:
            pieces, prev, j, bounds = [], Fraction(0), 0, ends(v)
            for c in cuts:
                while bounds[j][0] < c:
                    j += 1
                pieces.append((c - prev, bounds[j][1]))
                prev = c
            aligned.append(pieces)
        return aligned

    def lincomb(self, terms):
        """``sum coef_i * vec_i`` for ``(Scalar, Vec)`` pairs, piecewise."""
        vecs = [v for _, v in terms]
        aligned = self.refine(*vecs)
        pieces = []
        for k in range(len(aligned[0])):
            frac = aligned[0][k][0]
            vterms = []
            for (coef, _), al in zip(terms, aligned):
                for c2, atom in al[k][1].terms:
                    vterms.append((self.smul(coef, c2), atom))
            pieces.append((frac, self.var(vterms)))
        return self.vec(pieces)

    def apply(self, fn_expr_builder, vecs):
        """Apply an elementwise function of several vectors piecewise.

        ``fn_expr_builder(list_of_arg_exprs) -> Expr`` builds the expression of
        the result from the expressions of the arguments.
        """
        aligned = self.refine(*vecs)
        pieces = []
        for k in range(len(aligned[0])):
            frac = aligned[0][k][0]
            pieces.append((frac, self._compose(fn_expr_builder, [al[k][1] for al in aligned])))
        return self.vec(pieces)

    def _compose(self, fn_expr_builder, vars_):
        """Compose a function of Vars into one H-atom of Gaussian slot Vars."""
        slots: list = []

        def slot_of(gvar):
            if gvar not in slots:
                slots.append(gvar)
            return self.eslot(slots.index(gvar))

        def expr_of(var):
            gauss = [(c, a) for c, a in var.terms if a.gaussian]
            terms = []
            if gauss:
                terms.append((self.sconst(1.0), slot_of(self.var(gauss))))
            for c, a in var.terms:
                if a.gaussian:
                    continue
                if not isinstance(a, HAtom):
                    raise NotImplementedError(
                        f"a nonlinearity of {type(a).__name__} of a non-Gaussian vector (e.g. average "
                        "pooling of a nonlinearity, then another nonlinearity)")
                remap = {i: slot_of(g) for i, g in enumerate(a.gargs)}
                terms.append((c, self.substitute(a.expr, remap)))
            return self.elin(terms) if terms else self.econst(0.0)

        expr = fn_expr_builder([expr_of(v) for v in vars_])
        if isinstance(expr, EConst):
            return self.var([(self.sconst(expr.value), self.ONE)]) if expr.value else self.var([])
        if isinstance(expr, ESlot):
            return slots[expr.index]
        return self.atom_var(self.hatom(expr, slots))

    def substitute(self, expr, remap):
        """Rename slots: ``ESlot(i) -> remap[i]`` (an Expr)."""
        if isinstance(expr, ESlot):
            return remap[expr.index]
        if isinstance(expr, EConst):
            return expr
        if isinstance(expr, ECall):
            return self.ecall(expr.fn, self.substitute(expr.arg, remap))
        if isinstance(expr, ELin):
            return self.elin([(c, self.substitute(e, remap)) for c, e in expr.terms])
        if isinstance(expr, EMul):
            return self.emul([self.substitute(e, remap) for e in expr.args])
        raise TypeError(expr)

    def differentiate(self, expr, slot, derivative_of):
        """Symbolic ``d expr / d slot``; ``derivative_of(fn)`` gives ``fn'`` as an Elementwise."""
        if isinstance(expr, ESlot):
            return self.econst(1.0 if expr.index == slot else 0.0)
        if isinstance(expr, EConst):
            return self.econst(0.0)
        if isinstance(expr, ECall):
            inner = self.differentiate(expr.arg, slot, derivative_of)
            if isinstance(inner, EConst) and inner.value == 0.0:
                return inner
            return self.emul([self.ecall(derivative_of(expr.fn), expr.arg), inner])
        if isinstance(expr, ELin):
            return self.elin([(c, self.differentiate(e, slot, derivative_of)) for c, e in expr.terms])
        if isinstance(expr, EMul):
            terms = []
            for i in range(len(expr.args)):
                d = self.differentiate(expr.args[i], slot, derivative_of)
                if isinstance(d, EConst) and d.value == 0.0:
                    continue
                terms.append((self.sconst(1.0), self.emul(list(expr.args[:i]) + [d] + list(expr.args[i + 1:]))))
            return self.elin(terms)
        raise TypeError(expr)


def expr_uses_slot(expr, slot) -> bool:
    if isinstance(expr, ESlot):
        return expr.index == slot
    if isinstance(expr, ECall):
        return expr_uses_slot(expr.arg, slot)
    if isinstance(expr, ELin):
        return any(expr_uses_slot(e, slot) for _, e in expr.terms)
    if isinstance(expr, EMul):
        return any(expr_uses_slot(e, slot) for e in expr.args)
    return False


def expr_smooth(expr) -> bool:
    """False if any nonlinearity in ``expr`` has a kink or jump (quadrature is then approximate)."""
    if isinstance(expr, ECall):
        return getattr(expr.fn, "smooth", True) and expr_smooth(expr.arg)
    if isinstance(expr, ELin):
        return all(expr_smooth(e) for _, e in expr.terms)
    if isinstance(expr, EMul):
        return all(expr_smooth(e) for e in expr.args)
    return True


# --------------------------------------------------------------------------- #
# The program
# --------------------------------------------------------------------------- #

@dataclass
class Program:
    """A lowered Tensor Program: the builder's nodes, parameters and readout.

    ``fixed_names`` name the fixed-dimensional inputs of the input layers, which
    ``prep`` (a callable on the user's input batch) computes concretely.
    """
    builder: Builder
    readout: Readout
    fixed_names: list
    fixed_dims: list          # shape of one fixed input (without the batch axis)
    prep: Callable
    input_shape: tuple
    names: dict = field(default_factory=dict)   # node -> user-facing name (fx node)

    @property
    def params(self):
        return self.builder.params
