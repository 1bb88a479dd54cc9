"""The Master Theorem, evaluated: a lowered program -> a kernel plan (``ntkcompile.plan``).

For two batches of inputs (side 1: ``x1``, side 2: ``x2``) every quantity is an
array over *pairs*:

* ``"x"``: one vector on an input of side 1, the other on an input of side 2:
  ``(N1, N2)``; with positions ``(N1, N2, *P, *P)`` (all position pairs) or
  ``(N1, N2, *P)`` (aligned positions, when a flatten readout is all that needs
  them).  Against itself codegen stores only the pairs ``i <= j``;
* ``"d1"``, ``"d2"``: both vectors on the *same* input and position: ``(N, *P)``,
  the variances the V-transforms need;
* ``"f1"``, ``"f2"``: the same input at every pair of positions ``(N, *P, *P)``,
  needed only for the variances of average-pooled vectors.

The planner answers requests, each memoized:

* ``E(u, v, pair)``: ``E[Z^u Z^v']`` for Vars, term by term over canonical forms
  (tensor_programs.md Sec. 3);
* ``A(a, b, pair)``: the same for two atoms.  Two linear atoms (G-atoms, and
  linear maps of H-vars such as a pooling) of different ``cov_group``s are
  independent; of the same kind, the kind's rule in ``COVARIANCE`` answers
  (registered by the op that defines the kind).  Pairs that involve an H-atom
  (Stein's lemma, V-transforms, quadrature, factorization, the joint N-D
  evaluator) are ``kernels.nonlinear``'s;
* ``M(atom, side)``, ``S(scalar, side)``: first moments and per-input scalars;
* ``D(k, l)``: the backward covariance ``E[dG_k dG_l']`` (Sec. 4), from the
  backward program's consumers and multipliers and the consumers' rule in
  ``ADJOINT``; ``ntk()`` sums ``D * Cov`` over every pair of uses of every
  parameter (Sec. 5), by the parameter kind's rule in ``NTK_TERMS``.

Rules are generators: ``x = yield from planner.cov(u, v, pair)`` asks for a
quantity (a rule that asks for nothing may be a plain function).
``Planner.run`` drives them with an explicit stack, so a program of any depth is
planned without recursion.  Every value is ``None`` (exactly zero), a float, or a
plan node.
"""
from __future__ import annotations

import inspect
import math

from ..ir import READOUT, Bias, Builder, HAtom, Matrix, SConst, SMoment, Var
from ..ir import nodes as irn
from ..ir.printer import atom_label
from ..plan import Env, Lift, LiftAll, Mul, Plan, Pow, Rsqrt
from . import expect, quadrature, spatial
from .nonlinear import SIDES, HVarExpectations

SAME_INPUT = ("d1", "d2")
# Batch size the contraction paths are planned for (kernels are called on any batch).
NOMINAL = 64

# Rule tables, filled by the ops that define each kind (ntkcompile/ops/*).
COVARIANCE: dict = {}      # atom class -> rule(planner, a, b, pair): E[a b'] for two atoms of that kind
MEAN: dict = {}            # atom class -> rule(planner, a, side): E[a] for a non-Gaussian linear atom
ADJOINT: dict = {}         # atom class -> rule(planner, u, w): Cov(B_u, B_w') of two consumers
NTK_TERMS: dict = {}       # parameter class -> rule(planner, param, atoms): its NTK terms (a list)
SCALARS: dict = {}         # scalar class -> rule(planner, s, side): its per-input array on side (1 or 2)
READOUT_POOLS: dict = {}   # readout.pool -> (cov(planner, core), adjoint(planner)) of a pooled readout


def ask(rule, *args):
    """Run a table rule: a generator (which may ask for quantities) or a plain function."""
    out = rule(*args)
    if inspect.isgenerator(out):
        out = yield from out
    return out


def register(table: dict, key, rule=None):
    """Register ``rule`` for ``key`` in one of the tables above (once per key)."""
    def deco(fn):
        if key in table:
            raise ValueError(f"a planning rule for {key!r} is already registered")
        table[key] = fn
        return fn
    return deco(rule) if rule is not None else deco


