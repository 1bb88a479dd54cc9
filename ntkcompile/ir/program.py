"""A lowered Tensor Program: forward program, readout, fixed inputs, backward program.

Built by the passes (``passes.lower`` then ``passes.backward``), each of which
freezes what it built; ``ir.verify`` checks the invariants between stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from . import walk
from .builder import Builder
from .nodes import Atom, SMoment, SOp, SSelect, Var, Vec

READOUT = "readout"      # the backward atom of the readout: ``v`` itself


class Positions:
    """Fixed positions of every Var, Vec and atom (``()`` for a plain width vector),
    computed once per node, bottom-up without recursion."""

    def __init__(self):
        self._memo: dict = {}

    def __call__(self, node) -> tuple:
        memo = self._memo
        if node in memo:
            return memo[node]
        for n in walk.postorder([node], lambda m: () if m in memo else _shape_children(m)):
            if n not in memo:
                memo[n] = _positions_of(n, memo.__getitem__)
        return memo[node]


def _shape_children(n):
    if isinstance(n, Var):
        return tuple(x for term in n.terms for x in term)
    if isinstance(n, (Vec, Atom)):
        return tuple(c for c in n.children() if isinstance(c, (Var, Vec, Atom)))
    if isinstance(n, (SMoment, SOp, SSelect)):
        return n.children()
    return ()


def _positions_of(n, get) -> tuple:
    """Positions of a node; a scalar coefficient has those of the vector whose moment it is
    (a per-token LayerNorm's statistics), and a Var those of its atoms and coefficients."""
    if isinstance(n, Var):
        return max((get(x) for term in n.terms for x in term), key=len, default=())
    if isinstance(n, Vec):
        return max((get(v) for _, v in n.pieces), key=len, default=())
    if isinstance(n, Atom):
        return n.positions(get)
    if isinstance(n, SSelect):
        return n.map.out_shape
    if isinstance(n, SOp) and n.op == "posmean":
        return ()
    if isinstance(n, (SMoment, SOp)):
        return max((get(c) for c in n.children()), key=len, default=())
    return ()


@dataclass(frozen=True)
class BackwardProgram:
    """The backward program under the gradient independence assumption (TP II Sec. 4).

    Every forward vector is a function of G-atoms; the scaled gradient of a
    G-atom ``k`` is a sum over its consumers ``u`` (the readout and every atom
    that is a linear map of a vector: a matmul, a convolution, a pooling)::

        dG_k = sum_u  sum_pieces  (d arg_u / d G_k)  *  B_u,      B_u = v  or  W^T dy_u

    ``consumers[k]`` lists the ``u``; ``multipliers[(piece, k)]`` is the forward
    Var ``d piece / d G_k`` of a piece of ``arg_u`` (None if zero).  New nodes (the
    multipliers, the partial derivatives Stein's lemma needs while planning, the
    factors of a factorized expectation) live in ``builder``, a child of the
    forward builder, which is frozen once the kernel is planned: the forward
    program itself never changes.
    """
    builder: Builder
    consumers: dict
    multipliers: dict                   # (piece Var, G-atom) -> Var | None

    @staticmethod
    def arg(program, u) -> Vec:
        return program.readout.vec if u == READOUT else u.arg


@dataclass(frozen=True)
class Program:
    """A lowered Tensor Program.

    ``builder`` holds the forward program's nodes and parameters (frozen);
    ``fixed_names``/``fixed_dims`` name the fixed-dimensional inputs of the input
    layers, which ``prep`` (a callable on the user's input batch) computes
    concretely; ``names`` maps nodes to user-facing names (fx nodes) and
    ``sources`` those names to the user's source lines; ``backward`` is set by
    ``passes.backward``.
    """
    builder: Builder
    readout: Any
    fixed_names: tuple
    fixed_dims: tuple
    prep: Callable
    input_shape: tuple
    names: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    backward: Optional[BackwardProgram] = None
    positions: Positions = field(default_factory=Positions)

    @property
    def params(self):
        return self.builder.params

    @property
    def nodes(self):
        return self.builder.nodes

    @property
    def ONE(self):
        return self.builder.ONE

    def with_backward(self, backward: BackwardProgram) -> "Program":
        return replace(self, backward=backward)
