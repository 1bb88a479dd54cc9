"""Blocks of the width axis: ``x[:, a:b]``, ``chunk``, ``split`` of a width vector.

Hand-written GRU and LSTM cells stack their gates in one matrix and slice the result
(``gi = W_ih x``, then ``gi.chunk(3, 1)`` or ``gi[:, :n]``).  The rows of a matrix are
iid, so in the limit a block of rows is an independent matrix of the same std and
fan-in applied to the same input (TP II Sec. 3): a block of ``W z + b`` is
``W_k z + b_k``, and the NTK contributions of the blocks add up to the full matrix's.

**Representation.**  A block is a parameter of its own: ``Matrix``/``Bias`` (and a
normalization's ``Affine``) with ``block = (root, lo, hi)``, the interval of rows of
``root`` as fractions of its output width, interned per ``(root, lo, hi)``, so the same
block sliced at every time step is one parameter with several uses (weight sharing).
Everything after lowering sees ordinary parameters; a block of a block is a block of
the root.  Fractions, not row numbers: hidden widths go to infinity in proportion, so a
slice of any size is fine.

**Slicing a width vector** maps its canonical form term by term (``BLOCK_RULES``, one
rule per atom kind, registered beside the kind; found along the class's MRO):

* a G-atom of a parameter -> the same atom of the parameter's block
  (``W z`` -> ``W[lo:hi] z``: the argument is not sliced; a bias -> its block);
* a linear map of positions (``GPosMap``, ``GPool``) -> the same map of the sliced argument;
* an H-atom -> the same expression of its sliced slots; the constant ``1`` -> itself;
  coefficients (numbers, moments) are per-input scalars and stay;
* a concatenation (``Vec``) -> the pieces the interval overlaps, each sliced.

An atom kind without a rule is refused, naming the op.  Two blocks of one matrix
whose intervals start at the same row but end at different rows (or a block and the
whole matrix, from row 0) share coordinates, which separate parameters would not
describe: refused after pruning (blocks that start at different rows share no
coordinate, so they are independent).  A whole vector used only through its width
averages (a LayerNorm's moments before ``chunk``) is fine: moments are constants in
the limit, and their derivatives contribute nothing to the backward pass.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

from ..errors import WidthInferenceError
from ..ir import GBias, GInput, GMatMul, HAtom, SMoment, walk
from ..passes.lower import PROGRAM_CHECKS, Width

BLOCK_RULES: dict = {}      # atom class -> rule(slicer, atom, lo, hi) -> Var


def block_rule(*classes):
    """Register the width-slicing rule of atom kinds (once per kind)."""
    def deco(fn):
        for cls in classes:
            if cls in BLOCK_RULES:
                raise ValueError(f"a block rule for {cls.__name__} is already registered")
            BLOCK_RULES[cls] = fn
        return fn
    return deco


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


class Slicer:
    """Slices vectors of one lowering by intervals ``[lo, hi)`` of their width (Fractions)."""

    def __init__(self, lw, node):
        self.lw, self.node, self.b = lw, node, lw.b
        self._memo: dict = {}

    # vectors ---------------------------------------------------------------------
    def vec(self, vec, lo, hi):
        """The block ``[lo, hi)`` of a Vec: the pieces it overlaps, each sliced."""
        if (lo, hi) == (0, 1):
            return vec
        pieces, start = [], Fraction(0)
        for frac, var in vec.pieces:
            end = start + frac
            a, z = max(lo, start), min(hi, end)
            if a < z:
                pieces.append(((z - a) / (hi - lo), self.var(var, (a - start) / frac, (z - start) / frac)))
            start = end
        return self.b.vec(pieces)

    def var(self, var, lo, hi):
        """The block ``[lo, hi)`` of a Var: every atom mapped to its block."""
        if (lo, hi) == (0, 1):
            return var
        key = (var, lo, hi)
        if key not in self._memo:
            terms = []
            for c, a in var.terms:
                for c2, a2 in self.atom(a, lo, hi).terms:
                    terms.append((self.b.smul(c, c2), a2))
            self._memo[key] = self.b.var(terms)
        return self._memo[key]

    def atom(self, a, lo, hi):
        for cls in type(a).__mro__:
            rule = BLOCK_RULES.get(cls)
            if rule is not None:
                return rule(self, a, lo, hi)
        raise self.lw.unsupported(
            self.node, f"slicing the width axis of a vector made by a {type(a).__name__} "
            f"({a.describe(lambda n: repr(n))})")

    # parameters --------------------------------------------------------------------
    def interval(self, p, lo, hi):
        """``(root, a, z)``: the rows ``[lo, hi)`` of ``p`` as rows of its root parameter."""
        root, r0, r1 = p.block if getattr(p, "block", None) is not None else (p, Fraction(0), Fraction(1))
        return root, r0 + lo * (r1 - r0), r0 + hi * (r1 - r0)

    def param(self, p, lo, hi, **overrides):
        """The block ``[lo, hi)`` of parameter ``p`` (interned per root and interval)."""
        root, a, z = self.interval(p, lo, hi)
        if (a, z) == (0, 1):
            return root
        key = (id(root), a, z)
        found = self.lw.blocks.get(key)
        if found is None:
            fields = {f.name: getattr(root, f.name) for f in dataclasses.fields(root)
                      if f.name not in ("name", "uid", "block")}
            fields.update(overrides)
            blk = self.b.param(type(root), name=f"{root.name}[{_frac(a)}:{_frac(z)}]", block=(root, a, z),
                               **fields)
            found = self.lw.blocks[key] = (blk, self.node)
        return found[0]


# -- the rules of the IR's own atoms -------------------------------------------------

@block_rule(GInput)
def _input_block(sl, a, lo, hi):
    """``(U xi)[rows] = U[rows] xi`` (also a convolution's channels, an embedding's columns)."""
    return sl.b.atom_var(sl.b.make(type(a), sl.param(a.param, lo, hi), a.fixed))


@block_rule(GMatMul)
def _matmul_block(sl, a, lo, hi):
    """``(W z)[rows] = W[rows] z``: the argument is not sliced."""
    return sl.b.atom_var(sl.b.make(type(a), sl.param(a.param, lo, hi), a.arg))


@block_rule(GBias)
def _bias_block(sl, a, lo, hi):
    return sl.b.atom_var(sl.b.make(GBias, sl.param(a.param, lo, hi)))


@block_rule(HAtom)
def _hatom_block(sl, a, lo, hi):
    """``phi(g_1, ..., g_k)[block] = phi(g_1[block], ..., g_k[block])``; the constant 1 stays."""
    b = sl.b
    if not a.gargs:
        return b.atom_var(a)
    slots = [sl.var(g, lo, hi) for g in a.gargs]
    return b.compose(lambda es: b.substitute(a.expr, dict(enumerate(es))), slots)


def map_arg_block(sl, a, lo, hi):
    """The rule of a linear map that acts on positions only (a position map, a pooling):
    the same map of the sliced argument."""
    fields = [getattr(a, f.name) for f in dataclasses.fields(a) if f.name != "uid"]
    fields = [sl.vec(v, lo, hi) if v is a.arg else v for v in fields]
    return sl.b.atom_var(sl.b.make(type(a), *fields))


# -- lowering ----------------------------------------------------------------------------

def slice_width(lw, node, x: Width, start: int, stop: int) -> Width:
    """Coordinates ``start:stop`` of the width vector ``x`` (a block of its width)."""
    if not 0 <= start < stop <= x.size:
        raise lw.error(node, f"the slice {start}:{stop} of a width axis of size {x.size} is empty or "
                       "out of range", WidthInferenceError)
    lo, hi = Fraction(start, x.size), Fraction(stop, x.size)
    vec = Slicer(lw, node).vec(x.vec, lo, hi)
    return lw.width(node, vec, stop - start, x.positions, layout=x.layout)


def _outside_moments(program):
    """The parameters of atoms the readout reaches other than through width averages (moments:
    constants in the limit, whose derivatives contribute nothing to the backward pass)."""
    nodes = walk.postorder([program.readout.vec], lambda n: () if isinstance(n, SMoment) else n.children())
    used = {id(getattr(n, "param", None)) for n in nodes}
    return [p for p in program.params if id(p) in used]


def _check_blocks(lw, program):
    """Refuse two intervals of one parameter that start at the same row and end at different
    rows: they share coordinates (see the module docstring).  A whole vector whose width
    averages normalize its blocks (a LayerNorm before ``chunk``) is fine."""
    found: dict = {}
    for p in _outside_moments(program):
        root, lo, hi = p.block if getattr(p, "block", None) is not None else (p, Fraction(0), Fraction(1))
        ends = found.setdefault((id(root), lo), {})
        ends.setdefault(hi, p)
        if len(ends) > 1:
            blocks = sorted(ends.items())
            node = next((lw.blocks[(id(root), lo, h)][1] for h, _ in blocks if (id(root), lo, h) in lw.blocks))
            rows = " and ".join(f"[{_frac(lo)}:{_frac(h)}]" for h, _ in blocks)
            raise lw.error(node, f"the rows {rows} of '{root.name}' (fractions of its width) are both used: "
                           "blocks that start at the same row share coordinates, which independent blocks do "
                           "not describe. Slice the vector into blocks that do not overlap (chunk, split), "
                           "and use those instead of the whole vector")


PROGRAM_CHECKS.append(_check_blocks)