def pick(d, key):
    """An entry of a sampler's result (called by the generated code)."""
    return d[key]


# the entry of a sampler's result (``"x"``, ``"d"``, ``"f"``) holding the moments of a pair
SAMPLED_PAIRS = {"x": "x", "d1": "d", "d2": "d", "f1": "f", "f2": "f"}


def register_sampled(kind, evaluate, combined: str):
    """``COVARIANCE`` and ``MEAN`` of an atom ``kind`` whose moments come from one joint Monte
    Carlo per atom (max pooling, training-mode BatchNorm): ``evaluate(pl, a, k_in, stream)``
    plans the sampler's call on the covariance of the atom's argument, returning a dict with
    ``"x"``, ``"d"``, ``"f"`` and ``"mean"``; ``stream`` numbers the atoms of the kind, to draw
    each from its own samples; ``combined``: the error for two different such atoms in one
    expectation.  Returns ``forward(pl, a)``, the memoized sampler (a rule generator), for the
    kind's other rules."""
    def forward(pl, a):
        memo = pl.__dict__.setdefault(f"sampled_{kind.__name__}", {})
        if a not in memo:
            k_in = yield from pl.cov(a.arg, a.arg, "x")
            memo[a] = evaluate(pl, a, pl.tensor(k_in), len(memo))
        return memo[a]

    @register(COVARIANCE, kind)
    def _cov(pl, a, b, pair):
        if a is not b:
            raise NotImplementedError(combined)
        sim = yield from forward(pl, a)
        return pl.call(pick, sim, SAMPLED_PAIRS[pair])

    @register(MEAN, kind)
    def _mean(pl, a, side):
        sim = yield from forward(pl, a)
        return pl.call(pick, sim, "mean")

    return forward


