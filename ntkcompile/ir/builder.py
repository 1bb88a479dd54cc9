"""Interning and the algebra of canonical forms.

``Builder.make`` interns nodes: structurally equal nodes are the same object.
On top of it the builder does linear algebra on canonical forms (``lincomb``),
composes nonlinearities of vectors into one H-atom of Gaussian slots
(``apply``), and renames or differentiates expressions (``substitute``,
``differentiate``).

A builder is *frozen* once its stage is done (``freeze``): the forward program
after lowering, the backward program after planning.  A later stage that needs
new nodes (the backward pass's derivatives, the planner's factors) uses a child
builder (``Builder(parent=...)``): it finds every node of its parent, and
creates new nodes only in itself, so the parent stays closed.
"""
from __future__ import annotations

from fractions import Fraction

from ..errors import IRError
from . import walk
from .nodes import (ECall, EConst, ELin, EMul, ESlot, HAtom, Node, Param, SConst, SMoment, SOp, SSelect,
                    Var, Vec)


def _key_of(value):
    if isinstance(value, Node):
        return ("n", value.uid)
    if isinstance(value, tuple):
        return tuple(_key_of(v) for v in value)
    if isinstance(value, Param):
        return ("p", id(value))
    if isinstance(value, (int, float, str, Fraction)) or value is None:
        return (type(value).__name__, value)
    return ("o", id(value))   # Elementwise entries, geometries and other immutable objects


def _expr_children(e):
    """Sub-expressions of an expression (coefficients are scalars, not walked)."""
    if isinstance(e, ELin):
        return tuple(x for _, x in e.terms)
    return e.children()


def holds_probe(atom) -> bool:
    """True if a linear map's argument holds a zero probe (``Atom.is_zero``: a normalization's
    gain and shift).  Such a map is not a G-var for nonlinearities: the gain's NTK term
    ``E[(dy xhat)(dy' xhat')]`` reads ``xhat`` where the probe is, and a nonlinearity after
    the map makes ``dy`` depend on ``xhat`` through the map (``planner.D``'s weight cannot
    follow it), so a nonlinearity of it is refused."""
    arg = getattr(atom, "arg", None)
    return arg is not None and hasattr(arg, "pieces") and any(
        getattr(t, "is_zero", False) for _, v in arg.pieces for _, t in v.terms)


