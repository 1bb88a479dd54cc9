"""N-D integrands as straight-line programs for the fused quasi-Monte Carlo (``sampling.c``).

The N-D evaluator's integrand is a product of atoms' expressions over the slots: sums with
scalar coefficients, products, and elementwise nonlinearities (``relu(z0 + relu(z1))`` and
its derivative for a post-activation residual chain).  When every nonlinearity has a
piecewise polynomial form (``Elementwise.piecewise``: relu, its derivative the step, leaky
relu, abs, hardtanh, clamp, ...) and every coefficient is a constant, ``build`` writes the
integrand as a ``Program``: instructions that ``sampling.c`` interprets point block by
point block with ``z`` and every intermediate in L1, where the torch form walks whole
``(points, entries)`` arrays once per op, and the same steps as one C loop (``c_body``)
that ``native`` compiles, every value in registers.  Anything else (a smooth function such
as tanh, a per-input coefficient) gives None, and the torch form runs.

The program takes the torch form's operations in its order (the generated lambda's: linear
combinations ``(c0 x0 + c1 x1) + ...``, products left to right, each piece of a nonlinearity
by Horner as ``Piecewise``; ``1.0 * x`` is ``x``), so each value of the integrand agrees with
it to the last bit for the piecewise linear functions (relu, step), to rounding for higher
degrees; the compiled loop adds its sums in another order (agreeing to rounding).

The integrands the planner asks for over one slot covariance (a residual block's
``E[h h']`` and the chains of its derivatives) form a ``Family`` (``join``): one program
(``build_family``) with every member's outputs, its equal steps computed once, that
``qmc.expect_family`` runs on one set of points.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

from ..ir import nodes as irn
from . import native

_OPS = {"const": 0, "add": 1, "mul": 2, "pw": 3, "out": 4, "pwadd": 5, "outmul": 6}


class Program:
    """Instructions ``(op, dst, a, b, p)`` over registers (the first ``slots`` hold the slots),
    their constants, the registers they use and the number of outputs."""

    def __init__(self, code, consts, registers: int, slots: int, outputs: int, source: str = "", terms=None,
                 squared=(0,)):
        self.code, self.consts = tuple(code), tuple(consts)
        self.registers, self.slots, self.outputs = registers, slots, outputs
        self.source = source          # the body: a C function of a block of points (``c_body``), named {name}
        self.terms = tuple(terms or (2,) * slots)     # the terms of each slot the body reads (``build``'s groups)
        self.squared = tuple(squared)  # the outputs whose standard errors are wanted (the interpreter: 0 only)
        self.members = ((0, outputs),)  # a family's (``build_family``): each one's first output and count
        self._c = None
        self.body = None               # the compiled body's address once ``native`` has built it

    def __repr__(self):
        return f"<pointwise program: {len(self.code)} steps, {self.slots} slots, {self.outputs} outputs>"


class _Unsupported(Exception):
    pass


class _Writer:
    def __init__(self, slots: int):
        self.slots = slots
        self.steps: list = []            # (op, args): args are value numbers (slots first) or ints
        self.consts: List[float] = []
        self.memo: dict = {}
        self.values = slots               # values numbered: the slots, then one per step
        self.terms = [2] * slots          # the terms of each slot the compiled body reads

    def _const_index(self, values: Sequence[float]) -> int:
        k = len(self.consts)
        self.consts.extend(float(v) for v in values)
        return k

    def step(self, op, *args, key=None):
        # every step is a pure function of its operands: equal steps are one value (the members
        # of a family share the chain of their residual blocks)
        key = (op, args) if key is None else key
        if key in self.memo:
            return self.memo[key]
        self.steps.append((op, args))
        v = self.values
        self.values += 1
        self.memo[key] = v
        return v

    def const(self, c: float):
        return self.step("const", self._const_index([c]), key=("const", float(c)))

    def expr(self, e, offset: int):
        key = (id(e), offset)
        if key in self.memo:
            return self.memo[key]
        if isinstance(e, irn.ESlot):
            v = offset + e.index
        elif isinstance(e, irn.EConst):
            v = self.const(e.value)
        elif isinstance(e, irn.ECall):
            pw = getattr(e.fn, "piecewise", None)
            if pw is None:
                raise _Unsupported(e.fn)
            x = self.expr(e.arg, offset)
            v = self.step("pw", x, self._piecewise(pw))
        elif isinstance(e, irn.EMul):
            v = self.product([self.expr(a, offset) for a in e.args])
        elif isinstance(e, irn.ELin):
            terms = []
            for c, t in e.terms:
                if not isinstance(c, irn.SConst):
                    raise _Unsupported(c)        # a per-input coefficient: the torch form
                # as the planner's ``coef * x`` (``coef * 1.0`` for a constant term); ``1.0 * x`` is x
                if isinstance(t, irn.EConst):
                    terms.append(self.const(float(c.value) * 1.0))
                elif float(c.value) == 1.0:
                    terms.append(self.expr(t, offset))
                else:
                    terms.append(self.step("mul", self.const(c.value), self.expr(t, offset)))
            v = terms[0]
            for t in terms[1:]:
                v = self.step("add", v, t)
        else:
            raise _Unsupported(e)
        self.memo[key] = v
        return v

    def product(self, values):
        v = values[0]
        for w in values[1:]:
            v = self.step("mul", v, w)
        return v

    def _piecewise(self, pw) -> int:
        width = max(len(c) for c in pw.coeffs)
        at = [pw._at_break(i) for i in range(len(pw.breaks))]
        coeffs = [a for c in pw.coeffs for a in tuple(c) + (0.0,) * (width - len(c))]
        values = tuple(float(v) for v in (len(pw.breaks), width, *pw.breaks, *at, *coeffs))
        key = ("piecewise",) + values
        if key not in self.memo:
            self.memo[key] = self._const_index(values)
        return self.memo[key]

    def _one_pass(self, p: int) -> bool:
        """Whether the piecewise function at consts[p] is one ``sampling.c`` takes in one pass."""
        return self.consts[p] == 1 and self.consts[p + 1] <= 2

    def assemble(self, outputs, squared=(0,)) -> Program:
        """Fused steps, then registers.  A one-pass piecewise function of a sum read nowhere
        else is one step (``pwadd``: ``relu(z + h)``, the residual chain's step), and an
        output that is a product read nowhere else is accumulated from its factors
        (``outmul``): each saves a pass over the block.  The slots keep their registers; every
        other value takes the first register free when it is made (freed after its last
        read, so never the destination of the step that reads it last)."""
        steps = {self.slots + k: [op, (args[:2] if op in ("add", "mul") else args[:1] if op == "pw" else ()),
                                  args[1] if op == "pw" else args[0] if op == "const" else None]
                 for k, (op, args) in enumerate(self.steps)}
        uses: dict = {}
        for _, reads, _ in steps.values():
            for a in reads:
                uses[a] = uses.get(a, 0) + 1
        for v in outputs:
            uses[v] = uses.get(v, 0) + 1
        for v, step in steps.items():
            x = step[1][0] if step[0] == "pw" else None
            if x in steps and steps[x][0] == "add" and uses[x] == 1 and self._one_pass(step[2]):
                step[0], step[1] = "pwadd", steps[x][1]
                steps[x][0] = "dead"
        outs = []
        for v in outputs:
            if v in steps and steps[v][0] == "mul" and uses[v] == 1:
                outs.append(("outmul", steps[v][1]))
                steps[v][0] = "dead"
            else:
                outs.append(("out", (v, v)))
        live = [(v, st) for v, st in steps.items() if st[0] != "dead"]
        last = {}
        for k, (_, (_, reads, _)) in enumerate(live):
            for a in reads:
                last[a] = k
        for _, reads in outs:
            for a in reads:
                last[a] = len(live)
        reg = {s: s for s in range(self.slots)}
        free: list = []
        top = self.slots
        code = []
        for k, (v, (op, reads, param)) in enumerate(live):
            if op == "const" or not free:      # constants are filled once: never freed
                reg[v], top = top, top + 1
            else:
                reg[v] = free.pop(0)
            for a in set(reads):
                if a in steps and last.get(a) == k and steps[a][0] != "const":
                    free.append(reg[a])
            free.sort()
            r = [reg[a] for a in reads] + [0, 0]
            code.append((_OPS[op], reg[v], param if op == "const" else r[0], r[1],
                         param if op in ("pw", "pwadd") else 0))
        for j, (op, reads) in enumerate(outs):
            code.append((_OPS[op], j, reg[reads[0]], reg[reads[1]], 0))
        return Program(code, self.consts, top, self.slots, len(outputs), self.c_body(outputs, squared), self.terms,
                       squared)

    def c_body(self, outputs, squared=(0,)) -> str:
        """The program as one C loop over a block of points, every value a local (the
        compiler keeps them in vector registers), that adds up its outputs: ``sampling.c``'s
        ``body_fn`` (``acc[2q]``: the sum of output ``q``, ``acc[2q + 1]`` that of its square
        for ``q`` in ``squared``).  Slot ``s`` is ``c[2s] e[2s][i] + c[2s+1] e[2s+1][i]``, the
        second term left out where ``self.terms`` says one (a slot with fewer terms at run time has ``c = 0``);
        the steps are the interpreter's, in its order, constants as exact hex literals.
        ``native`` lets the compiler reorder the sums (vectorized), so they agree with the
        torch form to rounding."""
        d = self.slots
        lit = float.hex
        lines = ["void {name}(const double *const *e, const double *c, int64_t m, double *restrict acc) {"]
        lines += [f"    const double *restrict e{k} = e[{k}], c{k} = c[{k}];" for k in range(2 * d)]
        sums = [2 * q for q in range(len(outputs))] + [2 * q + 1 for q in squared]
        lines.append("    double " + ", ".join(f"s{j} = 0.0" for j in sorted(sums)) + ";")
        lines.append("    for (int64_t i = 0; i < m; i++) {")
        # (the torch form's 0 + c0 e0 would differ only in the sign of a zero, which no piecewise
        # function tells apart: left out, it saves an addition per slot and point)
        body = [f"const double v{s} = c{2 * s} * e{2 * s}[i]" + (f" + c{2 * s + 1} * e{2 * s + 1}[i];"
                                                               if self.terms[s] > 1 else ";") for s in range(d)]
        for k, (op, args) in enumerate(self.steps):
            v = f"v{d + k}"
            if op == "const":
                body.append(f"const double {v} = {lit(self.consts[args[0]])};")
            elif op in ("add", "mul"):
                body.append(f"const double {v} = v{args[0]} {'+' if op == 'add' else '*'} v{args[1]};")
            else:
                body += self._c_piecewise(v, f"v{args[0]}", args[1])
        body += [f"s{2 * q} += v{v};" for q, v in enumerate(outputs)]
        body += [f"s{2 * q + 1} += v{outputs[q]} * v{outputs[q]};" for q in squared]
        lines += ["        " + b for b in body] + ["    }"]
        lines += [f"    acc[{j}] += s{j};" for j in sorted(sums)] + ["}"]
        return "\n".join(lines) + "\n"

    def _c_piecewise(self, v, x, p):
        """``v = pw(x)`` as ``sampling.c``'s ``piecewise``: piece 0, then ``x > t_k ? piece_k``,
        then the values at the breaks (left out where piece k - 1 already takes it there)."""
        m, width = int(self.consts[p]), int(self.consts[p + 1])
        t, at = self.consts[p + 2:p + 2 + m], self.consts[p + 2 + m:p + 2 + 2 * m]
        pieces = [self.consts[p + 2 + 2 * m + k * width:p + 2 + 2 * m + (k + 1) * width] for k in range(m + 1)]

        def horner(cs, arg):          # trailing zero coefficients dropped, x for the identity
            cs = list(cs)
            while len(cs) > 1 and cs[-1] == 0.0:
                cs.pop()
            if cs == [0.0, 1.0]:
                return arg
            out = float.hex(cs[-1])
            for a in reversed(cs[:-1]):
                out = f"({out} * {arg} + {float.hex(a)})"
            return out

        lines = [f"double {v} = {horner(pieces[0], x)};"]
        lines += [f"{v} = {x} > {float.hex(t[k])} ? {horner(pieces[k + 1], x)} : {v};" for k in range(m)]
        for k in range(m):
            left = pieces[k][-1]
            for a in reversed(pieces[k][:-1]):
                left = left * t[k] + a
            if left != at[k] or math.copysign(1.0, left) != math.copysign(1.0, at[k]):
                lines.append(f"{v} = {x} == {float.hex(t[k])} ? {float.hex(at[k])} : {v};")
        return lines


def build(parts, slots: int, pair: bool, groups=None, register: bool = True) -> Optional[Program]:
    """The program of the N-D evaluator's integrand: ``parts`` are its factors ``(expr,
    offset)`` (an atom's expression over slots ``offset + j``; ``expr`` None for a G-var,
    the slot ``offset`` itself); one output, their product, or with ``pair`` (two factors)
    three: ``a b``, ``a a``, ``b b`` (``expect.qn_pair``'s moments).  ``groups``: the slots'
    independent groups (``qmc.blocks``), when known: the compiled body then reads one term
    for the first slot of a group of two (its factor's first row), two for the second.  None
    if some nonlinearity has no piecewise polynomial form or a coefficient is not a constant;
    queued for ``native``'s next build with ``register``."""
    return build_family([(parts, pair)], slots, groups, register)


def build_family(members, slots: int, groups=None, register: bool = True) -> Optional[Program]:
    """One program for several integrands over the same slots (``members``: ``build``'s
    ``(parts, pair)`` each), their outputs one after the other (``Program.members``: each
    one's first output and count; the first output's standard error is wanted), equal steps
    computed once: the expectations that share a covariance on the same points in one pass."""
    w = _Writer(slots)
    for g in groups or ():
        if len(g) <= 2:
            for r, slot in enumerate(g):
                w.terms[slot] = r + 1
    outputs, spans = [], []
    try:
        for parts, pair in members:
            values = [offset if e is None else w.expr(e, offset) for e, offset in parts]
            spans.append((len(outputs), 3 if pair else 1))
            if pair:
                a, b = values
                outputs += [w.step("mul", a, b), w.step("mul", a, a), w.step("mul", b, b)]
            else:
                outputs.append(w.product(values))
    except _Unsupported:
        return None
    program = w.assemble(outputs, [first for first, _ in spans])
    program.members = tuple(spans)
    if register:
        native.register(program)
    return program


class Family:
    """The N-D evaluator's integrands over one slot covariance (the calls of one residual
    block: ``E[h h']`` and its chains of derivatives), to be run on the same points in one
    pass: ``program`` (``build_family`` of the members so far, queued for ``native``) and
    ``stream``, the first member's, which every member uses so that each alone (not
    compiled, another device) takes the same points and gives the same values."""

    def __init__(self, slots: int, groups, stream: int):
        self.slots, self.groups, self.stream = slots, groups, stream
        self.members: list = []
        self.program: Optional[Program] = None

    def add(self, parts, pair: bool) -> int:
        """Join ``build``'s integrand; its index among the members."""
        self.members.append((parts, pair))
        self.program = build_family(self.members, self.slots, self.groups)
        return len(self.members) - 1

    @property
    def outputs(self) -> int:
        return 0 if self.program is None else self.program.outputs

    def __repr__(self):
        return f"<family of {len(self.members)} integrands over {self.slots} slots>"


# Outputs of one program at most (sampling.c's QMC_MAX_OUT): a family with more starts another.
MAX_OUTPUTS = 32


def join(families: dict, key, parts, pair: bool, slots: int, groups, stream: int):
    """``(family, index)``: ``build``'s integrand joined to the family ``key`` of ``families``,
    a new one (with ``stream``) where there is none yet or the last is full (``MAX_OUTPUTS``;
    a deep ResNet's last block has a derivative chain per block)."""
    family = families.get(key)
    if family is None or family.outputs + (3 if pair else 1) > MAX_OUTPUTS:
        family = families[key] = Family(slots, groups, stream)
    return family, family.add(parts, pair)
