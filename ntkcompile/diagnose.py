"""Where a kernel value that is not finite comes from, said in the user's terms.

``CompiledKernel`` checks every tile it returns.  When a value is NaN or inf it
re-runs the tile with code that checks every array as it is computed
(``codegen.render(check=True)``), finds the first one that is not finite, and
this module turns it into a message: the expectation being computed (the
planner's request that made the array, ``Plan.origin``), the program lines of
the vectors involved, the model nodes and source lines they come from, and the
likely cause.
"""
from __future__ import annotations

from .ir import Atom, HAtom, Scalar, Var, Vec, walk
from .ir.printer import Printer, atom_label, atom_origins

_PAIRS = {"x": "an input of x1 against one of x2", "d1": "each input of x1 with itself",
          "d2": "each input of x2 with itself", "f1": "each input of x1, all position pairs",
          "f2": "each input of x2, all position pairs"}


def _atoms_of(values) -> list:
    """The atoms a request's vectors and numbers are made of (and the atoms under their slots)."""
    roots = [v for v in values if isinstance(v, (Var, Vec, Atom, Scalar))]
    kids = lambda n: n.children() if isinstance(n, (Var, Vec, HAtom, Scalar)) else ()  # noqa: E731
    return [n for n in walk.postorder(roots, kids) if isinstance(n, Atom)]


def _request(key, show) -> tuple:
    """``(description, IR values)`` of a planner request key."""
    if key is None:
        return "the readout's combination of the kernels", []
    kind, *rest = key
    if kind == "fixed":
        return f"the input of input layer {rest[0]}, computed from x before the first layer", []
    if kind in ("E", "A"):
        u, v, pair = rest
        text = f"E[{show(u)} * {show(v)}'] for {_PAIRS.get(pair, pair)}"
        return text, [u, v]
    if kind == "M":
        a, side = rest
        return f"E[{atom_label(a)}] for each input of x{side}", [a]
    if kind == "S":
        s, side = rest
        return f"the per-input number {show(s)} on x{side}", [s]
    if kind == "D":
        k, l, w = rest
        extra = " weighted by the normalized input (a normalization's gain)" if w is not None else ""
        return f"the backward covariance E[d{atom_label(k)} d{atom_label(l)}']{extra}", [k, l]
    return repr(key), []


_CAUSES = {
    "Input": "the model's own computation on x before its first layer (e.g. x / x.norm(...) of an "
             "all-zero row) returned NaN or inf for some input",
    "Rsqrt": "a division by a width average that is 0 for some input: a normalization "
             "(LayerNorm, RMSNorm, x / x.norm(...)) of a vector that is zero there, with eps = 0",
    "Pow": "a power or a division of a per-input number (a width average) that is 0 or "
           "negative for some input (e.g. x / x.norm(...) of an all-zero input row)",
    "Contract": "the inputs' scale: the products of input entries overflow float64",
    "Call": "an expectation that overflowed, or a function that returned NaN or inf on the "
            "quadrature nodes (a user-registered function, or exp/cosh of a large variance)",
}


def explain(program, failure, which: str, x_max: float) -> str:
    """The message for ``failure`` (a ``codegen.NonFiniteValue``) in the kernel ``which``."""
    show = Printer()
    what, values = _request(failure.origin, show)
    lines = [f"the {which} kernel has NaN or inf entries. The first array that is not finite is "
             f"{what} ({failure.kind} in the kernel plan)."]
    origin = atom_origins(program)
    for a in _atoms_of(values)[-6:]:
        if a is program.ONE:
            continue
        rhs = show.expr(a.expr, [f"[{show(g)}]" for g in a.gargs]) if isinstance(a, HAtom) else a.describe(show)
        where = ""
        if a in origin:
            where = f"  <- node '{origin[a]}' at {program.sources.get(origin[a], '<source unknown>')}"
        lines.append(f"    {atom_label(a)} = {rhs}{where}")
    if failure.origin and failure.origin[0] == "fixed":
        name = program.fixed_names[failure.origin[1]]
        lines.append(f"    it is node '{name}' at {program.sources.get(name, '<source unknown>')}")
    cause = _CAUSES.get(failure.kind, f"an overflow in {failure.kind}")
    lines.append(f"  Likely cause: {cause}.")
    if x_max > 1e100 or 0 < x_max < 1e-100:
        lines.append(f"  The inputs are of scale {x_max:.3g}: rescale them (the kernels of this model "
                     "do not scale exactly with its inputs).")
    return "\n".join(lines)