class Builder:
    """Creates interned nodes and does linear algebra on canonical forms."""

    def __init__(self, parent: "Builder" = None):
        if parent is not None and not parent.frozen:
            raise IRError("internal error: a child builder needs a frozen parent")
        self.parent = parent
        self._table: dict = {}
        self._ids: set = set()
        self.nodes: list = []
        self.params: list = []     # in creation order (a child builder creates none)
        self.frozen = False
        self._end = parent._end if parent is not None else 0     # the next free uid
        self.ONE = parent.ONE if parent is not None else None
        if parent is None:
            self.ONE = self.hatom(self.econst(1.0), ())

    # interning ---------------------------------------------------------------
    def lookup(self, key):
        b = self
        while b is not None:
            n = b._table.get(key)
            if n is not None:
                return n
            b = b.parent
        return None

    def make(self, cls, *fields):
        key = (cls.__name__,) + tuple(_key_of(f) for f in fields)
        found = self.lookup(key)
        if found is not None:
            return found
        if self.frozen:
            raise IRError(f"internal error: a {cls.__name__} node was created in a frozen program")
        node = cls(*fields, uid=self._end)
        self._end += 1
        self._table[key] = node
        self._ids.add(id(node))
        self.nodes.append(node)
        return node

    def freeze(self):
        self.frozen = True
        return self

    def owns(self, node) -> bool:
        """True if ``node`` was interned by this builder or an ancestor."""
        b = self
        while b is not None:
            if id(node) in b._ids:
                return True
            b = b.parent
        return False

    def param(self, cls, **fields):
        if self.parent is not None or self.frozen:
            raise IRError("internal error: parameters are created only while lowering")
        p = cls(uid=len(self.params), **fields)
        self.params.append(p)
        return p

    # scalars -------------------------------------------------------------------
    def sconst(self, v):
        return self.make(SConst, float(v))

    def smul(self, a, b):
        if isinstance(a, SConst) and isinstance(b, SConst):
            return self.sconst(a.value * b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, SConst):
                if x.value == 1.0:
                    return y
                if x.value == 0.0:
                    return x
        return self.make(SOp, "mul", tuple(sorted((a, b), key=lambda n: n.uid)), 0.0)

    def sadd(self, a, b):
        if isinstance(a, SConst) and isinstance(b, SConst):
            return self.sconst(a.value + b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, SConst) and x.value == 0.0:
                return y
        return self.make(SOp, "add", tuple(sorted((a, b), key=lambda n: n.uid)), 0.0)

    def sneg(self, a):
        return self.smul(self.sconst(-1.0), a)

    def srsqrt(self, a, eps=0.0):
        if isinstance(a, SConst):
            return self.sconst((a.value + eps) ** -0.5)
        return self.make(SOp, "rsqrt", (a,), float(eps))

    def spow(self, a, p):
        return self.make(SOp, "pow", (a,), float(p))

    def sselect(self, pmap, a):
        """``a`` read at the positions the selection ``pmap`` keeps (``a`` has its input
        positions; a constant is itself)."""
        return a if isinstance(a, SConst) else self.make(SSelect, pmap, a)

    def sposmean(self, a):
        """The mean of the per-position scalar ``a`` over its positions."""
        return a if isinstance(a, SConst) else self.make(SOp, "posmean", (a,), 0.0)

    def smoment(self, which, vec):
        if which == "mean" and all(v.gaussian for _, v in vec.pieces):
            return self.sconst(0.0)          # G-vars have mean zero
        return self.make(SMoment, which, vec)

    # expressions -------------------------------------------------------------
    def econst(self, v):
        return self.make(EConst, float(v))

    def eslot(self, i):
        return self.make(ESlot, i)

    def ecall(self, fn, arg):
        return self.make(ECall, fn, arg)

    def emul(self, args):
        consts = [a for a in args if isinstance(a, EConst)]
        rest = [a for a in args if not isinstance(a, EConst)]
        c = 1.0
        for a in consts:
            c *= a.value
        if c == 0.0:
            return self.econst(0.0)
        if not rest:
            return self.econst(c)
        core = rest[0] if len(rest) == 1 else self.make(EMul, tuple(rest))
        return core if c == 1.0 else self.elin([(self.sconst(c), core)])

    def elin(self, terms):
        """``sum coef * expr``, merging equal expressions and dropping zeros."""
        acc: dict = {}
        order = []
        for coef, e in terms:
            if isinstance(e, ELin):                      # flatten
                for c2, e2 in e.terms:
                    self._acc(acc, order, self.smul(coef, c2), e2)
            elif isinstance(e, EConst):
                if e.value != 0.0:
                    self._acc(acc, order, self.smul(coef, self.sconst(e.value)), self.econst(1.0))
            else:
                self._acc(acc, order, coef, e)
        out = [(acc[e], e) for e in order if not (isinstance(acc[e], SConst) and acc[e].value == 0.0)]
        if not out:
            return self.econst(0.0)
        if len(out) == 1:
            c, e = out[0]
            if isinstance(c, SConst):
                if isinstance(e, EConst):
                    return self.econst(c.value * e.value)
                if c.value == 1.0:
                    return e
        return self.make(ELin, tuple(out))

    def _acc(self, acc, order, coef, e):
        if e in acc:
            acc[e] = self.sadd(acc[e], coef)
        else:
            acc[e] = coef
            order.append(e)

    # atoms and vars ------------------------------------------------------------
    def hatom(self, expr, gargs):
        """``expr(gargs)``; slots the expression does not use are dropped (a derivative,
        or terms that cancelled, may lose some)."""
        expr, gargs = self._compact(expr, list(gargs))
        return self.make(HAtom, expr, tuple(gargs))

    def _compact(self, expr, slots):
        used = sorted(_slots_used(expr))
        if len(used) < len(slots):
            expr = self.substitute(expr, {j: self.eslot(k) for k, j in enumerate(used)})
            slots = [slots[j] for j in used]
        return expr, slots

    def var(self, terms):
        """Canonical ``Var`` from ``(Scalar, Atom)`` pairs (merged, sorted, zeros dropped)."""
        acc: dict = {}
        for coef, atom in terms:
            acc[atom] = self.sadd(acc[atom], coef) if atom in acc else coef
        items = [(c, a) for a, c in acc.items() if not (isinstance(c, SConst) and c.value == 0.0)]
        items.sort(key=lambda t: t[1].uid)
        return self.make(Var, tuple(items))

    def atom_var(self, atom):
        return self.var([(self.sconst(1.0), atom)])

    def vec(self, pieces):
        return self.make(Vec, tuple((Fraction(a), v) for a, v in pieces))

    def single(self, var):
        return self.vec([(Fraction(1), var)])

    def one_vec(self):
        """The constant vector of ones (a shift, a mean subtracted)."""
        return self.single(self.atom_var(self.ONE))

    # vector algebra ------------------------------------------------------------
    @staticmethod
    def refine(*vecs):
        """Split every Vec at the union of piece boundaries; returns aligned piece lists."""
        def ends(v):
            out, pos = [], Fraction(0)
            for a, var in v.pieces:
                pos += a
                out.append((pos, var))
            return out

        cuts = sorted({pos for v in vecs for pos, _ in ends(v)})
        aligned = []
        for v in vecs:
            pieces, prev, j, bounds = [], Fraction(0), 0, ends(v)
            for c in cuts:
                while bounds[j][0] < c:
                    j += 1
                pieces.append((c - prev, bounds[j][1]))
                prev = c
            aligned.append(pieces)
        return aligned

    def lincomb(self, terms):
        """``sum coef_i * vec_i`` for ``(Scalar, Vec)`` pairs, piecewise."""
        vecs = [v for _, v in terms]
        aligned = self.refine(*vecs)
        pieces = []
        for k in range(len(aligned[0])):
            frac = aligned[0][k][0]
            vterms = []
            for (coef, _), al in zip(terms, aligned):
                for c2, atom in al[k][1].terms:
                    vterms.append((self.smul(coef, c2), atom))
            pieces.append((frac, self.var(vterms)))
        return self.vec(pieces)

    def apply(self, fn_expr_builder, vecs):
        """Apply an elementwise function of several vectors piecewise.

        ``fn_expr_builder(list_of_arg_exprs) -> Expr`` builds the expression of
        the result from the expressions of the arguments.
        """
        aligned = self.refine(*vecs)
        pieces = []
        for k in range(len(aligned[0])):
            frac = aligned[0][k][0]
            pieces.append((frac, self.compose(fn_expr_builder, [al[k][1] for al in aligned])))
        return self.vec(pieces)

    def compose(self, fn_expr_builder, vars_):
        """Compose a function of Vars into one H-atom of Gaussian slot Vars."""
        slots: list = []

        def slot_of(gvar):
            if gvar in slots:
                return self.eslot(slots.index(gvar))
            for i, s in enumerate(slots):      # a multiple of a slot is that slot, scaled
                r = _ratio(gvar, s)
                if r is not None:
                    return self.elin([(self.sconst(r), self.eslot(i))])
            slots.append(gvar)
            return self.eslot(len(slots) - 1)

        def expr_of(var):
            gauss = [(c, a) for c, a in var.terms if a.gaussian]
            terms = []
            if gauss:
                terms.append((self.sconst(1.0), slot_of(self.var(gauss))))
            for c, a in var.terms:
                if a.gaussian:
                    continue
                if not isinstance(a, HAtom):
                    why = ("; it holds a normalization's trainable gain/shift, whose NTK term would need "
                           "that map inside the nonlinearity's derivative: apply the nonlinearity before "
                           "the map, or use elementwise_affine=False" if holds_probe(a) else "")
                    raise NotImplementedError(
                        f"a nonlinearity of {type(a).__name__} of a non-Gaussian vector (e.g. average "
                        f"pooling of a nonlinearity, then another nonlinearity){why}")
                remap = {i: slot_of(g) for i, g in enumerate(a.gargs)}
                terms.append((c, self.substitute(a.expr, remap)))
            return self.elin(terms) if terms else self.econst(0.0)

        expr = fn_expr_builder([expr_of(v) for v in vars_])
        expr, slots = self._compact(expr, slots)
        if isinstance(expr, EConst):
            return self.var([(self.sconst(expr.value), self.ONE)]) if expr.value else self.var([])
        if isinstance(expr, ESlot):
            return slots[expr.index]
        return self.atom_var(self.hatom(expr, slots))

    def substitute(self, expr, remap, scalar=None):
        """Rename slots: ``ESlot(i) -> remap[i]`` (an Expr); ``scalar`` maps the coefficients."""
        scalar = scalar or (lambda c: c)
        rule = walk.by_type({
            ESlot: lambda e, _: remap[e.index],
            EConst: lambda e, _: e,
            ECall: lambda e, xs: self.ecall(e.fn, xs[0]),
            ELin: lambda e, xs: self.elin([(scalar(c), x) for (c, _), x in zip(e.terms, xs)]),
            EMul: lambda e, xs: self.emul(xs),
        })
        return walk.fold(expr, rule, children=_expr_children)

    def differentiate(self, expr, slot):
        """Symbolic ``d expr / d slot``; a nonlinearity's derivative is ``fn.prime()``."""
        zero = lambda d: isinstance(d, EConst) and d.value == 0.0  # noqa: E731

        def call(e, ds):
            return ds[0] if zero(ds[0]) else self.emul([self.ecall(e.fn.prime(), e.arg), ds[0]])

        def mul(e, ds):
            terms = [(self.sconst(1.0), self.emul(list(e.args[:i]) + [d] + list(e.args[i + 1:])))
                     for i, d in enumerate(ds) if not zero(d)]
            return self.elin(terms)

        rule = walk.by_type({
            ESlot: lambda e, _: self.econst(1.0 if e.index == slot else 0.0),
            EConst: lambda e, _: self.econst(0.0),
            ECall: call,
            ELin: lambda e, ds: self.elin([(c, d) for (c, _), d in zip(e.terms, ds)]),
            EMul: mul,
        })
        return walk.fold(expr, rule, children=_expr_children)

    def expr_var(self, expr, gargs) -> Var:
        """The Var of ``expr`` over the slots ``gargs``: a constant, a slot itself, or one H-atom."""
        if isinstance(expr, EConst):
            return self.var([(self.sconst(expr.value), self.ONE)]) if expr.value else self.var([])
        if isinstance(expr, ESlot):
            return gargs[expr.index]
        return self.atom_var(self.hatom(expr, gargs))


