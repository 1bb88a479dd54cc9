"""Readable text of a compiled Tensor Program (forward, backward, evaluators)."""
from __future__ import annotations

from . import ir
from .passes.backward import Backward


def atom_label(node) -> str:
    """Stable name of an atom in printouts: ``g<uid>`` (Gaussian) or ``h<uid>``."""
    return f"{'g' if getattr(node, 'gaussian', False) else 'h'}{node.uid}"


def _scalar(s, names) -> str:
    if isinstance(s, ir.SConst):
        return f"{s.value:g}"
    if isinstance(s, ir.SMoment):
        what = "mean" if s.which == "mean" else "meansq"
        return f"{what}({_vec(s.vec, names)})"
    if s.op == "rsqrt":
        return f"rsqrt({_scalar(s.args[0], names)} + {s.eps:g})"
    if s.op == "pow":
        return f"({_scalar(s.args[0], names)})^{s.eps:g}"
    sym = " * " if s.op == "mul" else " + "
    return "(" + sym.join(_scalar(a, names) for a in s.args) + ")"


def _var(v, names) -> str:
    if not v.terms:
        return "0"
    out = []
    for c, a in v.terms:
        atom = "1" if isinstance(a, ir.HAtom) and not a.gargs else names(a)
        if isinstance(c, ir.SConst) and c.value == 1.0:
            out.append(atom)
        else:
            out.append(f"{_scalar(c, names)}*{atom}")
    return " + ".join(out)


def _vec(v, names) -> str:
    if len(v.pieces) == 1:
        return _var(v.pieces[0][1], names)
    return "cat(" + ", ".join(f"{a}: {_var(x, names)}" for a, x in v.pieces) + ")"


def _expr(e, slots, names) -> str:
    if isinstance(e, ir.ESlot):
        return slots[e.index]
    if isinstance(e, ir.EConst):
        return f"{e.value:g}"
    if isinstance(e, ir.ECall):
        return f"{e.fn.name}({_expr(e.arg, slots, names)})"
    if isinstance(e, ir.EMul):
        return " * ".join(f"({_expr(a, slots, names)})" for a in e.args)
    return " + ".join(f"{_scalar(c, names)}*({_expr(x, slots, names)})" for c, x in e.terms)


def _backward_atom(u, names) -> str:
    if u == Backward.READOUT:
        return "v (readout)"
    if isinstance(u, ir.GPool):
        return f"avgpool^T d{names(u)}"
    return f"W[{u.param.name}]^T d{names(u)}"


def format_program(program: ir.Program, evaluators=()) -> str:
    names = atom_label
    # the user's fx node that produced each atom (when a node's value is that atom alone)
    origin = {var.terms[0][1]: name for var, name in program.names.items()
              if isinstance(var, ir.Var) and len(var.terms) == 1}
    b = program.builder
    lines = ["Tensor Program (NTK parametrization, width n -> infinity)", "", "parameters:"]
    for p in b.params:
        if isinstance(p, ir.Matrix):
            extra = f", fan_in={p.fan_in}" if p.kind == "input" else ""
            lines.append(f"  {p.name:<28} {p.kind} matrix   W_std={p.W_std:g}{extra}")
        elif isinstance(p, ir.Bias):
            lines.append(f"  {p.name:<28} bias            b_std={p.b_std:g}")
        else:
            kinds = "+".join(k for k, on in (("gain", p.gain), ("shift", p.shift)) if on)
            lines.append(f"  {p.name:<28} norm affine     {kinds} (PyTorch init, unscaled)")
    r = program.readout
    lines.append(f"  {r.name:<28} readout         W_std={r.W_std:g}"
                 + (f", b_std={r.b_std:g}" if r.has_bias else "") + f", {r.out_features} output(s)")
    lines += ["", "forward:"]
    for i, (nm, d) in enumerate(zip(program.fixed_names, program.fixed_dims)):
        lines.append(f"  x{i} = {nm}  (fixed input of shape {tuple(d)})")
    for node in b.nodes:
        if isinstance(node, ir.GInput):
            op = "conv" if node.param.conv is not None else ""
            lines.append(f"  {names(node)} = U[{node.param.name}] {op}* x{node.fixed}    # G (input layer)")
        elif isinstance(node, ir.GMatMul):
            op = "conv* " if node.param.conv is not None else ""
            lines.append(f"  {names(node)} = W[{node.param.name}] {op}({_vec(node.arg, names)})    # G")
        elif isinstance(node, ir.GPool):
            kind = "G" if node.gaussian else "linear in H-vars"
            lines.append(f"  {names(node)} = avgpool{node.geom.kernel}/{node.geom.stride} "
                         f"({_vec(node.arg, names)})    # {kind}")
        elif isinstance(node, ir.GBias):
            lines.append(f"  {names(node)} = b[{node.param.name}]    # G (bias)")
        elif isinstance(node, ir.GProbe):
            lines.append(f"  {names(node)} = 0 (probe for {node.param.name} gain/shift)    # G")
        elif isinstance(node, ir.HAtom) and node.gargs:
            slots = [f"[{_var(g, names)}]" for g in node.gargs]
            lines.append(f"  {names(node)} = {_expr(node.expr, slots, names)}    # H of {len(slots)} G-var(s)")
        else:
            continue
        if node in origin:
            lines[-1] += f"  <- {origin[node]}"
    scale = "" if r.scale == 1.0 else f"{r.scale:g} * "
    pooled = {"gap": "mean over positions of ", "flatten": "flatten over positions of "}.get(r.pool, "")
    lines.append(f"  f = {scale}(W_std/sqrt(n)) v[{r.name}] . {pooled}({_vec(r.vec, names)})"
                 + (" + b_std beta" if r.has_bias else "") + "    # readout")
    bw = Backward(program)
    lines += ["", "backward (gradient independence assumption; Simple GIA Check passed):"]
    for g, users in bw.consumers.items():
        srcs = ", ".join(_backward_atom(u, names) for u in users)
        lines.append(f"  d{names(g)} <- {srcs}")
    if evaluators:
        lines += ["", "expectations (evaluator):"]
        seen = set()
        for desc, how in evaluators:
            if (desc, how) in seen:
                continue
            seen.add((desc, how))
            lines.append(f"  {desc:<40} {how}")
    return "\n".join(lines)
