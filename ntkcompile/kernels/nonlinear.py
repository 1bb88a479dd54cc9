"""Expectations of H-atoms: closed forms, quadrature, factorization, the joint evaluator.

Part of the planner (``kernels.planner.Planner`` inherits these methods):

* G x H, Stein's lemma: ``E[g f(h)] = sum_j Cov(g, h_j) E[d_j f(h)]`` (exact, also
  for kinks); a function with jumps goes to the joint evaluator instead;
* H x H: a closed-form V-transform when both are the same named nonlinearity of
  one Gaussian (``ir.Elementwise.vt``, with the arc-cosine angle shared between
  ``phi`` and ``phi'``), else the trapezoidal rule in 2-D; with more slots,
  independent groups of slots factorize into a product of expectations (TP II:
  factorize first), and what remains goes to the N-D evaluator (quadrature up to
  rank 3, Monte Carlo beyond, with a reported error);
* first moments ``E[h]`` the same way in 1-D.
"""
from __future__ import annotations

from ..ir import Var
from ..ir import nodes as irn
from ..ir import walk
from ..ir.builder import expr_has_jump, expr_smooth, expr_uses_slot
from ..plan import Add, Apply, Fn, Mul, Slot
from . import expect
from .piecewise_expr import as_piecewise

# Sides of the left and right operand of each pair kind.  ``f1``/``f2`` pair two
# vectors on the *same* input at every pair of positions ``(N, *P, *P)`` (needed
# under average pooling); the sign marks the right operand's position group.
SIDES = {"d1": (1, 1), "d2": (2, 2), "x": (1, 2), "f1": (1, -1), "f2": (2, -2)}