# Questions about expressions, each one fold -----------------------------------------

def _ratio(u, v):
    """``r`` if the Var ``u`` is ``r`` times the Var ``v`` with constant coefficients, else None."""
    if len(u.terms) != len(v.terms) or not u.terms:
        return None
    r = None
    for (cu, au), (cv, av) in zip(u.terms, v.terms):
        if au is not av or not isinstance(cu, SConst) or not isinstance(cv, SConst) or cv.value == 0.0:
            return None
        q = cu.value / cv.value
        if r is None:
            r = q
        elif q != r:
            return None
    return r


def _slots_used(expr) -> set:
    return {e.index for e in walk.postorder([expr], _expr_children) if isinstance(e, ESlot)}


def expr_uses_slot(expr, slot) -> bool:
    return walk.fold(expr, walk.by_type({ESlot: lambda e, _: e.index == slot}, default=lambda e, xs: any(xs)),
                     children=_expr_children)


def expr_smooth(expr) -> bool:
    """False if any nonlinearity in ``expr`` has a kink or jump (quadrature is then approximate)."""
    return walk.fold(expr, walk.by_type({ECall: lambda e, xs: e.fn.smooth and xs[0]},
                                        default=lambda e, xs: all(xs)), children=_expr_children)


def expr_has_jump(expr) -> bool:
    """True if a nonlinearity in ``expr`` jumps (Stein's lemma with a.e. derivatives is then wrong)."""
    return walk.fold(expr, walk.by_type({ECall: lambda e, xs: e.fn.jumps or xs[0]},
                                        default=lambda e, xs: any(xs)), children=_expr_children)


