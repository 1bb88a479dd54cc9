"""The kernel plan: a small typed program over pair arrays, independent of Python syntax.

``kernels.planner`` evaluates the Master Theorem of a lowered program into a
``Plan``; ``codegen`` renders it as Python source (and could render it for
another backend).  A plan is built once per compiled kernel and rendered for
each call mode: against itself (pairs ``i <= j`` packed) or a cross kernel,
with or without the NTK.

Arrays are over *pairs of inputs* (kernels.planner's module docstring has the
layouts).  Node kinds:

* ``Input(side, i)``: the fixed input of input layer ``i`` on side 1 or 2;
  ``Env(name)``: what the runtime provides (``like``: an array whose dtype and
  device results take; ``batch``: the pair layout's batch shape; ``errors``: the
  list error estimates are appended to; ``mc``: the Monte Carlo ``(samples, seed)``;
  ``pairs``: against itself, the rows and columns ``(I, J)`` of the packed pairs);
* ``Lift``/``LiftAll``: a per-input array broadcast into a pair layout;
  ``ToPairs``: a full ``(N1, N2, ...)`` array into the pair layout;
  ``SetDiagonal``: against itself, the ``i == j`` entries replaced (exact ``c = 1``);
* ``Mul``, ``Add`` (ordered, constants in place), ``Rsqrt``, ``Pow``;
* ``Call(fn, args)``: a runtime helper (a stencil, a closed form, a quadrature);
  ``Static(obj)``: a Python object passed by reference (a geometry, a closed form);
  ``Contract``: an einsum whose path codegen fixes at compile time;
* ``Fn(body)``: a function of ``Slot`` values (a quadrature's integrand);
  ``Apply(fn, x)``: an elementwise function applied inside it;
* ``Loop``: a loop over ``count`` steps carrying values (``LoopVar`` inside the
  body, ``LoopOut`` after it): recurrences over time and repeated layers.

Nodes are immutable and interned by ``Plan.make``: equal nodes are the same
object, which is common-subexpression elimination for free.  Values that are
not arrays stay Python values: ``None`` (exactly zero) and floats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PNode:
    __slots__ = ()
    uid: int

    def children(self) -> tuple:
        return tuple(n for f in self._fields if f != "uid" for n in _nodes_in(getattr(self, f)))

    def __repr__(self):
        return f"{type(self).__name__}#{self.uid}"


def _nodes_in(value):
    if isinstance(value, PNode):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _nodes_in(v)


def pnode(cls):
    cls = dataclass(frozen=True, eq=False, repr=False)(cls)
    cls._fields = tuple(f for f in cls.__dataclass_fields__)
    return cls


def _uid():
    return field(default=-1, compare=False)


@pnode
class Input(PNode):
    side: int
    index: int
    uid: int = _uid()


@pnode
class Env(PNode):
    name: str           # "like", "batch", "dbatch", "errors", "mc" or "pairs"
    uid: int = _uid()


@pnode
class Lift(PNode):
    """A per-input array ``(N, *P)`` of ``side`` in the cross pair layout with ``k``
    position axes per group (``k = 0``: no positions, or aligned positions)."""
    x: Any
    side: int
    k: int
    uid: int = _uid()


@pnode
class LiftAll(PNode):
    """A same-input array ``(N, *P)`` of ``side`` in the same-input all-pairs layout
    ``(N, *P, *P)`` (``right``: in the second position group)."""
    x: Any
    right: bool
    k: int
    side: int = 0
    uid: int = _uid()


@pnode
class ToPairs(PNode):
    """A full ``(N1, N2, ...)`` array in the pair layout (packed ``i <= j`` against itself)."""
    x: Any
    uid: int = _uid()


@pnode
class SetDiagonal(PNode):
    """Against itself: the ``i == j``, same-position entries of ``x`` replaced by ``same``
    (so that ``c = 1`` exactly there); a cross kernel keeps ``x``."""
    x: Any
    same: Any
    aligned: bool
    uid: int = _uid()


@pnode
class Mul(PNode):
    factors: tuple      # PNodes and floats, multiplied left to right
    uid: int = _uid()


@pnode
class Add(PNode):
    terms: tuple        # PNodes and floats, added left to right
    uid: int = _uid()


@pnode
class Rsqrt(PNode):
    """``1 / sqrt(x + eps)``."""
    x: Any
    eps: float
    uid: int = _uid()


@pnode
class Pow(PNode):
    x: Any
    p: float
    uid: int = _uid()


@pnode
class Static(PNode):
    """A Python object used by reference (``prefix`` names it in generated code)."""
    obj: Any
    prefix: str
    uid: int = _uid()


@pnode
class Call(PNode):
    """``fn(*args)`` for a runtime helper ``fn``; ``note`` = (what, how) documents an
    expectation (shown in the program printout and as a comment)."""
    fn: Any
    args: tuple
    note: Any = None
    uid: int = _uid()


@pnode
class Contract(PNode):
    """``einsum(equation, *operands)``; ``shapes`` are nominal operand shapes for the path."""
    equation: str
    operands: tuple
    shapes: tuple
    uid: int = _uid()


@pnode
class Slot(PNode):
    """The argument of the enclosing ``Fn`` (``index=None``) or its ``index``-th column."""
    index: Any
    uid: int = _uid()


@pnode
class Apply(PNode):
    """``fn(x)`` for an elementwise torch function, inside a ``Fn`` body."""
    fn: Any
    x: Any
    uid: int = _uid()


@pnode
class Fn(PNode):
    """``lambda z: body``: an integrand; ``body`` uses ``Slot`` for ``z``."""
    body: Any
    uid: int = _uid()


@pnode
class LoopVar(PNode):
    """Inside the body of loop ``loop``: the ``i``-th carried value, or the step counter (``i=None``)."""
    loop: int
    i: Any
    uid: int = _uid()


@pnode
class Loop(PNode):
    """``count`` steps of ``carried = body(carried)`` from ``init``; ``body`` is a tuple of
    values over ``LoopVar(id, i)``.  Read the results with ``LoopOut``."""
    id: int
    count: int
    init: tuple
    body: tuple
    uid: int = _uid()


@pnode
class LoopOut(PNode):
    loop: Any
    i: int
    uid: int = _uid()


# --------------------------------------------------------------------------- #
# Interning and arithmetic
# --------------------------------------------------------------------------- #

def _key(value):
    if isinstance(value, PNode):
        return ("n", value.uid)
    if isinstance(value, tuple):
        return ("t",) + tuple(_key(v) for v in value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return (type(value).__name__, value)
    return ("o", id(value))


class Plan:
    """A kernel plan: interned nodes and the named outputs (node, float or None)."""

    def __init__(self):
        self._table: dict = {}
        self.nodes: list = []
        self.outputs: dict = {}
        self._loops = 0
        self._keep: list = []       # objects referenced by id in keys stay alive
        self.origin: dict = {}      # node uid -> what the planner was computing when it made the node
        self.context = None
        self.seeds: tuple = ()      # a readout at every position: the output pairs' axes (*P, *P)

    def make(self, cls, *fields):
        # a Call's note documents it and is not part of its identity
        keyed = fields[:-1] if cls is Call and len(fields) == 3 else fields
        key = (cls.__name__,) + tuple(_key(f) for f in keyed)
        found = self._table.get(key)
        if found is not None:
            return found
        node = cls(*fields, uid=len(self.nodes))
        self._table[key] = node
        self.nodes.append(node)
        self._keep.append(fields)
        if self.context is not None:
            self.origin[node.uid] = self.context
        return node

    @staticmethod
    def key(value):
        """The hashable key interning compares a value of nodes and constants by."""
        return _key(value)

    def new_loop_id(self) -> int:
        self._loops += 1
        return self._loops

    # arithmetic with constant folding: None is an exact zero, floats are constants
    def mul(self, *factors):
        """``const * f1 * f2 * ...``: constants folded into one leading factor."""
        const, parts = 1.0, []
        for f in factors:
            if f is None:
                return None
            if isinstance(f, float):
                const *= f
            else:
                parts.append(f)
        if const == 0.0:
            return None
        if not parts:
            return const
        if const != 1.0:
            parts.insert(0, const)
        return parts[0] if len(parts) == 1 else self.make(Mul, tuple(parts))

    def add(self, terms):
        """``t1 + t2 + ... + const``: zeros dropped, constants folded into one last term."""
        const, parts = 0.0, []
        for t in terms:
            if t is None:
                continue
            if isinstance(t, float):
                const += t
            else:
                parts.append(t)
        if not parts:
            return const if const != 0.0 else None
        if const != 0.0:
            parts.append(const)
        return parts[0] if len(parts) == 1 else self.make(Add, tuple(parts))

    def call(self, fn, *args, note=None):
        return self.make(Call, fn, tuple(args), note)

    def merge_calls(self, terms, fn) -> list:
        """``terms`` with ``fn(t1, *rest) + fn(t2, *rest) + ...`` as ``fn(t1 + t2 + ..., *rest)``
        (``fn`` linear in its first argument; the merged call takes the first one's place, the
        others become None).  For ``spatial_sum`` the sum of the terms' products is then one
        fused program and one reduction, not a product array and a reduction per term (a
        pooled CNN's NTK: 9 passes over the position-pair arrays instead of 21)."""
        groups: dict = {}
        for i, t in enumerate(terms):
            if isinstance(t, Call) and t.fn is fn:
                groups.setdefault(t.args[1:], []).append(i)
        out = list(terms)
        for rest, at in groups.items():
            if len(at) > 1:
                out[at[0]] = self.call(fn, self.add([terms[i].args[0] for i in at]), *rest)
                for i in at[1:]:
                    out[i] = None
        return out

    def static(self, obj, prefix):
        return self.make(Static, obj, prefix)


def reachable(roots) -> list:
    """Plan nodes reachable from ``roots`` (values or nodes), children first."""
    from .ir.walk import postorder
    return postorder([r for r in roots if isinstance(r, PNode)])


def expectations(plan: Plan, names=("nngp", "ntk")) -> list:
    """``(what, how)`` of every expectation the named outputs use, in plan order."""
    nodes = reachable([plan.outputs.get(n) for n in names])
    return [n.note for n in sorted(nodes, key=lambda n: n.uid) if isinstance(n, Call) and n.note]
