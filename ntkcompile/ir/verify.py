"""The IR verifier: the invariants every stage may rely on, checked between stages.

``verify(program)`` runs after the backward pass and again after planning, on
every program ``compile()`` builds (so on every program of the test suite).  It
collects every violation and raises ``IRError`` listing them; a violation is a
bug in a pass or in a registered rule, never bad user input.

Checked:

* **closed**: the builder is frozen, every node's children belong to the program
  and were created before it (the node list is in topological order), every
  node is reachable from the readout (no dangling nodes), every parameter is
  used;
* **types**: each node's fields have the kinds its class declares (scalars,
  expressions, atoms, Vars, Vecs), canonical forms are canonical (terms sorted by
  atom, no zero coefficient, fractions of a Vec positive and summing to 1), an
  H-atom's slots are purely Gaussian Vars (nonlinearities are composed, never
  nested) and its expression uses exactly its slots;
* **fixed vs width axes**: input-layer atoms read an existing fixed input with a
  matrix of kind ``"input"``, hidden atoms a width vector with a matrix of kind
  ``"hidden"``; the positions of the terms of a Var agree; an atom kind's own
  conditions (``Atom.check``: a convolution's geometry matches its argument);
* **GIA** (the Simple GIA Check, TP II Sec. 4): the readout matrix is fresh (no
  weight of the network has its name), the readout sees a vector without
  positions unless it pools or flattens them;
* **backward program**: consumers consume (``Atom.consumes`` or the readout)
  and read the atom off, every multiplier a consumer needs exists and belongs to
  the backward program or the forward one.
"""
from __future__ import annotations

from fractions import Fraction

from ..errors import IRError
from . import walk
from .elementwise import Elementwise
from .nodes import (Atom, ECall, EConst, ELin, EMul, ESlot, Expr, GBias, GInput, GMatMul, HAtom, Matrix, Param,
                    Scalar, SConst, SMoment, SOp, SSelect, Var, Vec, Bias)
from .program import READOUT

_MAX_SHOWN = 20