def expr_breaks(expr):
    """``{slot: breaks}``: where ``expr`` may fail to be smooth along each slot, or None if unknown.

    Known when every non-smooth nonlinearity in ``expr`` has known ``breaks`` and
    is applied to one slot, affinely with constant coefficients (``phi(slot)``,
    ``phi(a * slot + b)``: breaks at ``(t - b) / a``), possibly inside smooth
    functions, sums and products: ``expr`` is then smooth away from those points
    of that slot, so quadrature split there is exact on each piece, and its jumps
    (for Stein's lemma) can only sit there.  ``phi(tanh(slot))``, ``phi(slot0 +
    slot1)`` or a per-input coefficient give None.
    """
    def call(e, xs):
        if e.fn.smooth:
            return xs[0]
        at = _affine_in_one_slot(e.arg)
        if e.fn.breaks is None or at is None:
            return None
        slot, a, b = at
        return {slot: tuple(sorted((t - b) / a for t in e.fn.breaks))}

    def merge(e, xs):
        if any(x is None for x in xs):
            return None
        out: dict = {}
        for x in xs:
            for slot, ts in x.items():
                out[slot] = tuple(sorted(set(out.get(slot, ()) + ts)))
        return out

    return walk.fold(expr, walk.by_type({ESlot: lambda e, _: {}, EConst: lambda e, _: {}, ECall: call},
                                        default=merge), children=_expr_children)


def _affine_in_one_slot(e):
    """``(slot, a, b)`` if ``e`` is ``a * slot + b`` with constants ``a != 0``, ``b``; else None."""
    if isinstance(e, ESlot):
        return e.index, 1.0, 0.0
    if not isinstance(e, ELin) or not all(isinstance(c, SConst) for c, _ in e.terms):
        return None
    slots = [(c.value, x.index) for c, x in e.terms if isinstance(x, ESlot)]
    b = sum(c.value * x.value for c, x in e.terms if isinstance(x, EConst))
    if len(slots) != 1 or slots[0][0] == 0.0 or len(e.terms) != len(slots) + sum(
            isinstance(x, EConst) for _, x in e.terms):
        return None
    return slots[0][1], slots[0][0], b
