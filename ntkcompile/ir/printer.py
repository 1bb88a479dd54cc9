"""Readable text of a compiled Tensor Program (forward, backward, evaluators)."""
from __future__ import annotations

from . import walk
from .nodes import (Atom, ECall, EConst, ELin, EMul, ESlot, GBias, HAtom, Scalar, SConst, SMoment, SOp, SSelect,
                    Var, Vec)
from .program import READOUT


def atom_label(node) -> str:
    """Stable name of an atom in printouts: ``g<uid>`` (Gaussian) or ``h<uid>``."""
    return f"{'g' if getattr(node, 'gaussian', False) else 'h'}{node.uid}"


def _scalar_rule():
    def sop(s, xs):
        if s.op == "rsqrt":
            return f"rsqrt({xs[0]} + {s.param:g})"
        if s.op == "pow":
            return f"({xs[0]})^{s.param:g}"
        if s.op == "posmean":
            return f"posmean({xs[0]})"
        return "(" + (" * " if s.op == "mul" else " + ").join(xs) + ")"

    return {
        SConst: lambda s, _: f"{s.value:g}",
        SMoment: lambda s, xs: f"{'mean' if s.which == 'mean' else 'meansq'}({xs[0]})",
        SOp: sop,
        SSelect: lambda s, xs: f"{xs[0]}{s.map.label}",
        Scalar: lambda s, xs: s.describe(xs),
    }


class Printer:
    """Text of scalars, Vars, Vecs and expressions (memoized, without recursion)."""

    def __init__(self, label=atom_label):
        self.label = label
        self.memo: dict = {}
        rules = dict(_scalar_rule())
        rules[Var] = self._var
        rules[Vec] = self._vec
        self.rule = walk.by_type(rules, default=lambda n, _: self.label(n))

    def __call__(self, node) -> str:
        return walk.fold(node, self.rule, self.memo, children=self._children)

    @staticmethod
    def _children(n):
        if isinstance(n, (Var, Vec, Scalar)):
            return n.children()
        return ()          # atoms print by label; their own line shows their insides

    def _var(self, v, xs):
        if not v.terms:
            return "0"
        out = []
        for (c, a), (cs, as_) in zip(v.terms, zip(xs[0::2], xs[1::2])):
            atom = "1" if isinstance(a, HAtom) and not a.gargs else as_
            out.append(atom if isinstance(c, SConst) and c.value == 1.0 else f"{cs}*{atom}")
        return " + ".join(out)

    def _vec(self, v, xs):
        if len(v.pieces) == 1:
            return xs[0]
        return "cat(" + ", ".join(f"{a}: {x}" for (a, _), x in zip(v.pieces, xs)) + ")"

    def expr(self, e, slots) -> str:
        def lin(e, xs):
            return " + ".join(f"{self(c)}*({x})" for (c, _), x in zip(e.terms, xs))

        rule = walk.by_type({
            ESlot: lambda e, _: slots[e.index],
            EConst: lambda e, _: f"{e.value:g}",
            ECall: lambda e, xs: f"{e.fn.name}({xs[0]})",
            EMul: lambda e, xs: " * ".join(f"({x})" for x in xs),
            ELin: lin,
        })
        return walk.fold(e, rule, children=lambda e: tuple(x for _, x in e.terms) if isinstance(e, ELin)
                         else e.children())


def _h_line(node, show) -> str:
    slots = [f"[{show(g)}]" for g in node.gargs]
    return f"{show.expr(node.expr, slots)}    # H of {len(slots)} G-var(s)"


def _backward_atom(u, show, readout) -> str:
    if u == READOUT:
        return f"v[{readout.name}]"
    return u.backward_label(show)


def atom_origins(program) -> dict:
    """The user's module or source line that first produced each atom (``program.names``:
    when a node's value is that atom, possibly plus biases)."""
    origin = {}
    for var, where in program.names.items():
        if isinstance(var, Var):
            main = [a for _, a in var.terms if not isinstance(a, GBias)]
            if len(main) == 1:
                origin.setdefault(main[0], where)
    return origin


def multiplier_text(m, show) -> str:
    """A backward multiplier ``d piece / d g``: a derivative such as ``relu'(g3 + g4)`` written out."""
    if len(m.terms) == 1:
        c, a = m.terms[0]
        if isinstance(c, SConst) and c.value == 1.0 and isinstance(a, HAtom) and a.gargs:
            return show.expr(a.expr, [show(g) for g in a.gargs])
    return show(m)


def format_program(program, evaluators=()) -> str:
    show = Printer()
    origin = atom_origins(program)
    lines = ["Tensor Program (NTK parametrization, width n -> infinity; TP II Sec. 2-4)", "", "parameters:"]
    for p in program.params:
        lines.append(f"  {p.name:<28} {p.describe()}")
    r = program.readout
    lines.append(f"  {r.name:<28} readout         W_std={r.W_std:g}"
                 + (f", b_std={r.b_std:g}" if r.has_bias else "") + f", {r.out_features} output(s)")
    lines += ["", "forward (g: G-vars, Gaussian in the limit; h: H-vars, nonlinearities of G-vars; "
              "# from: the module or source line):"]
    for i, (nm, d) in enumerate(zip(program.fixed_names, program.fixed_dims)):
        lines.append(f"  x{i} = {nm}  (fixed input of shape {tuple(d)})")
    for node in program.nodes:
        if not isinstance(node, Atom) or node is program.ONE:
            continue
        rhs = _h_line(node, show) if isinstance(node, HAtom) else node.describe(show)
        lines.append(f"  {atom_label(node)} = {rhs}" + (f"; from {origin[node]}" if node in origin else ""))
    scale = "" if r.scale == 1.0 else f"{r.scale:g} * "
    pooled = {"gap": "mean over positions of ", "flatten": "flatten over positions of "}.get(r.pool, "")
    at = "_s" if r.pool == "steps" else ""
    lines.append(f"  f{at} = {scale}(W_std/sqrt(n)) v[{r.name}] . {pooled}({show(r.vec)}){at}"
                 + (" + b_std beta" if r.has_bias else "")
                 + ("    # readout at every position s" if at else "    # readout"))
    bw = program.backward
    if bw is not None:
        lines += ["", "backward (TP II Sec. 4), from the readout back: dg = sqrt(n) df/dg for every G-var g.",
                  "  Gradient independence: each W^T is a fresh copy of W, independent of the forward pass",
                  "  (the Simple GIA Check passed: the readout v is used nowhere else)."]
        for g in sorted(bw.consumers, key=lambda a: a.uid, reverse=True):
            parts = []
            for u in bw.consumers[g]:
                ms = [bw.multipliers[(piece, g)] for _, piece in bw.arg(program, u).pieces]
                ms = [multiplier_text(m, show) for m in ms if m is not None]
                mult = " + ".join(ms) if ms else "0"
                src = _backward_atom(u, show, r)
                parts.append(src if mult == "1" else f"{mult} * {src}" if len(ms) == 1 else f"({mult}) * {src}")
            lines.append(f"  d{atom_label(g)} = " + " + ".join(parts))
        derived = [n for n in bw.builder.nodes if isinstance(n, HAtom) and n.gargs]
        if derived:
            lines += ["", "derived (derivatives and factors used by the backward pass and planning):"]
            for node in derived:
                lines.append(f"  {atom_label(node)} = {_h_line(node, show)}")
    if evaluators:
        lines += ["", "expectations (evaluator):"]
        seen = set()
        for desc, how in evaluators:
            if (desc, how) in seen:
                continue
            seen.add((desc, how))
            lines.append(f"  {desc:<40} {how}")
    return "\n".join(lines)
