"""The Tensor Program IR's node types (TP II Sec. 2, NETSOR+ of TP II App. / TP IIb).

A compiled model is a set of width-``n`` vectors, each written in *canonical
form*: a linear combination of **atoms** with per-input scalar coefficients.

* G-atoms are Gaussian in the limit (TP II Sec. 3): ``GInput`` (an input-layer
  matrix times a fixed input vector), ``GMatMul`` (a width-by-width matrix times
  a vector), ``GBias`` (a bias vector).  Atoms of the same parameter covary
  (every pair of uses: weight sharing is exactly this); atoms of different
  parameters are independent.  Ops add their own atom kinds (a convolution, an
  average pooling, a probe for a normalization's gain) by subclassing ``Atom``
  in their ``ntkcompile/ops`` file.
* H-atoms are ``phi(g_1, ..., g_k)``: an expression ``Expr`` of slots, each slot
  a purely Gaussian ``Var``.  A nonlinearity of H-vars is composed into one
  H-atom of the underlying G-vars, never nested.
* Coefficients are scalar nodes: constants and *moments* (width averages such as
  a LayerNorm mean), which converge to deterministic per-input numbers.
* A ``Vec`` is a width vector made of pieces ``(fraction, Var)``; a vector has
  one piece unless it was built by concatenation along the width axis, where the
  coordinates are a mixture in proportion to the (finite) piece widths.

Nodes are immutable and interned by ``ir.Builder``: structurally equal nodes are
the same object, so the same ``nn.Linear`` applied twice to one vector yields one
G-atom, and identity comparisons are exact and cheap.  Every node lists the
nodes it references in ``children()``; the generic walkers of ``ir.walk`` use
nothing else, so a new node kind needs no new walker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


# --------------------------------------------------------------------------- #
# Parameters (what the NTK sums over).  Created once per module by the builder,
# immutable afterwards.
# --------------------------------------------------------------------------- #

@dataclass(frozen=True, eq=False)
class Param:
    """Base of trainable parameters; ``uid`` is the creation index in the program."""
    name: str
    uid: int


@dataclass(frozen=True, eq=False)
class Matrix(Param):
    """A trainable weight matrix, ``W = (W_std / sqrt(fan_in)) w``, ``w ~ N(0,1)``.

    ``kind`` is ``"input"`` (fixed-dimensional input, width output) or
    ``"hidden"`` (width to width).  ``geometry`` is the convolution's window
    geometry (``ir.geometry.ConvGeometry``) or None for a dense matrix.
    ``block`` is ``(root, lo, hi)`` for a block of rows of the matrix ``root``
    (``lo``, ``hi``: Fractions of its output width; ``ops/blocks.py``): in the
    limit an independent matrix of the same std, fan-in and geometry.
    """
    kind: str
    W_std: float
    fan_in: Optional[int] = None
    geometry: Any = None
    block: Any = None

    def describe(self) -> str:
        extra = f", fan_in={self.fan_in}" if self.kind == "input" else ""
        return f"{self.kind} matrix   W_std={self.W_std:g}{extra}"


@dataclass(frozen=True, eq=False)
class Bias(Param):
    """A trainable bias vector ``b_std * beta``, ``beta ~ N(0, 1)``, shared by all uses
    (and by every position it is broadcast over: ``positions``, for a conv bias).
    ``block``: as for ``Matrix``, a block of the bias ``root`` (an independent bias)."""
    b_std: float
    positions: tuple = ()
    block: Any = None

    def describe(self) -> str:
        return f"bias            b_std={self.b_std:g}"


@dataclass(frozen=True, eq=False)
class Readout:
    """``f = (W_std / sqrt(n)) v . x + b_std * beta`` times ``scale``, ``v`` fresh (GIA).

    ``pool``: None, ``"gap"`` (mean over the ``positions`` of ``vec``) or
    ``"flatten"`` (a separate readout vector per position) or ``"steps"`` (the same
    readout vector at every position, an output per position: kernels over pairs of
    ``positions``).
    """
    name: str
    W_std: float
    b_std: float
    has_bias: bool
    out_features: int
    vec: Any                  # Vec
    scale: float = 1.0
    pool: Optional[str] = None
    positions: tuple = ()


# --------------------------------------------------------------------------- #
# Interned nodes
# --------------------------------------------------------------------------- #

class Node:
    """Base of interned IR nodes; equality is identity (see ``ir.Builder``)."""
    __slots__ = ()
    uid: int

    def children(self) -> tuple:
        """The IR nodes this node references (for the generic walkers)."""
        return ()

    def __repr__(self):
        return f"{type(self).__name__}#{self.uid}"


def node(cls):
    """Declare an interned node class: a frozen dataclass compared by identity."""
    return dataclass(frozen=True, eq=False, repr=False)(cls)


def _uid():
    return field(default=-1, compare=False)


# Scalars (one number per input) ----------------------------------------------

class Scalar(Node):
    """Base of scalars.  Ops may add kinds (attention weights: ``ops/attention.py``), with a
    planning rule in ``kernels.planner.SCALARS`` and their own ``check`` and ``describe``."""
    __slots__ = ()

    def check(self, program) -> list:
        return []

    def describe(self, shown) -> str:
        """Text of the scalar, given the text of its children."""
        return f"{type(self).__name__}({', '.join(shown)})"


@node
class SConst(Scalar):
    value: float
    uid: int = _uid()


@node
class SMoment(Scalar):
    """``which="mean"``: ``E[Z^x]``; ``which="sq"``: ``E[(Z^x)^2]`` (NETSOR+ moments)."""
    which: str
    vec: Any
    uid: int = _uid()

    def children(self):
        return (self.vec,)


@node
class SOp(Scalar):
    """``op`` applied to scalar nodes: ``add``, ``mul``, ``rsqrt`` (of ``x + param``),
    ``pow`` (``x ** param``), ``posmean`` (the mean over the argument's positions: a
    GroupNorm's statistics over channels and positions)."""
    op: str
    args: tuple
    param: float = 0.0
    uid: int = _uid()

    def children(self):
        return self.args


@node
class SSelect(Scalar):
    """A per-position scalar ``arg`` (a moment of a vector with positions: a per-token
    LayerNorm's statistics) read at the positions a selection ``map`` keeps
    (``ir.PositionMap`` with ``select``): ``out_s = arg_{select[s]}``."""
    map: Any
    arg: Any
    uid: int = _uid()

    def children(self):
        return (self.arg,)


# Expressions inside H-atoms ------------------------------------------------------

class Expr(Node):
    __slots__ = ()


@node
class ESlot(Expr):
    index: int
    uid: int = _uid()


@node
class EConst(Expr):
    value: float
    uid: int = _uid()


@node
class ECall(Expr):
    """``fn(arg)`` for an elementwise nonlinearity ``fn`` (``ir.Elementwise``)."""
    fn: Any
    arg: Any
    uid: int = _uid()

    def children(self):
        return (self.arg,)


@node
class ELin(Expr):
    """``sum_i coef_i * expr_i`` with scalar coefficients."""
    terms: tuple
    uid: int = _uid()

    def children(self):
        return tuple(x for term in self.terms for x in term)


@node
class EMul(Expr):
    args: tuple
    uid: int = _uid()

    def children(self):
        return self.args


# Atoms -----------------------------------------------------------------------------

class Atom(Node):
    """Base of atoms.  Class attributes describe the kind to the generic passes:

    * ``gaussian``: the atom is a G-var (may be a property);
    * ``consumes``: the atom is a fixed linear map of the width vector ``arg``
      (a matmul, a convolution, a pooling): the backward pass reads the gradient
      of ``arg``'s G-atoms off through it (TP II Sec. 4);
    * ``read_off``: the backward pass treats the atom like a G-atom (its gradient
      is read off directly) even when it is not Gaussian (a pooling of H-vars);
    * ``homogeneous``: the atom is a linear function of the input or of its
      argument (scaling the input by ``s`` scales it by ``s``: ``passes.homogeneity``).
    """
    __slots__ = ()
    gaussian = False
    consumes = False
    read_off = False
    homogeneous = False

    @property
    def cov_group(self):
        """Atoms in different groups are independent; ``ANY`` means "not provably"."""
        return getattr(self, "param", ANY)

    def positions(self, positions_of) -> tuple:
        """Fixed positions of the atom's coordinates (``()`` for a plain vector);
        ``positions_of(node)`` gives those of a child."""
        return max((positions_of(c) for c in self.children() if isinstance(c, (Var, Vec))), key=len, default=())

    def describe(self, show) -> str:
        """The right-hand side of the atom's line in the program printout."""
        return type(self).__name__

    def check(self, program) -> list:
        """Problems with this atom's own invariants, for ``ir.verify`` (none by default)."""
        return []


ANY = object()      # cov_group of atoms that may covary with anything


class OfArg(Atom):
    """Base of atoms computed from one vector ``arg`` across its positions (a map of positions,
    a pooling, a batch normalization): the backward reads ``arg`` off through them
    (``consumes``, ``read_off``), they mix positions, and they are in the covariance group of
    ``arg``'s atoms when those share one."""
    __slots__ = ()
    consumes = True
    read_off = True
    mixes_positions = True

    @property
    def cov_group(self):
        groups = {a.cov_group for _, v in self.arg.pieces for _, a in v.terms}
        return groups.pop() if len(groups) == 1 else ANY

    def children(self):
        return (self.arg,)


@node
class GInput(Atom):
    """``U xi``: input-layer matrix ``param`` times fixed input number ``fixed`` (dense;
    ``ops/conv.py`` subclasses it for convolutions)."""
    param: Any
    fixed: int
    uid: int = _uid()
    gaussian = True
    read_off = True
    homogeneous = True

    def positions(self, positions_of):
        return ()

    def describe(self, show):
        return f"U[{self.param.name}] * x{self.fixed}    # G (input layer)"


@node
class GMatMul(Atom):
    """``W x`` for a width-by-width matrix ``param`` and a width vector ``arg`` (Vec)
    (dense; ``ops/conv.py`` subclasses it for convolutions)."""
    param: Any
    arg: Any
    uid: int = _uid()
    gaussian = True
    consumes = True
    read_off = True
    homogeneous = True

    def children(self):
        return (self.arg,)

    def positions(self, positions_of):
        return ()

    def describe(self, show):
        return f"W[{self.param.name}] ({show(self.arg)})    # G"

    def backward_label(self, show):
        return f"W[{self.param.name}]^T d{show(self)}"


@node
class GBias(Atom):
    """A bias vector: constant over positions, so its arrays carry none."""
    param: Any
    uid: int = _uid()
    gaussian = True
    read_off = True

    def positions(self, positions_of):
        return ()

    def describe(self, show):
        return f"b[{self.param.name}]    # G (bias)"


@node
class HAtom(Atom):
    """``expr(g_1, ..., g_k)`` with ``gargs = (g_1, ..., g_k)`` purely Gaussian ``Var``s."""
    expr: Any
    gargs: tuple
    uid: int = _uid()

    def children(self):
        return (self.expr,) + self.gargs

    def positions(self, positions_of):
        return max((positions_of(g) for g in self.gargs), key=len, default=())


# Vectors ---------------------------------------------------------------------------

@node
class Var(Node):
    """Canonical form ``sum_i coef_i * atom_i`` (``terms`` sorted by atom uid)."""
    terms: tuple
    uid: int = _uid()

    @property
    def gaussian(self) -> bool:
        return all(a.gaussian for _, a in self.terms)

    def children(self):
        return tuple(x for term in self.terms for x in term)


@node
class Vec(Node):
    """A width vector: pieces ``(Fraction, Var)`` whose fractions sum to 1."""
    pieces: tuple
    uid: int = _uid()

    def children(self):
        return tuple(v for _, v in self.pieces)
