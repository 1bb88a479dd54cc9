"""The Master Theorem, evaluated: a planner that emits kernel code.

For two batches of inputs (side 1: ``x1``, side 2: ``x2``) every quantity is an
array over *pairs*:

* ``"x"``  -- one vector on an input of side 1, the other on an input of side 2:
  shape ``(N1, N2)``; with positions ``(N1, N2, *P, *P)`` (all position pairs) or
  ``(N1, N2, *P)`` (aligned positions, when a flatten readout is all that needs
  them).  Against itself (self mode) only pairs ``i <= j`` are stored: ``(T, ...)``;
* ``"d1"``, ``"d2"`` -- both vectors on the *same* input and position: ``(N, *P)``.
  These are the variances the V-transforms need;
* ``"f1"``, ``"f2"`` -- the same input at every pair of positions ``(N, *P, *P)``,
  needed only for the variances of average-pooled vectors.

``Planner.Evar(u, v, pair)`` plans ``E[Z^u Z^v']`` by the rules of
tensor_programs.md Sec. 3, term by term over canonical forms:

* G x G: covariance of Gaussians, nonzero only for the same matrix/bias:
  ``W_std^2 E[z z']`` for two uses ``W z``, ``W z'`` (weight sharing is exactly
  this), ``W_std^2 xi.xi'/d`` at the input layer, ``b_std^2`` for a bias;
* G x H: Stein's lemma ``E[g f(h)] = sum_j Cov(g, h_j) E[d_j f(h)]`` (exact,
  also for kinks; functions with jumps fall back to quadrature);
* H x H: a closed-form V-transform when both sides are the same named
  nonlinearity of one Gaussian, else the trapezoidal rule in 2-D, else the N-D
  evaluator (quadrature up to rank 3, Monte Carlo beyond, with a standard error);
  independent arguments factorize into a product of means;
* pooled x pooled: the average over all position pairs of two windows.

``Planner.D(g, g')`` plans the backward covariances (Sec. 4) and ``ntk()`` sums
``D * Cov`` over every pair of uses of every parameter (Sec. 5).  Each planned
quantity is one line of generated code, emitted once (memoized); the evaluator
chosen for every expectation is recorded in ``self.evaluators`` for the program
printout.
"""
from __future__ import annotations

import math

from .. import ir
from ..printer import atom_label
from ..passes.backward import Backward, derivative_elementwise, expr_has_jump

# Sides of the left and right operand of each pair kind.  ``f1``/``f2`` pair two
# vectors on the *same* input at every pair of positions ``(N, *P, *P)`` (needed
# under average pooling); the sign marks the right operand's position group.
_SIDES = {"d1": (1, 1), "d2": (2, 2), "x": (1, 2), "f1": (1, -1), "f2": (2, -2)}
_SAME_INPUT = ("d1", "d2")
# Batch size the contraction paths are planned for (kernels are called on any batch).
_NOMINAL = 64


# -- symbolic arithmetic on code fragments (None = exact zero, float = constant) --

def _mul(*factors):
    const, parts = 1.0, []
    for f in factors:
        if f is None:
            return None
        if isinstance(f, float):
            const *= f
        else:
            parts.append(f if _atomic(f) else f"({f})")
    if const == 0.0:
        return None
    if not parts:
        return const
    if const != 1.0:
        parts.insert(0, repr(const))
    return " * ".join(parts)


def _add(terms):
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
        parts.append(repr(const))
    return " + ".join(parts)


def _atomic(s: str) -> bool:
    return s.replace("_", "").replace("[", "").replace("]", "").replace(":", "").replace(",", "") \
        .replace(" ", "").replace("None", "").isalnum()