class Planner(HVarExpectations):
    """Plans the NNGP and NTK of one lowered program (with its backward program)."""

    def __init__(self, program, *, mc_samples=quadrature.DEFAULT_MC_SAMPLES, seed=0, degree=96, tol=None, nd_degree=None,
                 joint_samples=4096):
        self.p, self.bw = program, program.backward
        self.b = program.backward.builder        # nodes derived while planning live here
        self.plan = Plan()
        self.mc_samples, self.seed = mc_samples, seed
        self.joint_samples = joint_samples     # coordinates of the joint Monte Carlo per replicate
        self.deg1, self.deg2 = 2 * degree, degree      # quadrature nodes per dimension in 1-D and 2-D
        self.tol = tol
        # N-D trapezoidal nodes per dimension for rank 1, 2, 3: as the 1-D and 2-D rules,
        # and a third of the 2-D ones in 3-D (the grid has degree^3 nodes), or nd_degree
        self.nd_degrees = (nd_degree,) * 3 if nd_degree else (2 * degree, degree, max(16, degree // 3))
        self.memo: dict = {}
        self._active: set = set()
        # Layout analysis: a flatten readout only ever pairs position s with s (convs
        # keep that diagonal), so cross arrays are (N1, N2, *P); anything that mixes
        # positions (global pooling, inner pooling) needs every pair, (N1, N2, *P, *P).
        self.diag = aligned_positions(program)
        self.like = self.plan.make(Env, "like")
        self.batch = self.plan.make(Env, "batch")
        self.errors = self.plan.make(Env, "errors")
        self.mc = self.plan.make(Env, "mc")           # (samples, seed), given per call (replicates)
        self.pairs = self.plan.make(Env, "pairs")     # (I, J) of the packed pairs against itself, else None
        # A readout at every position (``pool == "steps"``): the backward program runs once
        # for every pair of output positions (s, s'), as leading axes of every backward
        # array, ``(*P, *P, *batch, ...)``; ``dbatch`` is their batch shape.
        r = program.readout
        self.steps = r.pool == "steps"
        self.plan.seeds = tuple(r.positions) * 2 if self.steps else ()
        self.dbatch = self.plan.make(Env, "dbatch") if self.steps else self.batch

    # ------------------------------------------------------------ driver
    def run(self, gen):
        """Drive a rule generator to completion, answering its requests (memoized).

        While a rule runs, the plan records its request as the origin of the plan
        nodes it makes (``Plan.origin``): a value that goes wrong at run time can
        then be traced back to the expectation and the IR nodes it came from.
        """
        stack, value = [(None, gen)], None
        while True:
            key, g = stack[-1]
            self.plan.context = key
            try:
                request = g.send(value)
            except StopIteration as stop:
                stack.pop()
                value = stop.value
                if key is not None:
                    self.memo[key] = value
                    self._active.discard(key)
                if not stack:
                    self.plan.context = None
                    return value
                continue
            if request in self.memo:
                value = self.memo[request]
                continue
            if request in self._active:
                raise RuntimeError(f"internal error: circular request {request[0]} while planning")
            self._active.add(request)
            stack.append((request, self._rule(request)))
            value = None

    def _rule(self, key):
        kind = key[0]
        if kind == "E":
            return self._Evar(*key[1:])
        if kind == "A":
            return self._Eatom(*key[1:])
        if kind == "S":
            return self._scalar(*key[1:])
        if kind == "M":
            return self._mean_h(*key[1:])
        if kind == "D":
            return self._D(*key[1:])
        raise KeyError(kind)

    def build(self) -> Plan:
        """Plan both kernels; ``plan.outputs`` gets ``"nngp"`` and ``"ntk"``."""
        self.plan.outputs["nngp"] = self.run(self.nngp())
        self.plan.outputs["ntk"] = self.run(self.ntk())
        return self.plan

    # ------------------------------------------------------------ plumbing
    def lift(self, x, side, pair, k=0, own=None):
        """A per-input array of ``side`` broadcast into the layout of ``pair``.

        ``k`` is the number of position axes of the context: same-input arrays are
        ``(N, *P)``, cross arrays ``(N1, N2, *P, *P)`` (kernels.spatial).  ``own``: the
        array's own number of position axes when it may have none in a context with
        positions (a per-input scalar ``(N,)`` beside a feature map: a GroupNorm's).
        """
        if x is None or isinstance(x, float):
            return x
        if own == 0 and k:
            x = self.call(spatial.unit_positions, x, k)
        if pair in SAME_INPUT:
            return x
        if pair in ("f1", "f2"):
            return self.plan.make(LiftAll, x, side < 0, k, abs(side)) if k else x
        if self.diag:
            k = 0                # positions aligned: (N, *P) -> (N, 1, *P)
        return self.plan.make(Lift, x, abs(side), k)

    def k(self, *nodes) -> int:
        return max(len(self.p.positions(n)) for n in nodes)

    def call(self, fn, *args, note=None, options=()):
        """A runtime helper's call: ``args`` are values (None, an exact zero, becomes 0.0),
        ``options`` are passed as they are."""
        return self.plan.call(fn, *[0.0 if a is None else a for a in args], *options, note=note)

    def static(self, obj, prefix):
        return self.plan.static(obj, prefix)

    def tensor(self, x):
        """A plan node, or a constant as a 0-d tensor on the inputs' device (for
        helpers that build arrays from their argument, which must not land on the CPU)."""
        return x if not isinstance(x, float) else self.call(expect.const, x, self.like)

    @staticmethod
    def label(node):
        return atom_label(node)

    # ------------------------------------------------------------ requests
    def scalar(self, s, side):
        """A per-input scalar node on ``side``: float or an array of shape (N,)."""
        if isinstance(s, SConst):
            return s.value
        return (yield ("S", s, abs(side)))

    def cov(self, u, v, pair):
        """``E[Z^u Z^v']`` for two Vecs or two Vars (piecewise, weighted by fractions)."""
        if isinstance(u, Var):
            if pair in SAME_INPUT and u.uid > v.uid:
                u, v = v, u
            return (yield ("E", u, v, pair))
        if len(u.pieces) == 1 and len(v.pieces) == 1:
            return (yield from self.cov(u.pieces[0][1], v.pieces[0][1], pair))
        pu, pv = Builder.refine(u, v)
        terms = []
        for (a, x), (_, y) in zip(pu, pv):
            terms.append(self.plan.mul(float(a), (yield from self.cov(x, y, pair))))
        return self.plan.add(terms)

    def cov_atoms(self, a, b, pair):
        if pair in SAME_INPUT and a.uid > b.uid:
            a, b = b, a
        return (yield ("A", a, b, pair))

    def D(self, k, l, weight=None):
        """``D = E[dG_k dG_l']`` on the cross pair (GIA; see ``ir.program.BackwardProgram``).

        With ``weight`` (a Var in the coordinates of ``G_k``), the multipliers are
        multiplied by it first: ``E[(dG_k w)(dG_l' w')]``, the NTK term of an
        elementwise gain, which does *not* factorize into ``D * E[w w']`` when the
        backward multiplier depends on ``w`` (e.g. ``tanh(LayerNorm(x))``).
        """
        return (yield ("D", k, l, weight))

    # ------------------------------------------------------------ scalars
    def _scalar(self, s, side):
        if isinstance(s, SMoment):
            if s.which == "mean":
                v = yield from self.mean(s.vec, side)
            else:
                v = yield from self.cov(s.vec, s.vec, f"d{side}")
            return 0.0 if v is None else v
        rule = SCALARS.get(type(s))
        if rule is not None:
            return (yield from ask(rule, self, s, side))
        if isinstance(s, irn.SSelect):
            v = yield from self.scalar(s.arg, side)
            return v if isinstance(v, float) else self.call(spatial.map_same, v, self.static(s.map, "posmap"))
        args = []
        for a in s.args:
            args.append((yield from self.scalar(a, side)))
        if s.op == "mul":
            return self.plan.mul(*args) or 0.0
        if s.op == "add":
            return self.plan.add(args) or 0.0
        x = args[0]
        if s.op == "rsqrt":
            return (x + s.param) ** -0.5 if isinstance(x, float) else self.plan.make(Rsqrt, x, s.param)
        if s.op == "pow":
            return x ** s.param if isinstance(x, float) else self.plan.make(Pow, x, s.param)
        if s.op == "posmean":
            k = len(self.p.positions(s.args[0]))
            return x if isinstance(x, float) or not k else self.call(spatial.position_mean, x, k)
        raise NotImplementedError(s.op)

    # ------------------------------------------------------------ first moments
    def mean(self, x, side):
        """``E[Z^x]`` of a Vec, Var or atom on ``side``."""
        if isinstance(x, irn.Vec):
            terms = []
            for a, v in x.pieces:
                terms.append(self.plan.mul(float(a), (yield from self.mean(v, side))))
            return self.plan.add(terms)
        if isinstance(x, Var):
            terms = []
            for c, a in x.terms:
                cs = yield from self.scalar(c, side)
                cs = self.lift(cs, side, f"d{abs(side)}", len(self.p.positions(a)), len(self.p.positions(c)))
                terms.append(self.plan.mul(cs, (yield from self.mean(a, side))))
            return self.plan.add(terms)
        side = abs(side)
        if x is self.p.ONE:
            return 1.0
        if x.gaussian:
            return None
        rule = MEAN.get(type(x))
        if rule is not None:
            return (yield from ask(rule, self, x, side))
        canon = self.canonical(x)
        if canon is not None:
            return (yield from self.mean(canon, side))
        return (yield ("M", x, side))

    def canonical(self, a):
        """An H-atom whose slots hold zero vectors (``Atom.is_zero``: a normalization's probe),
        rewritten without them as a Var, or None if it has none.

        The probe is in the forward program so that the backward pass reads the gain's
        gradient off; its value is 0, and without it slots that differ only by it
        merge (equal or proportional slots become one), so ``relu'(y) * xhat`` of a
        normalization's gain is a function of one Gaussian again, evaluated in closed
        form or by 2-D quadrature instead of the joint evaluator.
        """
        if not isinstance(a, HAtom) or not any(getattr(t, "is_zero", False) for g in a.gargs for _, t in g.terms):
            return None
        b = self.b
        slots = [b.var([(c, t) for c, t in g.terms if not getattr(t, "is_zero", False)]) for g in a.gargs]
        return b.compose(lambda es: b.substitute(a.expr, dict(enumerate(es))), slots)

    # ------------------------------------------------------------ expectations
    def _Evar(self, u, v, pair):
        left, right = SIDES[pair]
        k = self.k(u, v)
        terms = []
        for cu, a in u.terms:
            for cv, b in v.terms:
                e = yield from self.cov_atoms(a, b, pair)
                if e is None:
                    continue
                su = yield from self.scalar(cu, left)
                sv = yield from self.scalar(cv, right)
                terms.append(self.plan.mul(self.lift(su, left, pair, k, len(self.p.positions(cu))),
                                           self.lift(sv, right, pair, k, len(self.p.positions(cv))), e))
        return self.plan.add(terms)

    def _Eatom(self, a, b, pair):
        left, right = SIDES[pair]
        one = self.p.ONE
        k = self.k(a, b)
        if a is one and b is one:
            return 1.0
        if a is one:
            return self.lift((yield from self.mean(b, right)), right, pair, k)
        if b is one:
            return self.lift((yield from self.mean(a, left)), left, pair, k)
        ca, cb = self.canonical(a), self.canonical(b)
        if ca is not None or cb is not None:
            return (yield from self.cov(ca or self.b.atom_var(a), cb or self.b.atom_var(b), pair))
        linear_a, linear_b = not isinstance(a, HAtom), not isinstance(b, HAtom)
        if (linear_a or linear_b) and self.independent_atoms(a, b):
            if a.gaussian or b.gaussian:
                return None               # different matrices: independent, and one has mean 0
            ma = yield from self.mean(a, left)
            mb = yield from self.mean(b, right)
            return self.plan.mul(self.lift(ma, left, pair, k), self.lift(mb, right, pair, k))
        if linear_a and linear_b:
            ga, gb = a.cov_group, b.cov_group
            kind = type(a) if ga is irn.ANY or type(a) is type(b) else type(b)
            # a kind whose rule covaries it with any other atom (a fixed map of positions)
            mixed = [type(t) for t in (a, b) if getattr(t, "covaries_with_others", False)]
            if type(a) is not type(b) and mixed:
                kind = mixed[0]
            rule = COVARIANCE.get(kind)
            if rule is None or (type(a) is not type(b) and not mixed and ga is not irn.ANY and gb is not irn.ANY):
                raise NotImplementedError(f"the covariance of a {type(a).__name__} and a {type(b).__name__}")
            return (yield from ask(rule, self, a, b, pair))
        if linear_a or linear_b:
            lin = a if linear_a else b
            if not lin.gaussian:
                raise NotImplementedError(
                    f"a {type(lin).__name__} of non-Gaussian vectors combined with a nonlinearity")
            return (yield from self.stein(a, b, pair))
        return (yield from self.hh(a, b, pair))

    @staticmethod
    def independent_atoms(a, b) -> bool:
        """True if two atoms are independent by construction: each is a function of the
        G-vars of its own parameters only (``cov_group``; an H-atom: of its slots')."""
        def groups(x):
            if isinstance(x, HAtom):
                return {t.cov_group for g in x.gargs for _, t in g.terms}
            return {x.cov_group}
        ga, gb = groups(a), groups(b)
        return irn.ANY not in ga and irn.ANY not in gb and not (ga & gb)

    def independent(self, u: Var, v: Var) -> bool:
        """True if two Gaussian Vars are independent by construction (distinct matrices)."""
        for _, a in u.terms:
            for _, b in v.terms:
                ga, gb = a.cov_group, b.cov_group
                if ga is irn.ANY or gb is irn.ANY or ga is gb:
                    return False
        return True

    # ------------------------------------------------------------ backward
    def _D(self, k, l, weight):
        terms = []
        for u in self.bw.consumers.get(k, ()):
            for w in self.bw.consumers.get(l, ()):
                terms.append((yield from self._Dpair(k, u, l, w, weight)))
        return self.plan.add(terms)

    def _Dpair(self, k, u, l, w, weight):
        """The covariance of consumer ``u``'s part of ``dG_k`` and ``w``'s part of ``dG_l``.

        A fixed map of positions ``u`` (``covaries_with_others``: ``M_u^T dG_u``) beside
        another kind of consumer ``w`` (``h + roll(h)``, ``h - h.mean(0)``): ``dG_u`` holds
        backward atoms of ``w``'s kind, with forward multipliers that covary with ``w``'s, so
        this is ``M_u^T`` of the parts of ``dG_u`` paired with ``w`` (recursively), not a
        covariance of independent backward atoms."""
        map_u, map_w = (getattr(type(a), "covaries_with_others", False) for a in (u, w))
        if map_u != map_w:
            d = yield from (self._Dmap(k, u, l, w, 1) if map_u else self._Dmap(l, w, k, u, 2))
            if d is not None and weight is not None:
                # the gain's weight at k's positions times multipliers at the map's: not a pair expectation
                raise NotImplementedError("a normalization's gain on a vector read both through a map of "
                                          "positions and directly by layers whose gradients covary")
            return d      # (planned nodes no output reaches are not rendered)
        bc = yield from self.bcov(u, w)
        if bc is None:
            return None
        terms = []
        pu, pw = Builder.refine(self.bw.arg(self.p, u), self.bw.arg(self.p, w))
        for (alpha, vu), (_, vw) in zip(pu, pw):
            mk, ml = self.bw.multipliers[(vu, k)], self.bw.multipliers[(vw, l)]
            if mk is None or ml is None:
                continue
            if weight is not None:
                mk, ml = self.times(mk, weight), self.times(ml, weight)
            e = yield from self.cov(mk, ml, "x")
            terms.append(self.plan.mul(float(alpha), e, bc))
        return self.plan.add(terms)

    def _Dmap(self, k, u, l, w, side):
        """``_Dpair`` for a map ``u`` of ``k`` on ``side`` (1: ``k`` of the first input) and a
        consumer ``w`` of ``l`` of another kind: ``c_k M_u^T sum_c Cov(c's part of dG_u, w's part
        of dG_l)``, ``c_k`` the coefficient of ``k`` in the map's argument."""
        pieces = self.bw.arg(self.p, u).pieces
        if len(pieces) != 1:
            raise NotImplementedError("a map of positions of a concatenation read beside another layer")
        coef = self.bw.multipliers[(pieces[0][1], k)]
        parts = []
        for c in self.bw.consumers.get(u, ()):
            parts.append((yield from (self._Dpair(u, c, l, w, None) if side == 1 else self._Dpair(l, w, u, c, None))))
        inner = self.plan.add(parts)
        if inner is None or coef is None:
            return None
        out = self.call(spatial.map_adjoint_side, self.tensor(inner), self.static(u.map, "posmap"), side,
                        self.dbatch)
        c = yield from self.mean(coef, side)
        return self.plan.mul(self.lift(c, side, "x", self.k(k, l)), out)

    def times(self, m: Var, w: Var) -> Var:
        """The elementwise product ``m * w`` of two Vars in the same coordinates."""
        return self.b.compose(lambda es: self.b.emul(es), [m, w])

    def bcov(self, u, w):
        """Covariance of the backward atoms ``B_u``, ``B_w`` (readout ``v``, ``W^T dy``, ...)."""
        if u == READOUT and w == READOUT:
            r = self.p.readout
            if r.pool is None:
                return r.W_std ** 2
            if self.steps:       # dh_p dh'_q = v v' [p = s][q = s'], one seed per output pair
                return self.plan.mul(r.W_std ** 2, self.call(spatial.seed_pairs, r.positions, self.like, self.batch))
            return (yield from ask(READOUT_POOLS[r.pool][1], self))
        if u == READOUT or w == READOUT:
            return None
        rule = ADJOINT.get(type(u))
        if rule is None or type(w) is not type(u):
            return None       # independent backward atoms (different kinds of maps)
        return (yield from ask(rule, self, u, w))

    # ------------------------------------------------------------ kernels
    def readout_cov(self):
        """``E[x_L x_L']`` as the readout sees it (pooled or flattened positions)."""
        r = self.p.readout
        core = yield from self.cov(r.vec, r.vec, "x")
        if r.pool in (None, "steps") or core is None:
            return core
        return (yield from ask(READOUT_POOLS[r.pool][0], self, core))

    def nngp(self):
        r = self.p.readout
        core = yield from self.readout_cov()
        return self.plan.mul(r.scale ** 2, self.plan.add([self.plan.mul(r.W_std ** 2, core),
                                                          r.b_std ** 2 if r.has_bias else None]))

    def spatial_sum(self, term, positions):
        """NTK terms of a parameter shared over positions sum over all pairs of positions.

        Written as a product then a sum, not as an einsum: on cache-sized tiles a
        batched dot product through einsum (bmm) measured 3x slower than mul + sum,
        and under ``jit=True`` the product fuses into the reduction anyway.
        """
        if term is None or not positions:
            return term
        if isinstance(term, float):      # a constant summed over the stored position pairs
            return term * math.prod(positions) ** (1 if self.diag else 2)
        sp = tuple(positions) if self.diag else tuple(positions) * 2
        return self.call(spatial.spatial_sum, term, self.dbatch, sp)

    def ntk(self):
        r = self.p.readout
        core = yield from self.readout_cov()
        readout = self.plan.mul(r.W_std ** 2, core)
        if self.steps and readout is not None:       # (*batch, *P, *P) -> the backward's (*P, *P, *batch)
            readout = self.call(spatial.to_seeds, self.tensor(readout), self.batch, len(self.plan.seeds))
        terms = [readout, r.b_std ** 2 if r.has_bias else None]
        uses: dict = {}
        for node in self.p.nodes:
            p = getattr(node, "param", None)
            if p is not None and isinstance(node, irn.Atom):
                uses.setdefault(p, []).append(node)
        for param in self.p.params:
            rule = NTK_TERMS.get(type(param))
            if rule is None:
                raise NotImplementedError(f"the NTK terms of a {type(param).__name__} parameter")
            terms += (yield from ask(rule, self, param, uses.get(param, [])))
        # terms summed over the same positions: one sum of their products (one fused program)
        total = self.plan.add(self.plan.merge_calls(terms, spatial.spatial_sum))
        if self.steps and total is not None and not isinstance(total, float):
            total = self.call(spatial.from_seeds, total, self.dbatch, len(self.plan.seeds))
        return self.plan.mul(r.scale ** 2, total)

    def pairs_of_uses(self, atoms, positions_of):
        """``sum_{u, w} D(u, w) * E[u w']`` over every pair of uses of one parameter (weight
        sharing: all pairs), summed over the positions it is shared by.  ``E = c * x`` enters
        as ``c * D * x``: the forward pass then need not store the scaled ``c * x``."""
        terms = []
        for u in atoms:
            for w in atoms:
                d = yield from self.D(u, w)
                e = yield from self.cov_atoms(u, w, "x")
                factors = e.factors if isinstance(e, Mul) and isinstance(e.factors[0], float) else (e,)
                terms.append(self.spatial_sum(self.plan.mul(d, *factors), positions_of(u)))
        return terms


@register(NTK_TERMS, Matrix)
def _matrix_ntk(pl, param, atoms):
    return (yield from pl.pairs_of_uses(atoms, pl.p.positions))


@register(NTK_TERMS, Bias)
def _bias_ntk(pl, param, atoms):
    return (yield from pl.pairs_of_uses(atoms, lambda u: param.positions))


def aligned_positions(program) -> bool:
    """Layout analysis: True if cross arrays need only aligned positions ``(N1, N2, *P)``.

    A flatten readout pairs position s only with s, and convolutions keep that
    diagonal; an atom kind that mixes positions (``mixes_positions``: average
    pooling) needs every pair.
    """
    return program.readout.pool == "flatten" and not any(
        getattr(n, "mixes_positions", False) for n in program.nodes)


def plan_kernels(program, **options) -> Plan:
    """The kernel plan of ``program`` (which must carry its backward program)."""
    return Planner(program, **options).build()
