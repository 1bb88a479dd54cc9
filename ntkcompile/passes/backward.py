"""The backward program under the gradient independence assumption (TP II Sec. 4).

Every forward vector is a function of G-atoms, ``x = F_x(G_1, ..., G_m)``.  The
scaled gradient of a G-atom is then a sum over its *consumers* ``u``: the
readout ``f = v.x_L/sqrt(n)`` and every matmul ``y_u = W z_u``::

    dG_k = sum_u  (dF_{z_u} / dG_k)  *  B_u,      B_u = v  or  W^T dy_u.

Under GIA the ``B_u`` are Gaussian, independent of every forward vector, and two
of them covary only if they come from the same matrix:
``E[W^T dy  W^T dy'] = W_std^2 E[dy dy']``.  So ``D = E[dG dG']`` factorizes
into forward expectations of the multipliers ``dF/dG`` times backward
covariances (see ``kernels.master.Planner.D``).  This pass computes consumers
and the multipliers symbolically; moments are constants in the limit (their
derivatives contribute ``E[dy] = 0``), which is why LayerNorm's backward is
``dy / sqrt(Var + eps)``.
"""
from __future__ import annotations

from .. import ir
from ..kernels.elementwise import Elementwise

_DERIVATIVES: dict = {}


def derivative_elementwise(fn: Elementwise) -> Elementwise:
    """``phi'`` as an Elementwise whose closed forms are ``phi``'s ``dvt``/``dmean``."""
    d = _DERIVATIVES.get(fn)       # keyed by the entry itself: names may be reused by user entries
    if d is None:
        d = Elementwise(name=fn.name + "'", fn=fn.derivative, vt=fn.dvt, mean=fn.dmean,
                        smooth=fn.smooth, vt_angle=fn.dvt_angle)
        _DERIVATIVES[fn] = d
        _JUMPS[d.name] = not fn.smooth
    return d


# Functions with jumps: Stein's lemma (which uses the distributional derivative)
# must not be applied to them with their almost-everywhere derivative.
_JUMPS = {"step": True, "sign": True}


def has_jump(fn: Elementwise) -> bool:
    return _JUMPS.get(fn.name, fn.name.startswith("heaviside"))


def expr_has_jump(expr) -> bool:
    if isinstance(expr, ir.ECall):
        return has_jump(expr.fn) or expr_has_jump(expr.arg)
    if isinstance(expr, ir.ELin):
        return any(expr_has_jump(e) for _, e in expr.terms)
    if isinstance(expr, ir.EMul):
        return any(expr_has_jump(e) for e in expr.args)
    return False


class Backward:
    """Consumers of every G-atom and the multipliers ``dF/dG`` (memoized).

    An average pooling is both: a consumer of its argument (its backward atom is
    ``pool^T dP``) and an atom read off by its own consumers.
    """

    READOUT = "readout"

    def __init__(self, program: ir.Program):
        self.program = program
        self.b = program.builder
        self.consumers: dict = {}
        self._deriv: dict = {}
        users = [a for a in self.b.nodes if isinstance(a, (ir.GMatMul, ir.GPool))] + [self.READOUT]
        for u in users:
            for _, var in self.arg(u).pieces:
                for g in self.gatoms(var):
                    lst = self.consumers.setdefault(g, [])
                    if u not in lst:
                        lst.append(u)

    def arg(self, u) -> ir.Vec:
        return self.program.readout.vec if u == self.READOUT else u.arg

    @staticmethod
    def gatoms(var: ir.Var):
        """G-atoms a Var depends on directly (not through other matmuls)."""
        out = []
        for _, a in var.terms:
            if a.gaussian or isinstance(a, ir.GPool):   # a pool is read off like a G-atom
                out.append(a)
            else:
                for g in a.gargs:
                    out.extend(b for _, b in g.terms)
        seen = []
        for a in out:
            if a not in seen:
                seen.append(a)
        return seen

    def deriv(self, var: ir.Var, g) -> "ir.Var | None":
        """``d var / d g`` as a forward Var (None if zero)."""
        key = (var, g)
        if key in self._deriv:
            return self._deriv[key]
        b = self.b
        terms = []
        for c, a in var.terms:
            if a is g:
                terms.append((c, b.ONE))
            elif isinstance(a, ir.HAtom):
                for j, garg in enumerate(a.gargs):
                    coef = next((cc for cc, aa in garg.terms if aa is g), None)
                    if coef is None:
                        continue
                    dexpr = b.differentiate(a.expr, j, derivative_elementwise)
                    for c2, atom in self._expr_var(dexpr, a.gargs).terms:
                        terms.append((b.smul(b.smul(c, coef), c2), atom))
        out = b.var(terms) if terms else None
        if out is not None and not out.terms:
            out = None
        self._deriv[key] = out
        return out

    def times(self, m: ir.Var, w) -> ir.Var:
        """The elementwise product ``m * w`` of two Vars in the same coordinates."""
        return self.b._compose(lambda es: self.b.emul(es), [m, w])

    def _expr_var(self, expr, gargs) -> ir.Var:
        b = self.b
        if isinstance(expr, ir.EConst):
            return b.var([(b.sconst(expr.value), b.ONE)]) if expr.value else b.var([])
        if isinstance(expr, ir.ESlot):
            return gargs[expr.index]
        return b.atom_var(b.hatom(expr, gargs))