class Planner:
    """Plans NNGP and NTK for one lowered program into a ``codegen.Source``."""

    def __init__(self, program: ir.Program, src, *, self_mode: bool, mc_samples=200_000, seed=0,
                 degree=96):
        self.p = program
        self.b = program.builder
        self.bw = Backward(program)
        self.src = src
        self.self_mode = self_mode
        self.mc_samples, self.seed = mc_samples, seed
        self.deg1, self.deg2 = 2 * degree, degree      # quadrature nodes per dimension in 1-D and 2-D
        self.memo: dict = {}
        self._spatial: dict = {}
        # Layout analysis: a flatten readout only ever pairs position s with s (convs
        # keep that diagonal), so cross arrays are (N1, N2, *P); global pooling needs
        # every pair of positions, (N1, N2, *P, *P).
        self.diag = aligned_positions(program)
        self.evaluators: list = []      # (description, evaluator)

    # ------------------------------------------------------------ plumbing
    def pair(self, pair):
        if self.self_mode and pair in ("d2", "f2"):
            return pair[0] + "1"
        return pair

    def side_pair(self, side):
        return self.pair(f"d{abs(side)}")

    def lift(self, sym, side, pair, k=0):
        """A per-input array of ``side`` broadcast into the layout of ``pair``.

        ``k`` is the number of position axes of the context: same-input arrays are
        ``(N, *P)``, cross arrays ``(N1, N2, *P, *P)`` (kernels.spatial).
        """
        if sym is None or isinstance(sym, float) or pair in _SAME_INPUT:
            return sym
        if pair in ("f1", "f2"):
            return f"liftf({sym}, {k}, {side < 0})" if k else sym
        if self.diag:
            k = 0                # positions aligned: (N, *P) -> (N, 1, *P)
        if self.self_mode:       # packed pairs i <= j (kernels.spatial.pack)
            idx = "I" if side == 1 else "J"
            return f"liftp({sym}, {idx}, {k}, {side == 2})" if k else f"{sym}[{idx}]"
        if k:
            return f"lift{side}({sym}, {k})"
        return f"{sym}[:, None]" if side == 1 else f"{sym}[None, :]"

    def spatial(self, node) -> tuple:
        """Positions of a Var/Vec/atom (``()`` for plain vectors and for biases)."""
        if node in self._spatial:
            return self._spatial[node]
        if isinstance(node, ir.Vec):
            shapes = [self.spatial(v) for _, v in node.pieces]
        elif isinstance(node, ir.Var):
            shapes = [self.spatial(a) for _, a in node.terms]
        elif isinstance(node, (ir.GInput, ir.GMatMul)):
            shapes = [node.param.conv.out_shape if node.param.conv is not None else ()]
        elif isinstance(node, ir.GPool):
            shapes = [node.geom.out_shape]
        elif isinstance(node, ir.HAtom):
            shapes = [self.spatial(g) for g in node.gargs]
        else:
            shapes = []
        out = max(shapes, key=len, default=())
        self._spatial[node] = out
        return out

    def k(self, *nodes) -> int:
        return max(len(self.spatial(n)) for n in nodes)

    def _memo(self, key, plan):
        if key not in self.memo:
            val = plan()
            if isinstance(val, str) and not _atomic(val):
                val = self.src.assign(val, "k")
            self.memo[key] = val
        return self.memo[key]

    @staticmethod
    def label(node):
        return atom_label(node)

    # ------------------------------------------------------------ scalars
    def scalar(self, s, side):
        """A per-input scalar node on ``side``: float or a code symbol of shape (N,)."""
        if isinstance(s, ir.SConst):
            return s.value
        side = abs(side)
        return self._memo(("s", s, self.side_pair(side)), lambda: self._scalar(s, side))

    def _scalar(self, s, side):
        if isinstance(s, ir.SMoment):
            if s.which == "mean":
                v = self.mean_vec(s.vec, side)
            else:
                v = self.Evec(s.vec, s.vec, self.side_pair(side))
            return 0.0 if v is None else v
        args = [self.scalar(a, side) for a in s.args]
        if s.op == "mul":
            return _mul(*args) or 0.0
        if s.op == "add":
            return _add(args) or 0.0
        if s.op == "rsqrt":
            x = args[0]
            return (x + s.eps) ** -0.5 if isinstance(x, float) else f"torch.rsqrt({x} + {s.eps!r})"
        if s.op == "pow":
            x = args[0]
            return x ** s.eps if isinstance(x, float) else f"({x}) ** {s.eps!r}"
        raise NotImplementedError(s.op)

    # ------------------------------------------------------------ first moments
    def mean_vec(self, vec, side):
        return _add([_mul(float(a), self.mean_var(v, side)) for a, v in vec.pieces])

    def mean_var(self, var, side):
        return _add([_mul(self.scalar(c, side), self.mean_atom(a, side)) for c, a in var.terms])

    def mean_atom(self, a, side):
        side = abs(side)
        if a is self.b.ONE:
            return 1.0
        if a.gaussian:
            return None
        if isinstance(a, ir.GPool):     # the pooled mean field
            m = self.mean_vec(a.arg, side)
            return None if m is None else self.src.assign(
                f"stencil_same({_sym(m)}, {self.src.bind(a.geom, 'geom')})", "k")
        return self._memo(("m", a, self.side_pair(side)), lambda: self._mean_h(a, side))

    def _mean_h(self, a, side):
        d = self.side_pair(side)
        desc = f"E[{self.label(a)}] ({d})"
        if len(a.gargs) == 1:
            var = self.Evar(a.gargs[0], a.gargs[0], d)
            if isinstance(a.expr, ir.ECall) and isinstance(a.expr.arg, ir.ESlot) and a.expr.fn.mean is not None:
                self.evaluators.append((desc, f"closed form ({a.expr.fn.name} mean)"))
                return f"cf({self.src.bind(a.expr.fn.mean, 'mean')}, like, {_sym(var)})"
            self.evaluators.append((desc, self._quad_note(f"quadrature(1-D, deg={self.deg1})", a.expr)))
            f = self.expr_fn(a.expr, ["z"], side, d)  # same-input arrays need no lifting
            return f"q1(lambda z: {f}, {_sym(var)}, like, {self.deg1}, _err, {ir.expr_smooth(a.expr)})"
        factored = self._factorize([(a, side)])
        if factored is not None:
            return _mul(*[self.mean_atom(f[0], side) for f in factored])
        entries = [[self.Evar(g, h, d) for h in a.gargs] for g in a.gargs]
        return self._nd(desc, [(a, side)], entries, d)

    # ------------------------------------------------------------ expectations
    def Evec(self, u, v, pair):
        """``E[Z^u Z^v']`` for width vectors (piecewise, weighted by fractions)."""
        pair = self.pair(pair)
        if len(u.pieces) == 1 and len(v.pieces) == 1:
            return self.Evar(u.pieces[0][1], v.pieces[0][1], pair)
        pu, pv = ir.Builder.refine(u, v)
        return _add([_mul(float(a), self.Evar(x, y, pair)) for (a, x), (_, y) in zip(pu, pv)])

    def Evar(self, u, v, pair):
        pair = self.pair(pair)
        if pair in _SAME_INPUT and u.uid > v.uid:
            u, v = v, u
        return self._memo(("E", u, v, pair), lambda: self._Evar(u, v, pair))

    def _Evar(self, u, v, pair):
        left, right = _SIDES[pair]
        k = self.k(u, v)
        terms = []
        for cu, a in u.terms:
            for cv, b in v.terms:
                e = self.Eatom(a, b, pair)
                if e is None:
                    continue
                terms.append(_mul(self.lift(self.scalar(cu, left), left, pair, k),
                                  self.lift(self.scalar(cv, right), right, pair, k), e))
        return _add(terms)

    def Eatom(self, a, b, pair):
        pair = self.pair(pair)
        if pair in _SAME_INPUT and a.uid > b.uid:
            a, b = b, a
        return self._memo(("A", a, b, pair), lambda: self._Eatom(a, b, pair))

    def _Eatom(self, a, b, pair):
        left, right = _SIDES[pair]
        one = self.b.ONE
        k = self.k(a, b)
        if a is one and b is one:
            return 1.0
        if a is one:
            return self.lift(self.mean_atom(b, right), right, pair, k)
        if b is one:
            return self.lift(self.mean_atom(a, left), left, pair, k)
        if isinstance(a, ir.GPool) or isinstance(b, ir.GPool):
            return self.pool_cov(a, b, pair)
        if a.gaussian and b.gaussian:
            return self.gcov(a, b, pair)
        if a.gaussian or b.gaussian:
            return self.stein(a, b, pair)
        return self.hh(a, b, pair)

    def pool_cov(self, a, b, pair):
        """``E[pool(u) pool(v)']``: the average over all position pairs of two windows."""
        if not (isinstance(a, ir.GPool) and isinstance(b, ir.GPool) and a.geom == b.geom):
            raise NotImplementedError(
                "average pooling whose output is combined with other vectors (a residual sum or "
                "product with an unpooled branch, or two different poolings)")
        inner_pair = pair if pair not in _SAME_INPUT else "f" + pair[1]
        inner = self.Evec(a.arg, b.arg, inner_pair)
        if inner is None:
            return None
        if not isinstance(inner, str):
            raise NotImplementedError("average pooling of a vector constant over positions")
        how = "pool_same" if pair in _SAME_INPUT else "pool_pair"
        return f"{how}({inner}, {self.src.bind(a.geom, 'geom')})"

    def gcov(self, a, b, pair):
        """Covariance of two G-atoms (tensor_programs.md Sec. 3)."""
        if type(a) is not type(b) or getattr(a, "param", None) is not getattr(b, "param", None):
            return None
        if isinstance(a, ir.GProbe):
            return None
        if isinstance(a, ir.GBias):
            return a.param.b_std ** 2
        W2 = a.param.W_std ** 2
        geom = a.param.conv
        if isinstance(a, ir.GMatMul):
            inner = self.Evec(a.arg, b.arg, pair)
            if geom is None:
                return _mul(W2, inner)
            if not isinstance(inner, str):
                raise NotImplementedError("a convolution of a vector constant over positions")
            g = self.src.bind(geom, "geom")
            both = (pair == "x" and not self.diag) or pair in ("f1", "f2")
            return _mul(W2, f"stencil_{'pair' if both else 'same'}({inner}, {g})")
        # GInput: W_std^2 xi.xi' / fan_in on the fixed inputs (patches under each tap for a conv)
        left, right = _SIDES[pair]
        fa, fb = f"F{abs(left)}[{a.fixed}]", f"F{abs(right)}[{b.fixed}]"
        W2n = W2 / a.param.fan_in
        if geom is None:
            vec = [(_NOMINAL, a.param.fan_in)] * 2
            if pair != "x":
                return _mul(W2n, self.src.contract("ad,ad->a", [fa, fb], vec))
            dot = self.src.contract("ad,bd->ab", [fa, fb], vec)
            if self.self_mode:
                dot = f"pack({dot}, I, J)"
                if a is b:
                    # the diagonal of x1 against itself is bit-identical to the same-input
                    # variances, so c = 1 exactly there (arccos amplifies rounding ~1e-8)
                    same = self.src.contract("ad,ad->a", [fa, fa], vec)
                    dot = f"with_diagonal_packed({dot}, {same}, DIAG)"
            return _mul(W2n, dot)
        g = self.src.bind(geom, "geom")
        P = geom.out_shape
        pshape = [(_NOMINAL, a.param.fan_in, math.prod(P))] * 2      # patches: (N, C*|K|, prod(P))
        pa = self.src.assign(f"patches({fa}, {g})", "p")

        def positions(equation, x, y, groups):
            return f"positions({self.src.contract(equation, [x, y], pshape)}, {P!r}, {groups})"

        if pair in ("f1", "f2"):
            return _mul(W2n, positions("acs,act->ast", pa, pa, 2))
        if pair != "x":
            return _mul(W2n, positions("acs,acs->as", pa, pa, 1))
        pb = self.src.assign(f"patches({fb}, {g})", "p")
        cross = positions("acs,bcs->abs", pa, pb, 1) if self.diag else positions("acs,bct->abst", pa, pb, 2)
        if self.self_mode:
            cross = f"pack({cross}, I, J)"
            if a is b:
                fix = "with_diagonal_aligned" if self.diag else "with_diagonal_packed"
                cross = f"{fix}({cross}, {positions('acs,acs->as', pa, pa, 1)}, DIAG)"
        return _mul(W2n, cross)

    @staticmethod
    def _static_zero(u: ir.Var, v: ir.Var) -> bool:
        """True if two Gaussian Vars are independent by construction (distinct matrices)."""
        for _, a in u.terms:
            for _, b in v.terms:
                if isinstance(a, ir.GPool) or isinstance(b, ir.GPool):
                    return False            # pools of anything: not provably independent
                if type(a) is type(b) and not isinstance(a, ir.GProbe) and a.param is b.param:
                    return False
        return True

    def stein(self, a, b, pair):
        """``E[g h]`` for a G-atom and an H-atom (Stein's lemma)."""
        left, right = _SIDES[pair]
        g_left = a.gaussian
        g, h = (a, b) if g_left else (b, a)
        hside = right if g_left else left
        gvar = self.b.atom_var(g)
        if all(self._static_zero(gvar, s) for s in h.gargs):
            return None
        if expr_has_jump(h.expr):
            desc = f"E[{self.label(a)} {self.label(b)}'] ({pair})"
            return self._general(desc, a, b, pair)
        terms = []
        for j, s in enumerate(h.gargs):
            cov = self.Evar(gvar, s, pair) if g_left else self.Evar(s, gvar, pair)
            if cov is None:
                continue
            dexpr = self.b.differentiate(h.expr, j, derivative_elementwise)
            dmean = self.mean_var(self.bw._expr_var(dexpr, h.gargs), hside)
            terms.append(_mul(cov, self.lift(dmean, hside, pair, self.k(a, b))))
        return _add(terms)

    def hh(self, a, b, pair):
        left, right = _SIDES[pair]
        k = self.k(a, b)
        if all(self._static_zero(s, t) for s in a.gargs for t in b.gargs):
            return _mul(self.lift(self.mean_atom(a, left), left, pair, k),
                        self.lift(self.mean_atom(b, right), right, pair, k))
        desc = f"E[{self.label(a)} {self.label(b)}'] ({pair})"
        if len(a.gargs) == 1 and len(b.gargs) == 1:
            ka = self.Evar(a.gargs[0], a.gargs[0], self.side_pair(left))
            kb = self.Evar(b.gargs[0], b.gargs[0], self.side_pair(right))
            kab = self.Evar(a.gargs[0], b.gargs[0], pair)
            k11, k12, k22 = self.lift(ka, left, pair, k), kab, self.lift(kb, right, pair, k)
            fa, fb = _single_call(a.expr), _single_call(b.expr)
            if fa is not None and fa is fb and fa.vt is not None:
                self.evaluators.append((desc, f"closed form ({fa.name} V-transform)"))
                args = f"{_sym(k11)}, {_sym(k12)}, {_sym(k22)}"
                if fa.vt_angle is not None and isinstance(k12, str):
                    # arccos(c) once per pair: relu's forward and step's backward share it
                    theta = self.src.assign(f"angle(like, {args})", "k")
                    return f"cf({self.src.bind(fa.vt_angle, 'vta')}, like, {args}, {theta})"
                return f"cf({self.src.bind(fa.vt, 'vt')}, like, {args})"
            self.evaluators.append((desc, self._quad_note(f"quadrature(2-D, deg={self.deg2})", a.expr, b.expr)))
            sa = self.expr_fn(a.expr, ["z"], left, pair, k)
            sb = self.expr_fn(b.expr, ["z"], right, pair, k)
            smooth = ir.expr_smooth(a.expr) and ir.expr_smooth(b.expr)
            return (f"q2(lambda z: {sa}, lambda z: {sb}, like, {_sym(k11)}, {_sym(k12)}, {_sym(k22)}, "
                    f"{self.deg2}, _err, {smooth})")
        factored = self._factorize([(a, left), (b, right)])
        if factored is not None:
            return _mul(*[self.Eatom(fa, fb, pair) for fa, fb in factored])
        return self._general(desc, a, b, pair)

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
                if not self._static_zero(slots[x][2], slots[y][2]):
                    parent[find(x)] = find(y)
        groups = sorted({find(x) for x in range(len(slots))})
        if len(groups) < 2:
            return None
        group_of = {(i, j): find(x) for x, (i, j, _) in enumerate(slots)}
        per_group = {g: [] for g in groups}
        for i, (a, _) in enumerate(atoms):
            factors = list(a.expr.args) if isinstance(a.expr, ir.EMul) else [a.expr]
            by_group: dict = {}
            for f in factors:
                used = {group_of[(i, j)] for j in range(len(a.gargs)) if ir.expr_uses_slot(f, j)}
                if len(used) != 1:
                    return None
                by_group.setdefault(used.pop(), []).append(f)
            for g in groups:
                fs = by_group.get(g)
                if not fs:
                    per_group[g].append(self.b.ONE)
                    continue
                idx = sorted({j for f in fs for j in range(len(a.gargs)) if ir.expr_uses_slot(f, j)})
                remap = {j: self.b.eslot(k) for k, j in enumerate(idx)}
                remap.update({j: self.b.econst(0.0) for j in range(len(a.gargs)) if j not in remap})
                sub = self.b.emul([self.b.substitute(f, remap) for f in fs])
                per_group[g].append(self.b.hatom(sub, [a.gargs[j] for j in idx]))
        return [tuple(per_group[g]) for g in groups]

    def _general(self, desc, a, b, pair):
        """``E[a b']`` by the N-D evaluator over the joint Gaussian of all slots."""
        left, right = _SIDES[pair]
        k = self.k(a, b)
        sa = self._slots(a)
        sb = self._slots(b)
        slots = [(g, left) for g in sa] + [(g, right) for g in sb]
        entries = []
        for g, sg in slots:
            row = []
            for h, sh in slots:
                if sg == sh:
                    row.append(self.lift(self.Evar(g, h, self.side_pair(sg)), sg, pair, k))
                else:
                    row.append(self.Evar(g, h, pair) if sg == left else self.Evar(h, g, pair))
            entries.append(row)
        return self._nd(desc, [(a, left), (b, right)], entries, pair, k)

    def _slots(self, a):
        return [self.b.atom_var(a)] if a.gaussian else list(a.gargs)

    def _nd(self, desc, factors, entries, pair, k=0):
        """Emit an N-D expectation of a product of atoms; ``entries`` is the slot covariance."""
        parts, offset = [], 0
        for atom, side in factors:
            if atom.gaussian:
                parts.append(f"z[..., {offset}]")
                offset += 1
            else:
                names = [f"z[..., {offset + j}]" for j in range(len(atom.gargs))]
                parts.append(f"({self.expr_fn(atom.expr, names, side, pair, k)})")
                offset += len(atom.gargs)
        rows = "[" + ", ".join("[" + ", ".join(_sym(e) for e in row) + "]" for row in entries) + "]"
        smooth = all(a.gaussian or ir.expr_smooth(a.expr) for a, _ in factors)
        self.evaluators.append((desc, f"N-D evaluator over {offset} slots: quadrature up to rank 3, "
                                f"else monte-carlo(n={self.mc_samples}, seed={self.seed})"
                                + ("" if smooth else " [non-smooth integrand: approximate]")))
        return f"qn(lambda z: {' * '.join(parts)}, {rows}, like, _err, {self.mc_samples}, {self.seed}, {smooth})"

    def _quad_note(self, what, *exprs):
        return what if all(ir.expr_smooth(e) for e in exprs) else what + " [non-smooth integrand: approximate]"

    # ------------------------------------------------------------ expression source
    def expr_fn(self, expr, slot_names, side, pair, k=0):
        """Python source evaluating ``expr`` at quadrature nodes (coefficients lifted to ``pair``)."""
        if isinstance(expr, ir.ESlot):
            return slot_names[expr.index]
        if isinstance(expr, ir.EConst):
            return repr(expr.value)
        if isinstance(expr, ir.ECall):
            return f"{self.src.bind(expr.fn.fn, 'fn_')}({self.expr_fn(expr.arg, slot_names, side, pair, k)})"
        if isinstance(expr, ir.EMul):
            return " * ".join(f"({self.expr_fn(e, slot_names, side, pair, k)})" for e in expr.args)
        if isinstance(expr, ir.ELin):
            terms = []
            for c, e in expr.terms:
                coef = self.lift(self.scalar(c, side), side, pair, k)
                inner = "1.0" if isinstance(e, ir.EConst) else f"({self.expr_fn(e, slot_names, side, pair, k)})"
                terms.append(f"{_sym(coef)} * {inner}")
            return " + ".join(terms)
        raise TypeError(expr)

    # ------------------------------------------------------------ backward
    def D(self, k, l, weight=None):
        """``D = E[dG_k dG_l']`` on the cross pair (GIA; module docstring of passes.backward).

        With ``weight`` (a Var in the coordinates of ``G_k``), the multipliers are
        multiplied by it first: ``E[(dG_k w)(dG_l' w')]``, the NTK term of an
        elementwise gain, which does *not* factorize into ``D * E[w w']`` when the
        backward multiplier depends on ``w`` (e.g. ``tanh(LayerNorm(x))``).
        """
        return self._memo(("D", k, l, weight), lambda: self._D(k, l, weight))

    def _D(self, k, l, weight):
        terms = []
        for u in self.bw.consumers.get(k, ()):
            for w in self.bw.consumers.get(l, ()):
                bc = self.bcov(u, w)
                if bc is None:
                    continue
                pu, pw = ir.Builder.refine(self.bw.arg(u), self.bw.arg(w))
                for (alpha, vu), (_, vw) in zip(pu, pw):
                    mk, ml = self.bw.deriv(vu, k), self.bw.deriv(vw, l)
                    if mk is None or ml is None:
                        continue
                    if weight is not None:
                        mk, ml = self.bw.times(mk, weight), self.bw.times(ml, weight)
                    terms.append(_mul(float(alpha), self.Evar(mk, ml, "x"), bc))
        return _add(terms)

    def bcov(self, u, w):
        """Covariance of the backward atoms ``B_u``, ``B_w`` (readout ``v`` or ``W^T dy``)."""
        R = Backward.READOUT
        if u == R and w == R:
            r = self.p.readout
            n = math.prod(r.spatial)
            if r.pool == "gap":          # v / P at every position
                return r.W_std ** 2 / n ** 2
            if r.pool == "flatten":      # a separate readout vector per position: delta_st
                if self.diag:            # aligned layout: only s = t is stored
                    return r.W_std ** 2 / n
                return _mul(r.W_std ** 2 / n, f"identity_pairs({r.spatial!r}, like)")
            return r.W_std ** 2
        if isinstance(u, ir.GPool) or isinstance(w, ir.GPool):
            # B = pool^T dP.  Two pools covary through D; a pool and a matmul's W^T dy are
            # independent unless W also acts after the pool (not supported: no such sharing).
            if not (isinstance(u, ir.GPool) and isinstance(w, ir.GPool)):
                return None
            if u.geom != w.geom:
                raise NotImplementedError("two different average poolings of one vector")
            d = self.D(u, w)
            return None if d is None else f"pool_pair_adjoint({_tensor(d)}, {self.src.bind(u.geom, 'geom')}, BATCH)"
        if u == R or w == R or u.param is not w.param:
            return None
        d = self.D(u, w)
        geom = u.param.conv
        if geom is None or d is None:
            return _mul(u.param.W_std ** 2, d)
        how = "stencil_same_adjoint" if self.diag else "stencil_pair_adjoint"
        return _mul(u.param.W_std ** 2, f"{how}({_tensor(d)}, {self.src.bind(geom, 'geom')}, BATCH)")

    # ------------------------------------------------------------ kernels
    def readout_cov(self):
        """``E[x_L x_L']`` as the readout sees it (pooled or flattened positions)."""
        r = self.p.readout
        core = self.Evec(r.vec, r.vec, "x")
        if r.pool is None or core is None:
            return core
        how = {"gap": "global_mean", "flatten": "aligned_mean" if self.diag else "diagonal_mean"}[r.pool]
        return self.src.assign(f"{how}({_sym(core)}, {r.spatial!r}, BATCH)", "k")

    def nngp(self):
        r = self.p.readout
        core = self.readout_cov()
        return _mul(r.scale ** 2, _add([_mul(r.W_std ** 2, core), r.b_std ** 2 if r.has_bias else None]))

    def _spatial_sum(self, term, node):
        """NTK terms of a weight shared over positions sum over all pairs of positions.

        Written as a product then a sum, not as an einsum: on cache-sized tiles a
        batched dot product through einsum (bmm) measured 3x slower than mul + sum,
        and under ``jit=True`` the product fuses into the reduction anyway.
        """
        if isinstance(node, ir.GBias):
            sp = node.param.spatial
        elif isinstance(node, ir.GProbe):
            sp = self.spatial(node.param.xhat)
        else:
            sp = self.spatial(node)
        if term is None or not sp:
            return term
        if isinstance(term, float):      # a constant summed over the stored position pairs
            return term * math.prod(sp) ** (1 if self.diag else 2)
        shape = f"BATCH + {sp!r}" if self.diag else f"BATCH + {sp!r} + {sp!r}"
        return f"spatial_sum({_sym(term)}, {shape}, len(BATCH))"

    def ntk(self):
        r = self.p.readout
        core = self.readout_cov()
        terms = [_mul(r.W_std ** 2, core), r.b_std ** 2 if r.has_bias else None]
        uses: dict = {}
        for node in self.b.nodes:
            if isinstance(node, (ir.GInput, ir.GMatMul, ir.GBias, ir.GProbe)):
                uses.setdefault(node.param, []).append(node)
        for param in self.b.params:
            atoms = uses.get(param, [])
            if isinstance(param, ir.Affine):
                for pr in atoms:   # a per-channel gain/shift is shared over positions
                    if param.gain:
                        terms.append(self._spatial_sum(self.D(pr, pr, weight=param.xhat), pr))
                    if param.shift:
                        terms.append(self._spatial_sum(self.D(pr, pr), pr))
                continue
            for u in atoms:
                for w in atoms:
                    terms.append(self._spatial_sum(_mul(self.D(u, w), self.Eatom(u, w, "x")), u))
        return _mul(r.scale ** 2, _add(terms))


def aligned_positions(program: ir.Program) -> bool:
    """Layout analysis: True if cross arrays need only aligned positions ``(N1, N2, *P)``.

    A flatten readout pairs position s only with s, and convolutions keep that
    diagonal; global or inner average pooling mixes position pairs.
    """
    return program.readout.pool == "flatten" and not any(
        isinstance(n, ir.GPool) for n in program.builder.nodes)


def _single_call(expr):
    if isinstance(expr, ir.ECall) and isinstance(expr.arg, ir.ESlot):
        return expr.fn
    return None


def _tensor(x):
    """A code symbol, or a constant as a 0-d tensor on the inputs' device (for helpers
    that build arrays from their argument, which must not land on the CPU)."""
    return x if isinstance(x, str) else f"const({_sym(x)}, like)"


def _sym(x):
    if x is None:
        return "0.0"
    return repr(x) if isinstance(x, float) else x