def verify(program):
    """Check ``program``'s invariants (module docstring); returns it, or raises ``IRError``."""
    problems = _Verifier(program).run()
    if problems:
        shown = "\n  - ".join(problems[:_MAX_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise IRError(f"internal error: the Tensor Program failed verification "
                      f"({len(problems)} problem(s)); please report it:\n  - {shown}{more}")
    return program


class _Verifier:
    def __init__(self, program):
        self.p = program
        self.problems: list = []
        self.params = {id(p) for p in program.params}

    def bad(self, node, msg):
        self.problems.append(f"{node!r}: {msg}")

    # ------------------------------------------------------------ program
    def run(self):
        p = self.p
        b = p.builder
        if not b.frozen:
            self.problems.append("the forward program is not frozen")
        self.check_nodes(b.nodes, b)
        live = {id(n) for n in walk.postorder([p.readout.vec, b.ONE])}
        for n in b.nodes:
            if id(n) not in live:
                self.bad(n, "dangling: not reachable from the readout")
        self.check_params()
        self.check_readout()
        if p.backward is not None:
            self.check_backward()
        return self.problems

    def check_nodes(self, nodes, builder):
        for n in nodes:
            for c in n.children():
                if not builder.owns(c):
                    self.bad(n, f"references {c!r}, which is not part of the program")
                elif c.uid >= n.uid:
                    self.bad(n, f"references {c!r}, created after it (not topologically ordered)")
            check = None
            for cls in type(n).__mro__:
                check = _CHECKS.get(cls)
                if check is not None:
                    break
            if check is None:
                self.bad(n, f"unknown node type {type(n).__name__}")
            else:
                check(self, n)

    def check_params(self):
        seen: dict = {}
        uses: dict = {}
        for n in self.p.nodes:
            param = getattr(n, "param", None)
            if isinstance(n, Atom) and param is not None:
                uses.setdefault(id(param), []).append(n)
        for prm in self.p.params:
            if not isinstance(prm, Param):
                self.problems.append(f"parameter {prm!r} is not an ir.Param")
                continue
            key = (type(prm).__name__, prm.name)
            if key in seen:
                self.problems.append(f"two {key[0]} parameters are named {prm.name!r}")
            seen[key] = prm
            if id(prm) not in uses:
                self.problems.append(f"parameter {prm.name!r} is used by no atom (dangling)")
            if isinstance(prm, Matrix):
                kinds = {type(a).__name__ for a in uses.get(id(prm), ())}
                want = GInput if prm.kind == "input" else GMatMul
                wrong = [a for a in uses.get(id(prm), ()) if not isinstance(a, want)]
                if prm.kind not in ("input", "hidden"):
                    self.problems.append(f"matrix {prm.name!r} has kind {prm.kind!r}")
                elif wrong:
                    self.problems.append(f"{prm.kind} matrix {prm.name!r} is used by {sorted(kinds)}: an input "
                                         "layer reads a fixed input, a hidden matrix a width vector")

    def check_readout(self):
        r = self.p.readout
        if not isinstance(r.vec, Vec) or not self.p.builder.owns(r.vec):
            self.problems.append("the readout's vector is not a Vec of the program")
            return
        hidden = {prm.name for prm in self.p.params if isinstance(prm, Matrix)}
        if r.name in hidden:
            self.problems.append(f"Simple GIA Check: the readout weight {r.name!r} is also used inside the network")
        pos = self.p.positions(r.vec)
        if r.pool not in (None, "gap", "flatten", "steps"):
            self.problems.append(f"the readout pools with {r.pool!r}")
        elif r.pool is None and pos:
            self.problems.append(f"the readout sees a vector with positions {pos} without pooling them")
        elif r.pool is not None and tuple(r.positions) != tuple(pos):
            self.problems.append(f"the readout pools positions {r.positions} of a vector with positions {pos}")

    def check_backward(self):
        bw = self.p.backward
        if bw.builder.parent is not self.p.builder:
            self.problems.append("the backward program's builder is not a child of the forward program's")
        self.check_nodes(bw.builder.nodes, bw.builder)
        for g, users in bw.consumers.items():
            if not self.p.builder.owns(g) or not (g.gaussian or g.read_off):
                self.bad(g, "has consumers but is not a G-atom of the forward program")
            for u in users:
                if u != READOUT and not getattr(type(u), "consumes", False):
                    self.bad(g, f"lists {u!r} as a consumer, which consumes no vector")
                    continue
                for _, piece in bw.arg(self.p, u).pieces:
                    if (piece, g) not in bw.multipliers:
                        self.bad(g, f"has no multiplier d{piece!r}/d{g!r} for its consumer {u!r}")
                        continue
                    m = bw.multipliers[(piece, g)]
                    if m is not None and not (isinstance(m, Var) and bw.builder.owns(m)):
                        self.bad(g, f"multiplier {m!r} is not a Var of the program")


# ------------------------------------------------------------------ node checks

def _scalar_ok(s) -> bool:
    return isinstance(s, Scalar)


def _check_sconst(v, s):
    if not isinstance(s.value, float):
        v.bad(s, "a constant must be a float")


def _check_smoment(v, s):
    if s.which not in ("mean", "sq") or not isinstance(s.vec, Vec):
        v.bad(s, "a moment is mean or sq of a Vec")


def _check_sop(v, s):
    arity = {"add": 2, "mul": 2, "rsqrt": 1, "pow": 1, "posmean": 1}.get(s.op)
    if arity is None or len(s.args) != arity or not all(_scalar_ok(a) for a in s.args):
        v.bad(s, f"op {s.op!r} with {len(s.args)} argument(s)")


def _check_sselect(v, s):
    if getattr(s.map, "select", None) is None or not _scalar_ok(s.arg):
        v.bad(s, "a selected scalar reads a scalar at the positions of a selection")


def _check_expr(v, e):
    if isinstance(e, ESlot):
        ok = isinstance(e.index, int) and e.index >= 0
    elif isinstance(e, EConst):
        ok = isinstance(e.value, float)
    elif isinstance(e, ECall):
        ok = isinstance(e.fn, Elementwise) and isinstance(e.arg, Expr)
    elif isinstance(e, ELin):
        ok = bool(e.terms) and all(_scalar_ok(c) and isinstance(x, Expr) for c, x in e.terms)
    elif isinstance(e, EMul):
        ok = len(e.args) >= 2 and all(isinstance(x, Expr) and not isinstance(x, EConst) for x in e.args)
    else:
        ok = False
    if not ok:
        v.bad(e, "malformed expression")


def _slots(expr) -> set:
    return {e.index for e in walk.postorder([expr], lambda e: tuple(x for _, x in e.terms)
                                            if isinstance(e, ELin) else e.children()) if isinstance(e, ESlot)}


def _check_hatom(v, a):
    if not isinstance(a.expr, Expr):
        v.bad(a, "an H-atom's expression is not an Expr")
        return
    for i, g in enumerate(a.gargs):
        if not isinstance(g, Var) or not g.gaussian:
            v.bad(a, f"slot {i} is not a purely Gaussian Var (compose nonlinearities, do not nest them)")
    if _slots(a.expr) != set(range(len(a.gargs))):
        v.bad(a, f"its expression uses slots {sorted(_slots(a.expr))} of {len(a.gargs)}")


def _check_param_atom(v, a):
    if id(a.param) not in v.params:
        v.bad(a, f"its parameter {getattr(a.param, 'name', a.param)!r} is not in the program")
    if isinstance(a, GInput):
        if not isinstance(a.param, Matrix) or a.param.kind != "input":
            v.bad(a, "an input layer needs a matrix of kind 'input'")
        if not 0 <= a.fixed < len(v.p.fixed_names):
            v.bad(a, f"reads fixed input {a.fixed} of {len(v.p.fixed_names)}")
    elif isinstance(a, GMatMul):
        if not isinstance(a.param, Matrix) or a.param.kind != "hidden":
            v.bad(a, "a hidden matmul needs a matrix of kind 'hidden'")
        if not isinstance(a.arg, Vec):
            v.bad(a, "a matmul's argument is not a Vec")
    elif isinstance(a, GBias) and not isinstance(a.param, Bias):
        v.bad(a, "a bias atom needs a Bias parameter")


def _check_atom(v, a):
    if isinstance(a, HAtom):
        _check_hatom(v, a)
    elif getattr(a, "param", None) is not None:
        _check_param_atom(v, a)
    for problem in a.check(v.p):
        v.bad(a, problem)


def _check_var(v, var):
    uids = []
    for term in var.terms:
        if not (isinstance(term, tuple) and len(term) == 2 and _scalar_ok(term[0]) and isinstance(term[1], Atom)):
            v.bad(var, "a term is not a (scalar, atom) pair")
            return
        c, a = term
        if isinstance(c, SConst) and c.value == 0.0:
            v.bad(var, f"the coefficient of {a!r} is 0")
        uids.append(a.uid)
    if uids != sorted(set(uids)):
        v.bad(var, "terms are not in canonical order (sorted by atom, each atom once)")
    shapes = {v.p.positions(a) for _, a in var.terms} - {()}
    if len(shapes) > 1:
        v.bad(var, f"adds vectors with different positions {sorted(shapes)}")


def _check_vec(v, vec):
    if not vec.pieces or any(not isinstance(f, Fraction) or f <= 0 or not isinstance(x, Var)
                             for f, x in vec.pieces):
        v.bad(vec, "a piece is not a (positive Fraction, Var) pair")
    elif sum(f for f, _ in vec.pieces) != 1:
        v.bad(vec, "the fractions of its pieces do not sum to 1")


def _check_scalar(v, s):
    for problem in s.check(v.p):
        v.bad(s, problem)


_CHECKS = {Scalar: _check_scalar, SConst: _check_sconst, SMoment: _check_smoment, SOp: _check_sop,
           SSelect: _check_sselect, Expr: _check_expr,
           Atom: _check_atom, Var: _check_var, Vec: _check_vec}