class HVarExpectations:
    """The planner's rules for expectations that involve H-atoms (a mixin of ``Planner``)."""

    def _mean_h(self, a, side):
        d = f"d{side}"
        desc = f"E[{self.label(a)}] ({d})"
        if len(a.gargs) == 1:
            var = yield from self.cov(a.gargs[0], a.gargs[0], d)
            fn = _single_call(a.expr)
            if fn is not None and fn.mean is not None:
                return self.call(expect.cf, self.static(fn.mean, "mean"), self.like, var,
                                 note=(desc, f"closed form ({fn.name} mean)"))
            p = as_piecewise(a.expr)
            if p is not None:          # exact truncated-normal moments (kernels.piecewise)
                return self.call(expect.pw1, self.static(p, "piecewise"), self.like, var,
                                 note=(desc, "closed form (piecewise polynomial)"))
            body = yield from self.integrand(a.expr, [self.plan.make(Slot, None)], side, d)
            return self.call(expect.q1, self.plan.make(Fn, body), var, self.like, self.deg1, self.errors,
                             expr_smooth(a.expr), options=(self.tol,),
                             note=(desc, self._quad_note(f"quadrature(1-D, deg={self.deg1})", a.expr)))
        factored = self._factorize([(a, side)])
        if factored is not None:
            means = []
            for (f,) in factored:
                means.append((yield from self.mean(f, side)))
            return self.plan.mul(*means)
        entries = []
        for g in a.gargs:
            row = []
            for h in a.gargs:
                row.append((yield from self.cov(g, h, d)))
            entries.append(row)
        return (yield from self._nd(desc, [(a, side)], entries, d))

    def stein(self, a, b, pair):
        """``E[g h]`` for a G-atom and an H-atom (Stein's lemma)."""
        left, right = SIDES[pair]
        g_left = a.gaussian
        g, h = (a, b) if g_left else (b, a)
        hside = right if g_left else left
        gvar = self.b.atom_var(g)
        if all(self.independent(gvar, s) for s in h.gargs):
            return None
        if expr_has_jump(h.expr):
            desc = f"E[{self.label(a)} {self.label(b)}'] ({pair})"
            return (yield from self._general(desc, a, b, pair))
        terms = []
        for j, s in enumerate(h.gargs):
            cov = yield from (self.cov(gvar, s, pair) if g_left else self.cov(s, gvar, pair))
            if cov is None:
                continue
            dmean = yield from self.mean(self.partial(h, j), hside)
            terms.append(self.plan.mul(cov, self.lift(dmean, hside, pair, self.k(a, b))))
        return self.plan.add(terms)

    def partial(self, h, j) -> Var:
        """``d h / d slot_j`` as a Var (a derivative: it lives in the backward program)."""
        return self.b.expr_var(self.b.differentiate(h.expr, j), h.gargs)

    def hh(self, a, b, pair):
        left, right = SIDES[pair]
        k = self.k(a, b)
        if all(self.independent(s, t) for s in a.gargs for t in b.gargs):
            ma = yield from self.mean(a, left)
            mb = yield from self.mean(b, right)
            return self.plan.mul(self.lift(ma, left, pair, k), self.lift(mb, right, pair, k))
        desc = f"E[{self.label(a)} {self.label(b)}'] ({pair})"
        if len(a.gargs) == 1 and len(b.gargs) == 1:
            ka = yield from self.cov(a.gargs[0], a.gargs[0], f"d{abs(left)}")
            kb = yield from self.cov(b.gargs[0], b.gargs[0], f"d{abs(right)}")
            kab = yield from self.cov(a.gargs[0], b.gargs[0], pair)
            k11, k12, k22 = self.lift(ka, left, pair, k), kab, self.lift(kb, right, pair, k)
            fa, fb = _single_call(a.expr), _single_call(b.expr)
            if fa is not None and fa is fb and fa.vt is not None:
                note = (desc, f"closed form ({fa.name} V-transform)")
                if fa.vt_angle is not None and not isinstance(k12, (float, type(None))):
                    # arccos(c) once per pair: relu's forward and step's backward share it
                    theta = self.call(expect.angle, self.like, k11, k12, k22)
                    return self.call(expect.cf, self.static(fa.vt_angle, "vta"), self.like, k11, k12, k22, theta,
                                     note=note)
                return self.call(expect.cf, self.static(fa.vt, "vt"), self.like, k11, k12, k22, note=note)
            pa, pb = as_piecewise(a.expr), as_piecewise(b.expr)
            if pa is not None and pb is not None:      # exact truncated-normal moments
                return self.call(expect.pw2, self.static(pa, "piecewise"), self.static(pb, "piecewise"), self.like,
                                 k11, k12, k22, note=(desc, "closed form (piecewise polynomial)"))
            slot = self.plan.make(Slot, None)
            sa = yield from self.integrand(a.expr, [slot], left, pair, k)
            sb = yield from self.integrand(b.expr, [slot], right, pair, k)
            smooth = expr_smooth(a.expr) and expr_smooth(b.expr)
            return self.call(expect.q2, self.plan.make(Fn, sa), self.plan.make(Fn, sb), self.like, k11, k12, k22,
                             self.deg2, self.errors, smooth, options=(self.tol,),
                             note=(desc, self._quad_note(f"quadrature(2-D, deg={self.deg2})", a.expr, b.expr)))
        factored = self._factorize([(a, left), (b, right)])
        if factored is not None:
            parts = []
            for fa, fb in factored:
                parts.append((yield from self.cov_atoms(fa, fb, pair)))
            return self.plan.mul(*parts)
        return (yield from self._general(desc, a, b, pair))

    def _factorize(self, atoms):
        """Split ``E[prod_i a_i]`` into independent groups of slots (TP II: factorize first).

        Slots are grouped by possible correlation (same matrix or bias somewhere in
        both); if every atom's expression is a product of factors each using the
        slots of one group, the expectation is the product over groups of the
        expectations of the per-group sub-atoms.  Returns a list of per-group
        tuples of sub-atoms (``ONE`` where an atom has no factor in a group), or
        None if there is a single group or an expression does not separate.
        """
        slots = [(i, j, g) for i, (a, _) in enumerate(atoms) for j, g in enumerate(a.gargs)]
        parent = list(range(len(slots)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x in range(len(slots)):
            for y in range(x + 1, len(slots)):
                if not self.independent(slots[x][2], slots[y][2]):
                    parent[find(x)] = find(y)
        groups = sorted({find(x) for x in range(len(slots))})
        if len(groups) < 2:
            return None
        group_of = {(i, j): find(x) for x, (i, j, _) in enumerate(slots)}
        per_group = {g: [] for g in groups}
        for i, (a, _) in enumerate(atoms):
            factors = list(a.expr.args) if isinstance(a.expr, irn.EMul) else [a.expr]
            by_group: dict = {}
            for f in factors:
                used = {group_of[(i, j)] for j in range(len(a.gargs)) if expr_uses_slot(f, j)}
                if len(used) != 1:
                    return None
                by_group.setdefault(used.pop(), []).append(f)
            for g in groups:
                fs = by_group.get(g)
                if not fs:
                    per_group[g].append(self.p.ONE)
                    continue
                idx = sorted({j for f in fs for j in range(len(a.gargs)) if expr_uses_slot(f, j)})
                remap = {j: self.b.eslot(k) for k, j in enumerate(idx)}
                remap.update({j: self.b.econst(0.0) for j in range(len(a.gargs)) if j not in remap})
                sub = self.b.emul([self.b.substitute(f, remap) for f in fs])
                per_group[g].append(self.b.hatom(sub, [a.gargs[j] for j in idx]))
        return [tuple(per_group[g]) for g in groups]

    def _general(self, desc, a, b, pair):
        """``E[a b']`` by the N-D evaluator over the joint Gaussian of all slots."""
        left, right = SIDES[pair]
        k = self.k(a, b)
        slots = [(g, left) for g in self._slots(a)] + [(g, right) for g in self._slots(b)]
        entries = []
        for g, sg in slots:
            row = []
            for h, sh in slots:
                if sg == sh:
                    e = yield from self.cov(g, h, f"d{abs(sg)}")
                    row.append(self.lift(e, sg, pair, k))
                else:
                    row.append((yield from (self.cov(g, h, pair) if sg == left else self.cov(h, g, pair))))
            entries.append(row)
        return (yield from self._nd(desc, [(a, left), (b, right)], entries, pair, k))

    def _slots(self, a):
        return [self.b.atom_var(a)] if a.gaussian else list(a.gargs)

    def _nd(self, desc, factors, entries, pair, k=0):
        """An N-D expectation of a product of atoms; ``entries`` is the slot covariance."""
        parts, offset = [], 0
        for atom, side in factors:
            if atom.gaussian:
                parts.append(self.plan.make(Slot, offset))
                offset += 1
            else:
                names = [self.plan.make(Slot, offset + j) for j in range(len(atom.gargs))]
                parts.append((yield from self.integrand(atom.expr, names, side, pair, k)))
                offset += len(atom.gargs)
        rows = tuple(tuple(0.0 if e is None else e for e in row) for row in entries)
        smooth = all(a.gaussian or expr_smooth(a.expr) for a, _ in factors)
        note = (desc, f"N-D evaluator over {offset} slots: quadrature up to rank 3, "
                f"else monte-carlo(n={self.mc_samples}, seed={self.seed}, replicated)"
                + ("" if smooth else " [non-smooth integrand: approximate]"))
        body = parts[0] if len(parts) == 1 else self.plan.make(Mul, tuple(parts))
        return self.call(expect.qn, self.plan.make(Fn, body), rows, self.like, self.errors, self.mc, smooth,
                         options=(self.nd_degrees, self.tol), note=note)

    def _quad_note(self, what, *exprs):
        return what if all(expr_smooth(e) for e in exprs) else what + " [non-smooth integrand: approximate]"

    def integrand(self, expr, slots, side, pair, k=0):
        """The plan of ``expr`` at quadrature nodes ``slots`` (coefficients lifted to ``pair``)."""
        coefs = {}
        for e in walk.postorder([expr], _expr_children):
            if isinstance(e, irn.ELin):
                for c, _ in e.terms:
                    if c not in coefs:
                        coefs[c] = self.lift((yield from self.scalar(c, side)), side, pair, k)
        plan = self.plan

        def lin(e, xs):
            return plan.make(Add, tuple(plan.make(Mul, (coefs[c], 1.0 if isinstance(t, irn.EConst) else x))
                                        for (c, t), x in zip(e.terms, xs)))

        rule = walk.by_type({
            irn.ESlot: lambda e, _: slots[e.index],
            irn.EConst: lambda e, _: e.value,
            irn.ECall: lambda e, xs: plan.make(Apply, self.static(e.fn.fn, "fn_"), xs[0]),
            irn.EMul: lambda e, xs: plan.make(Mul, tuple(xs)),
            irn.ELin: lin,
        })
        return walk.fold(expr, rule, children=_expr_children)


def _single_call(expr):
    if isinstance(expr, irn.ECall) and isinstance(expr.arg, irn.ESlot):
        return expr.fn
    return None


def _expr_children(e):
    if isinstance(e, irn.ELin):
        return tuple(x for _, x in e.terms)
    return e.children() if isinstance(e, irn.Expr) else ()
