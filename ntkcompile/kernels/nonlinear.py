"""Expectations of H-atoms: closed forms, quadrature, factorization, the joint evaluator.

Part of the planner (``kernels.planner.Planner`` inherits these methods):

* G x H, Stein's lemma: ``E[g f(h)] = sum_j Cov(g, h_j) E[d_j f(h)]`` (exact, also
  for kinks).  For ``f`` with jumps ``d_j f`` is the distributional derivative:
  for ``f`` of one slot ``z ~ N(0, k)`` whose jumps are known (``expr_breaks``),
  ``E[f'(z)] = E[f'_ae(z)] + sum_t (f(t+) - f(t-)) p_z(t)`` (``jump_mass``);
  otherwise the joint evaluator (approximate, with its error reported);
* H x H: a closed-form V-transform when both are the same named nonlinearity of
  one Gaussian (``ir.Elementwise.vt``, with the arc-cosine angle shared between
  ``phi`` and ``phi'``), else the trapezoidal rule in 2-D, or for piecewise
  smooth functions with known breaks Gauss-Legendre split at the breaks
  (``split_q2``); with more slots, independent groups of slots factorize into a
  product of expectations (TP II: factorize first), and what remains goes to
  the N-D evaluator (quadrature up to rank 3, 1 for kinked integrands,
  quasi-Monte Carlo beyond, with a reported error);
* first moments ``E[h]`` the same way in 1-D (``split_q1`` with breaks).

The runtime helpers for jumps and split quadrature are at the end of this file.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ir import Var
from ..ir import nodes as irn
from ..ir import walk
from ..ir.builder import expr_breaks, expr_has_jump, expr_smooth, expr_uses_slot
from ..plan import Add, Apply, Fn, Mul, Slot
from . import expect, pointwise, qmc
from .piecewise_expr import as_piecewise
from .quadrature import correlation

# Sides of the left and right operand of each pair kind.  ``f1``/``f2`` pair two
# vectors on the *same* input at every pair of positions ``(N, *P, *P)`` (needed
# under average pooling); the sign marks the right operand's position group.
SIDES = {"d1": (1, 1), "d2": (2, 2), "x": (1, 2), "f1": (1, -1), "f2": (2, -2)}
SAME_INPUT_PAIRS = ("d1", "d2")


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
            points = None if expr_smooth(a.expr) else (yield from self.points(a.expr, side, d))
            if points is not None:
                return self.call(split_q1, self.plan.make(Fn, body), var, self.like, points, self.deg1,
                                 self.errors, note=(desc, _split_note("1-D", points, self.deg1)))
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
        jumps = None
        if expr_has_jump(h.expr):
            breaks = expr_breaks(h.expr) if len(h.gargs) == 1 else None
            if breaks is None:
                desc = f"E[{self.label(a)} {self.label(b)}'] ({pair})"
                return (yield from self._general(desc, a, b, pair))
            jumps = breaks.get(0, ())
        terms = []
        for j, s in enumerate(h.gargs):
            cov = yield from (self.cov(gvar, s, pair) if g_left else self.cov(s, gvar, pair))
            if cov is None:
                continue
            dmean = yield from self.mean(self.partial(h, j), hside)    # of the a.e. derivative
            if jumps:
                dmean = self.plan.add([dmean, (yield from self._jump_mass(h, hside, jumps))])
            terms.append(self.plan.mul(cov, self.lift(dmean, hside, pair, self.k(a, b))))
        return self.plan.add(terms)

    def _jump_mass(self, h, side, points):
        """The delta terms of ``E[f'(z)]`` for an H-atom ``f(z)`` of one slot with jumps only
        at ``points``: ``sum_t (f(t+) - f(t-)) p_z(t)`` (a per-input array of ``side``)."""
        d = f"d{side}"
        var = yield from self.cov(h.gargs[0], h.gargs[0], d)
        body = yield from self.integrand(h.expr, [self.plan.make(Slot, None)], side, d)
        return self.call(jump_mass, self.plan.make(Fn, body), var, self.like, points,
                         note=(f"E[d/dz {self.label(h)}], its jumps ({d})",
                               f"Stein's lemma, delta terms at z = {_fmt(points)}: exact "
                               f"(sizes f(t+-{_DELTA:g} max(1, |t|)))"))

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
                    if getattr(fa.vt_angle, "fused_rule", ("",))[0] == "step":
                        k12 = theta     # a step rule reads only the angle (and the variances): the
                        # covariance need not stay alive for the backward pass, nor leave a fused chain
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
            ta = tb = None
            if not smooth:
                ta = yield from self.points(a.expr, left, pair, k)
                tb = None if ta is None else (yield from self.points(b.expr, right, pair, k))
            if not smooth and ta is not None and tb is not None:
                shown = tuple(sorted(set(ta + tb))) if isinstance(ta, tuple) and isinstance(tb, tuple) else None
                return self.call(split_q2, self.plan.make(Fn, sa), self.plan.make(Fn, sb), self.like,
                                 k11, k12, k22, ta, tb, self.deg2, self.errors,
                                 note=(desc, _split_note("2-D", shown, self.deg2)))
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
        norms = None
        # the ratio estimate needs the variances; only sampling uses it (rank above the quadrature's)
        if (pair not in SAME_INPUT_PAIRS and not a.gaussian and not b.gaussian
                and len(slots) > expect.quadrature_rank(expr_smooth(a.expr) and expr_smooth(b.expr))):
            va = yield from self.cov_atoms(a, a, f"d{abs(left)}")
            vb = yield from self.cov_atoms(b, b, f"d{abs(right)}")
            norms = (self.lift(va, left, pair, k), self.lift(vb, right, pair, k))
        return (yield from self._nd(desc, [(a, left), (b, right)], entries, pair, k, norms))

    def _slots(self, a):
        return [self.b.atom_var(a)] if a.gaussian else list(a.gargs)

    def _nd(self, desc, factors, entries, pair, k=0, norms=None):
        """An N-D expectation of a product of atoms; ``entries`` is the slot covariance;
        ``norms``: the two atoms' variances (lifted), for ``expect.qn_pair``'s ratio estimate."""
        parts, program, offset = [], [], 0           # program: pointwise.build's factors
        for atom, side in factors:
            program.append((None if atom.gaussian else atom.expr, offset))
            if atom.gaussian:
                parts.append(self.plan.make(Slot, offset))
                offset += 1
            else:
                names = [self.plan.make(Slot, offset + j) for j in range(len(atom.gargs))]
                parts.append((yield from self.integrand(atom.expr, names, side, pair, k)))
                offset += len(atom.gargs)
        rows = tuple(tuple(0.0 if e is None else e for e in row) for row in entries)
        smooth = all(a.gaussian or expr_smooth(a.expr) for a, _ in factors)
        note = (desc, f"N-D evaluator over {offset} slots: quadrature up to rank {expect.quadrature_rank(smooth)}, "
                f"else quasi-monte-carlo(n={self.mc_samples}, seed={self.seed}, replicated)"
                + ("" if smooth else " [non-smooth integrand: approximate]"))
        body = parts[0] if len(parts) == 1 else self.plan.make(Mul, tuple(parts))
        same = pair in SIDES and SIDES[pair][0] == SIDES[pair][1]
        positions = k if same or (pair == "x" and self.diag) else 2 * k   # trailing axes of the layout
        self._nd_streams = getattr(self, "_nd_streams", 0) + 1      # the call's own order of nets
        pair_moments = norms is not None and len(parts) == 2 and None not in norms
        # the integrand as a program for the fused sampler (None: the lambda's torch form), run with
        # the others over the same covariance in one pass (a family: one stream, shared points)
        groups, stream, shared = qmc.blocks(rows), self._nd_streams, ()
        if (member := pointwise.build(program, offset, pair_moments, groups, register=False)) is not None:
            family, index = pointwise.join(self.__dict__.setdefault("_nd_families", {}), (
                self.plan.key(rows), positions, same, smooth), program, pair_moments, offset, groups, stream)
            stream = family.stream
            shared = (self.call(expect.qn_family, self.static(family, "fam_"), rows, self.like, self.mc, smooth,
                                options=((positions, same, stream),)), index)
        options = (self.nd_degrees, self.tol, (positions, same, stream),
                   None if member is None else self.static(member, "pw_"), *shared)
        if pair_moments:
            fa, fb = (self.plan.make(Fn, p) for p in parts)
            return self.call(expect.qn_pair, fa, fb, *norms, rows, self.like, self.errors, self.mc, smooth,
                             options=options, note=note)
        return self.call(expect.qn, self.plan.make(Fn, body), rows, self.like, self.errors, self.mc, smooth,
                         options=options, note=note)

    def _quad_note(self, what, *exprs):
        return what if all(expr_smooth(e) for e in exprs) else what + " [non-smooth integrand: approximate]"

    def _coefs(self, expr, side, pair, k):
        """The coefficients of ``expr``'s linear combinations, lifted to ``pair``."""
        coefs = {}
        for e in walk.postorder([expr], _expr_children):
            if isinstance(e, irn.ELin):
                for c, _ in e.terms:
                    if c not in coefs:
                        coefs[c] = self.lift((yield from self.scalar(c, side)), side, pair, k,
                                             len(self.p.positions(c)))
        return coefs

    def integrand(self, expr, slots, side, pair, k=0):
        """The plan of ``expr`` at quadrature nodes ``slots`` (coefficients lifted to ``pair``)."""
        coefs = yield from self._coefs(expr, side, pair, k)
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

    def points(self, expr, side, pair, k=0):
        """Where the one-slot ``expr`` may fail to be smooth, in the slot's units: its static
        breaks (a tuple of numbers), or, when per-input coefficients place them
        (``relu(LayerNorm(relu(h)))``: ``relu(a relu(z) + b)`` breaks at 0 and ``-b/a``), a plan
        value holding a list of per-input points lifted to ``pair``; None if unknown.

        The per-input points over-approximate the breaks: every nonlinearity's breaks
        pulled back through every affine form its argument takes on some piece
        (``_RuntimeBreaks``); a cut where the integrand is smooth costs nodes, not accuracy."""
        static = _points(expr)
        if static is not None:
            return static
        coefs = yield from self._coefs(expr, side, pair, k)
        found = _RuntimeBreaks(self, coefs).of(expr)
        if found is None:
            return None
        return self.call(_listed, self.like, *found) if found else ()


def _points(expr):
    """The breaks of a one-slot expression (``()`` if smooth), or None if unknown."""
    breaks = expr_breaks(expr)
    return None if breaks is None else breaks.get(0, ())


def _fmt(points):
    if not isinstance(points, tuple):
        return "per-input breaks"
    return ", ".join(f"{t:g}" for t in points) or "none"


def _split_note(dims, points, degree):
    return (f"quadrature({dims}, Gauss-Legendre, {_nodes(degree)} nodes per piece, "
            f"split at z = {_fmt(points)})")


class _RuntimeBreaks:
    """Candidate breaks of a one-slot expression with per-input coefficients, as plan values.

    Bottom up, each node gets ``(forms, points)``: the affine functions ``alpha z + beta`` it
    equals on some piece of the slot's line (None if it is not piecewise affine), and the
    points where it may fail to be smooth (None if unknown).  A nonlinearity with breaks
    ``t`` adds ``(t - beta) / alpha`` for every form of its argument; if its pieces are
    affine (relu, hardtanh, clamp, leaky relu, step), its forms are theirs composed with the
    argument's.  At most ``MAX_FORMS`` forms are tracked."""

    MAX_FORMS = 16

    def __init__(self, pl, coefs):
        self.pl, self.coefs = pl, coefs

    def of(self, expr):
        info = {}
        plan = self.pl.plan
        for e in walk.postorder([expr], _expr_children):
            if isinstance(e, irn.ESlot):
                info[e] = ([(1.0, 0.0)], [])
            elif isinstance(e, irn.EConst):
                info[e] = ([(0.0, e.value)], [])
            elif isinstance(e, irn.ELin):
                kids = [info[x] for _, x in e.terms]
                points = None if any(p is None for _, p in kids) else [t for _, p in kids for t in p]
                forms = [(0.0, 0.0)]
                for (c, _), (fs, _) in zip(e.terms, kids):
                    if fs is None or forms is None or len(forms) * len(fs) > self.MAX_FORMS:
                        forms = None
                        break
                    cc = self.coefs[c]
                    forms = [(plan.add([a, plan.mul(cc, a2)]) or 0.0, plan.add([b, plan.mul(cc, b2)]) or 0.0)
                             for a, b in forms for a2, b2 in fs]
                info[e] = (forms, points)
            elif isinstance(e, irn.EMul):
                kids = [info[x] for x in e.args]
                info[e] = (None, None if any(p is None for _, p in kids) else [t for _, p in kids for t in p])
            elif isinstance(e, irn.ECall):
                info[e] = self._call(e.fn, *info[e.arg])
            else:
                return None
        return info[expr][1]

    def _call(self, fn, forms, points):
        if points is None:
            return None, None
        if fn.smooth:
            return None, points
        if fn.breaks is None or forms is None:
            return None, None
        pl = self.pl
        new = [pl.call(_preimage, float(t), a, b, pl.like) for a, b in forms for t in fn.breaks]
        pieces = getattr(fn.piecewise, "coeffs", None)
        if pieces is None or any(len(q) > 2 for q in pieces) or len(forms) * len(pieces) > self.MAX_FORMS:
            return None, points + new
        plan = pl.plan
        composed = []
        for q in pieces:
            q0, q1 = (tuple(q) + (0.0, 0.0))[:2]
            composed += [(plan.mul(q1, a) or 0.0, plan.add([plan.mul(q1, b), q0]) or 0.0) for a, b in forms]
        return composed, points + new


def _preimage(t, a, b, like):
    """``(t - b) / a``: where ``a z + b`` crosses a break ``t`` (far away where ``a = 0``)."""
    a, b = expect.const(a, like), expect.const(b, like)
    return _ratio(t - b, a)


def _listed(like, *points):
    """Per-input points as a list of tensors (for the split rules)."""
    return [expect.const(t, like) for t in points]


def _cut(t, s):
    """A point ``t`` (a number or a per-input tensor) in units of ``s``."""
    return _ratio(torch.broadcast_to(expect.const(t, s), s.shape), s)


def _single_call(expr):
    if isinstance(expr, irn.ECall) and isinstance(expr.arg, irn.ESlot):
        return expr.fn
    return None


def _expr_children(e):
    if isinstance(e, irn.ELin):
        return tuple(x for _, x in e.terms)
    return e.children() if isinstance(e, irn.Expr) else ()


# ------------------------------------------------ runtime: jumps and split quadrature
#
# Called by the generated code, like ``kernels.expect``.  A piecewise smooth
# integrand with known breaks is integrated exactly piece by piece: Gauss-Legendre
# with the Gaussian weight on each piece between the breaks and a base mesh of
# pieces at most 3 standard deviations long, on [-9, 9] (the N(0, 1) mass outside
# is 2e-19, as for ``quadrature.trapezoid``).  Measured on E step(z1) step(z2)
# against (pi - arccos c) / (2 pi), 12 nodes per piece: error below 2e-11 for every
# c in [-1, 1], including c -> +-1 (the trapezoidal rule: 1e-2).

_L = 9.0
_BASE = (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0)
# In 2-D, z2 = s2 (c u + s v), s = sqrt(1 - c^2): for each u, g's breaks in v are
# exact cuts, but the v-average of g then turns from one side of a break to the
# other over a width eps = s / |c| in u, a near-jump when c -> +-1.  Cuts graded
# geometrically around it resolve that ramp at every scale down to eps.
_GRADING = (1.0, 8.0, 64.0, 512.0, 4096.0)
# One-sided values f(t+-) are read at t +- _DELTA max(1, |t|): far above the
# rounding of a located break, far below any smooth variation that matters.
_DELTA = 1e-12
_CHUNK = 2**18          # entries of a (v nodes, u chunk, *batch) grid, as kernels.quadrature
_LEGENDRE: dict = {}


def _nodes(degree):
    """Gauss-Legendre nodes per piece for a quadrature ``degree``: 12 at the 2-D default 96."""
    return max(4, int(degree) // 8)


def _legendre(n, device):
    rule = _LEGENDRE.get(n)
    if rule is None:
        rule = _LEGENDRE[n] = tuple(torch.tensor(a, dtype=torch.float64)
                                    for a in np.polynomial.legendre.leggauss(n))
    return tuple(t.to(device) for t in rule)


def _ratio(num, den):
    """``num / den``, and ``inf`` where ``den = 0`` (a cut that never comes: clipped away)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), math.inf)


def _edges(like, cuts):
    """Sorted edges ``(E, *like.shape)``: the base mesh and the ``cuts``, clipped to [-9, 9]."""
    base = [torch.full_like(like, e) for e in _BASE]
    cuts = [torch.broadcast_to(c, like.shape).clamp(-_L, _L) for c in cuts]
    return torch.stack(base + cuts).sort(0).values


def _pieces(edges, n):
    """Nodes and ``N(0, 1)`` weights of ``n``-point Gauss-Legendre on each piece between
    ``edges``: ``((E - 1) n, *batch)`` each (a zero-length piece gets weight 0)."""
    x, w = _legendre(n, edges.device)
    shape = (1, n) + (1,) * (edges.ndim - 1)
    a, b = edges[:-1].unsqueeze(1), edges[1:].unsqueeze(1)
    half = 0.5 * (b - a)
    u = (a + half) + half * x.reshape(shape)
    wt = half * w.reshape(shape) * torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
    return u.flatten(0, 1), wt.flatten(0, 1)


def _estimate(errors, value, rule, n):
    # Each piece is smooth, where Gauss-Legendre converges geometrically: the smooth
    # estimate (expect._entry_error, from n, n/2 and n/4 nodes).  A break that no
    # nonlinearity declares (a jump of phi'' such as x^2 step(x)) converges
    # algebraically instead.
    expect._refine(errors, "quad", rule, n, True, 4, None, value)


def jump_mass(f, var, like, points):
    """``sum_t (f(t+) - f(t-)) p(t)``, ``p`` the density of ``N(0, var)``: what the jumps of
    ``f`` add to ``E f'(z)`` (Stein's lemma with the distributional derivative).

    ``var = 0`` (``z = 0`` exactly) gives 0: Stein's lemma multiplies it by a
    covariance that is then 0 too.
    """
    var = expect.const(var, like)
    t = torch.tensor(points, dtype=var.dtype, device=var.device).reshape(-1, *([1] * var.ndim))
    m = t.shape[0]
    delta = _DELTA * t.abs().clamp_min(1.0)
    z = torch.broadcast_to(torch.cat([t + delta, t - delta]), (2 * m, *var.shape)).clone()
    fz = f(z)
    positive = var > 0
    v = torch.where(positive, var, 1.0)
    density = torch.where(positive, torch.exp(-0.5 * t * t / v) / (2.0 * math.pi * v).sqrt(), 0.0)
    return ((fz[:m] - fz[m:]) * density).sum(0)


def split_q1(f, var, like, points, degree, errors):
    """``E f(z)``, ``z ~ N(0, var)``, for ``f`` smooth away from ``points``: Gauss-Legendre
    on the pieces between them; the error estimate is appended to ``errors``."""
    var = expect.const(var, like)
    sd = var.clamp_min(0.0).sqrt()
    cuts = [_cut(t, sd) for t in points]

    def rule(n, absolute):
        u, w = _pieces(_edges(sd, cuts), n)
        fz = f(u * sd)
        return (w * (fz.abs() if absolute else fz)).sum(0)

    n = _nodes(degree)
    value = rule(n, False)
    _estimate(errors, value, rule, n)
    return value


def split_q2(f, g, like, k11, k12, k22, pf, pg, degree, errors):
    """``E f(z1) g(z2)`` for ``f``, ``g`` smooth away from ``pf``, ``pg``.

    The factorization of ``quadrature.expect_2d``: ``z1 = s1 u``,
    ``z2 = s2 (c u + s v)``.  The ``u`` axis is cut at ``f``'s breaks ``t / s1`` and,
    graded (``_GRADING``), where ``g``'s break ``t`` crosses the centre of the ``v``
    average (``u = t / (s2 c)``); for each ``u`` node the ``v`` axis is cut at
    ``g``'s breaks ``(t / s2 - c u) / s``.  Every piece is then smooth.
    """
    k11, k12, k22 = torch.broadcast_tensors(*(expect.const(k, like) for k in (k11, k12, k22)))
    s1, s2 = k11.clamp_min(0.0).sqrt(), k22.clamp_min(0.0).sqrt()
    _, c = correlation(k11, k12, k22)
    s = (1.0 - c * c).clamp_min(0.0).sqrt()
    tg = [_cut(t, s2) for t in pg]                                 # g's breaks in units of s2
    ok = (c != 0) & (s2 > 0)
    cut_u = [_cut(t, s1) for t in pf]
    for t in tg:
        u0 = torch.where(ok, _ratio(torch.where(ok, t, 0.0), c), _L)
        eps = torch.where(ok, _ratio(s, c.abs()), 0.0)
        cut_u += [u0] + [u0 + sign * k * eps for k in _GRADING for sign in (1.0, -1.0)]

    def rule(n, absolute):
        u, wu = _pieces(_edges(c, cut_u), n)                     # (Qu, *batch)
        fu = f(u * s1)
        qv = (len(_BASE) - 1 + len(tg)) * n
        step = max(1, _CHUNK // max(1, qv * math.prod(c.shape)))
        inner = []
        for i in range(0, u.shape[0], step):
            uc = u[i:i + step]                                    # (C, *batch)
            v, wv = _pieces(_edges(uc, [_ratio(t - c * uc, s) for t in tg]), n)    # (Qv, C, *batch)
            z2 = s2 * (c * uc + s * v)
            gz = g(z2.reshape(-1, *z2.shape[2:])).reshape(z2.shape)
            inner.append((wv * (gz.abs() if absolute else gz)).sum(0))
        fu = fu.abs() if absolute else fu
        return (wu * fu * torch.cat(inner, 0)).sum(0)

    n = _nodes(degree)
    value = rule(n, False)
    _estimate(errors, value, rule, n)
    return value
