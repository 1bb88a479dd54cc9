"""The backward pass: builds the backward program under the gradient independence
assumption (TP II Sec. 4; ``ir.program.BackwardProgram``).

Every forward vector is a function of G-atoms, ``x = F_x(G_1, ..., G_m)``.  The
scaled gradient of a G-atom is then a sum over its *consumers* ``u``: the
readout ``f = v.x_L/sqrt(n)`` and every atom that is a linear map of a vector
(``Atom.consumes``: ``y_u = W z_u``, a convolution, a pooling)::

    dG_k = sum_u  (dF_{z_u} / dG_k)  *  B_u,      B_u = v  or  W^T dy_u.

Under GIA the ``B_u`` are Gaussian, independent of every forward vector, and two
of them covary only if they come from the same matrix:
``E[W^T dy  W^T dy'] = W_std^2 E[dy dy']``.  So ``D = E[dG dG']`` factorizes
into forward expectations of the multipliers ``dF/dG`` times backward
covariances (``kernels.planner.Planner.D``).  This pass computes the consumers
and the multipliers symbolically; moments are constants in the limit (their
derivatives contribute ``E[dy] = 0``), which is why LayerNorm's backward is
``dy / sqrt(Var + eps)``.  The multipliers are new nodes: they live in the
backward program's own builder, never in the forward program.
"""
from __future__ import annotations

from ..ir import READOUT, BackwardProgram, Builder, HAtom, Var


def read_off_atoms(var: Var) -> list:
    """The atoms whose gradient a Var's backward reads off directly: G-atoms and
    ``read_off`` atoms (a pooling) as they are, the slots' atoms of an H-atom."""
    out = []
    for _, a in var.terms:
        if a.read_off or a.gaussian:
            out.append(a)
        elif isinstance(a, HAtom):
            for g in a.gargs:
                out.extend(b for _, b in g.terms)
    seen = []
    for a in out:
        if a not in seen:
            seen.append(a)
    return seen


def derivative(b: Builder, var: Var, g) -> "Var | None":
    """``d var / d g`` as a forward Var (None if zero)."""
    terms = []
    for c, a in var.terms:
        if a is g:
            terms.append((c, b.ONE))
        elif isinstance(a, HAtom):
            for j, garg in enumerate(a.gargs):
                coef = next((cc for cc, aa in garg.terms if aa is g), None)
                if coef is None:
                    continue
                dexpr = b.differentiate(a.expr, j)
                for c2, atom in b.expr_var(dexpr, a.gargs).terms:
                    terms.append((b.smul(b.smul(c, coef), c2), atom))
    out = b.var(terms) if terms else None
    if out is not None and not out.terms:
        out = None
    return out


def consumers(program) -> dict:
    """``{atom: [consumers]}``: for every atom read off in the backward, the linear maps that
    read it (``Atom.consumes``) and the readout, in program order."""
    out: dict = {}
    users = [a for a in program.nodes if getattr(type(a), "consumes", False)] + [READOUT]
    for u in users:
        for _, var in BackwardProgram.arg(program, u).pieces:
            for g in read_off_atoms(var):
                lst = out.setdefault(g, [])
                if u not in lst:
                    lst.append(u)
    return out


def backward(program):
    """The program with its backward program: consumers and every multiplier."""
    b = Builder(parent=program.builder)
    found = consumers(program)
    multipliers: dict = {}
    for g, us in found.items():
        for u in us:
            for _, piece in BackwardProgram.arg(program, u).pieces:
                if (piece, g) not in multipliers:
                    multipliers[(piece, g)] = derivative(b, piece, g)
    return program.with_backward(BackwardProgram(
        builder=b, consumers={g: tuple(us) for g, us in found.items()}, multipliers=multipliers))
