"""Codegen: a kernel plan (``ntkcompile.plan``) rendered as Python source, compiled once.

``render(plan, self_mode=..., outputs=...)`` returns a function
``kernel_self(x1)`` or ``kernel_cross(x1, x2) -> (nngp, ntk, errors)`` and its
source text (what ``kfn.code`` shows).  ``errors`` is a list of
``(kind, 0-d tensor)`` pairs: Monte Carlo standard errors and quadrature error
estimates.

One plan serves every call mode.  Against itself (``self_mode``) side 2 *is*
side 1, so every same-input array of side 2 is one of side 1 (the plan is
re-interned with that substitution, which merges them), cross arrays are
stored for the pairs ``i <= j`` only (``kernels.spatial.pack``), and
``SetDiagonal`` pins their diagonal to the same-input variances.  Only what
the requested outputs need is rendered.

The generated code is plain torch: one line per array (arithmetic used once is
written inline), an ``einsum`` per step of each contraction along the path
opt_einsum fixes now, and ``del`` after the last use of every temporary.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import opt_einsum

from . import plan as P
from .ir.walk import postorder
from .kernels import expect, program, quadrature, spatial

_PRELUDE = {"pair_indices": spatial.pair_indices, "unpack": spatial.unpack, "unpack_seeds": spatial.unpack_seeds,
            "full": expect.full,
            "pack": spatial.pack, "with_diagonal_packed": spatial.with_diagonal_packed,
            "with_diagonal_aligned": spatial.with_diagonal_aligned, "lift1": spatial.lift1,
            "lift2": spatial.lift2, "liftp": spatial.liftp, "liftf": spatial.liftf, "gather": spatial.gather,
            "program": program.run, "pair_gram": spatial.pair_gram}
_ENV = {"like": "like", "batch": "BATCH", "dbatch": "DBATCH", "errors": "_err", "mc": "MC"}
_ARITH = (P.Mul, P.Add, P.Pow, P.Rsqrt)


def specialize(plan: P.Plan, self_mode: bool, names):
    """The requested outputs, re-interned (against itself, side 2 becomes side 1), and the
    origins of the nodes they use (``Plan.origin``, by uid of the returned nodes)."""
    if not self_mode:
        return {n: plan.outputs.get(n) for n in names}, plan.origin

    def make(spec, node, fields):
        if isinstance(node, P.Input):
            fields[0] = 1
        return spec.make(type(node), *fields)

    return _reintern({n: plan.outputs.get(n) for n in names}, plan.origin, make)


def _split_sums(values, origin):
    """``values`` re-interned with each sum over positions of several terms,
    ``spatial_sum(t1 + t2 + ...)`` (``Plan.merge_calls``), as the sum of the terms' sums: for
    fused programs, which compute each term's sum in the pass that computes the term's
    factors (``kernels.program._hoist_sums``), storing no position-pair array for it."""
    def make(spec, node, fields):
        x = fields[1][0] if isinstance(node, P.Call) and node.fn is spatial.spatial_sum else None
        if isinstance(x, P.Add) and all(isinstance(t, P.PNode) for t in x.terms):
            return spec.add([spec.make(P.Call, node.fn, (t, *fields[1][1:]), fields[2]) for t in x.terms])
        return spec.make(type(node), *fields)

    return _reintern(values, origin, make)


def _reintern(values, origin, make):
    """``values`` (name -> node) copied into a new plan, node by node, children first, as
    ``make(plan, node, fields)`` (its fields already copied) makes each; with the origins of
    the new nodes."""
    spec = P.Plan()
    memo: dict = {}

    def remap(v):
        if isinstance(v, P.PNode):
            return memo[v.uid]
        if isinstance(v, tuple):
            return tuple(remap(x) for x in v)
        return v

    for node in P.reachable(list(values.values())):
        memo[node.uid] = make(spec, node, [remap(getattr(node, f)) for f in node._fields if f != "uid"])
        spec.origin.setdefault(memo[node.uid].uid, origin.get(node.uid))
    return {n: remap(v) for n, v in values.items()}, spec.origin


class _Region:
    """Elementwise plan steps computed as one fused ``kernels.program.Program``: ``members``
    in order, ``outputs`` (the members used outside it)."""

    def __init__(self, members, outputs):
        self.members, self.outputs = members, outputs


class _Renderer:
    def __init__(self, self_mode: bool, check: bool = False):
        self.self_mode = self_mode
        self.check = check
        self.namespace = dict(_PRELUDE)
        self.namespace["torch"] = __import__("torch")
        self._bound: dict = {}
        self.names: dict = {}            # node uid -> variable name
        self.statements: list = []       # (lines, assigned name, names or None)
        self.weights: dict = {}          # name -> pair arrays its value holds, where not 1 (``fn.arrays``)
        self._count = 0
        self.uses: dict = {}
        self._text: dict = {}            # node uid -> rendered inline text
        self.free: dict = {}

    # ------------------------------------------------------------ names
    def bind(self, obj, prefix):
        """A name for ``obj`` in the generated namespace (``<prefix><n>``), by reference."""
        key = id(obj)
        if key not in self._bound:
            n = len(self._bound)
            while f"{prefix}{n}" in self.namespace:
                n += 1
            name = f"{prefix}{n}"
            self._bound[key] = name
            self.namespace[name] = obj
        return self._bound[key]

    def bind_fn(self, fn):
        """A runtime helper under its own name (``stencil_pair``, ``q2``, ...)."""
        name = getattr(fn, "__name__", "")
        if self.namespace.get(name) is fn:
            return name
        if name.isidentifier() and name not in self.namespace:
            self.namespace[name] = fn
            return name
        return self.bind(fn, "helper")

    def fresh(self):
        self._count += 1
        return f"k{self._count}"

    # ------------------------------------------------------------ scheduling
    def children(self, n):
        """What must be computed before ``n`` in the enclosing scope."""
        if isinstance(n, P.Fn):
            return _boundary([n.body], lambda m: "slot" in self.free[m.uid])
        if isinstance(n, P.Loop):
            return tuple(v for v in n.init if isinstance(v, P.PNode)) + \
                _boundary(list(n.body), lambda m: ("loop", n.id) in self.free[m.uid])
        if isinstance(n, (P.Slot, P.LoopVar)):
            return ()
        return n.children()

    def bind_scopes(self, roots):
        """``free[uid]``: the binders (a lambda's slots, a loop's variables) a node uses."""
        for n in postorder([r for r in roots if isinstance(r, P.PNode)]):
            if isinstance(n, P.Slot):
                f = frozenset({"slot"})
            elif isinstance(n, P.LoopVar):
                f = frozenset({("loop", n.loop)})
            else:
                f = frozenset().union(*(self.free[c.uid] for c in n.children()))
                if isinstance(n, P.Fn):
                    f = f - {"slot"}
                elif isinstance(n, P.Loop):
                    f = f - {("loop", n.id)}
            self.free[n.uid] = f

    def schedule(self, roots):
        self.bind_scopes(roots)
        order = postorder([r for r in roots if isinstance(r, P.PNode)], self.children)
        for n in order:
            self.count_uses(n)
        return order

    def count_uses(self, n):
        # What a lambda or a loop body uses counts twice: it is computed once, outside.  So
        # does what a lift or a layout change uses: those are written inline wherever they
        # are used, and their argument must be a name.
        weight = 2 if isinstance(n, (P.Fn, P.Loop, P.Lift, P.LiftAll, P.ToPairs, P.SetDiagonal)) else 1
        for c in self.children(n):
            self.uses[c.uid] = self.uses.get(c.uid, 0) + weight

    # ------------------------------------------------------------ expressions
    def value(self, v) -> str:
        if v is None:
            return "None"
        if isinstance(v, bool) or isinstance(v, int):
            return repr(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else f"float({repr(v)!r})"
        if isinstance(v, tuple):
            inner = ", ".join(self.value(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if isinstance(v, str):
            return repr(v)
        if v.uid in self.names:
            return self.names[v.uid]
        if v.uid not in self._text:
            # children first, so that rendering a deep expression never recurses deeply
            inline = lambda m: () if m.uid in self.names or m.uid in self._text else m.children()  # noqa: E731
            for m in postorder([v], inline):
                if m.uid not in self.names and m.uid not in self._text:
                    self._text[m.uid] = self.expr(m)
        return self._text[v.uid]

    def expr(self, n) -> str:
        if isinstance(n, P.Input):
            return f"F{n.side}[{n.index}]"
        if isinstance(n, P.Env):
            if n.name == "pairs":          # the packed pairs' rows and columns (against itself)
                return "(I, J)" if self.self_mode else "None"
            return _ENV[n.name]
        if isinstance(n, P.Static):
            return self.bind(n.obj, n.prefix)
        if isinstance(n, P.Slot):
            return "z" if n.index is None else f"z[..., {n.index}]"
        if isinstance(n, P.LoopVar):
            return f"c{n.loop}_{n.i}" if n.i is not None else f"t{n.loop}"
        if isinstance(n, P.Lift):
            return self.lift(n)
        if isinstance(n, P.LiftAll):
            return f"liftf({self.value(n.x)}, {n.k}, {n.right}, {n.side})"
        if isinstance(n, P.ToPairs):
            return f"pack({self.value(n.x)}, I, J)" if self.self_mode else self.value(n.x)
        if isinstance(n, P.Mul):
            return " * ".join(self._operand(f, group=True) for f in n.factors)
        if isinstance(n, P.Add):
            return " + ".join(self._operand(t, group=isinstance(t, P.Add)) for t in n.terms)
        if isinstance(n, P.Pow):
            return f"({self.value(n.x)}) ** {n.p!r}"
        if isinstance(n, P.Rsqrt):
            return f"torch.rsqrt({self._operand(n.x, group=isinstance(n.x, P.Add))} + {n.eps!r})"
        if isinstance(n, P.Apply):
            return f"{self.value(n.fn)}({self.value(n.x)})"
        if isinstance(n, P.Fn):
            return f"lambda z: {self.value(n.body)}"
        if isinstance(n, P.Call):
            return f"{self.bind_fn(n.fn)}({', '.join(self.value(a) for a in n.args)})"
        if isinstance(n, P.SetDiagonal):
            if not self.self_mode:
                return self.value(n.x)
            how = "with_diagonal_aligned" if n.aligned else "with_diagonal_packed"
            return f"{how}({self.value(n.x)}, {self.value(n.same)}, DIAG)"
        raise TypeError(f"cannot render {type(n).__name__} inline")

    def _operand(self, v, group):
        """An operand, parenthesized where Python's precedence would regroup it."""
        s = self.value(v)
        if group and isinstance(v, (P.Mul, P.Add)) and v.uid not in self.names:
            return f"({s})"
        return s

    def lift(self, n):
        x = self.value(n.x)
        if self.self_mode:       # packed pairs i <= j (kernels.spatial.pack)
            idx = "I" if n.side == 1 else "J"
            return f"liftp({x}, {idx}, {n.k}, {n.side == 2})" if n.k else f"gather({x}, {idx})"
        if n.k:
            return f"lift{n.side}({x}, {n.k})"
        return f"{x}[:, None]" if n.side == 1 else f"{x}[None, :]"

    # ------------------------------------------------------------ fusion
    def fuse(self, order, roots):
        """``order`` with its chains of elementwise steps gathered into ``_Region``s, each
        computed by one fused program (``kernels.program.chains`` finds them)."""
        out = [n if isinstance(n, P.PNode) else _Region(*n)
               for n in program.chains(order, roots, self.children, self.self_mode)]
        self.uses = {}
        for n in out:
            if not isinstance(n, _Region):
                self.count_uses(n)
        for n in out:          # after the others: whether a lift is read only by regions
            if isinstance(n, _Region):
                for c in self._leaves(n):
                    read = c.x if self._lifted(c) else c
                    self.uses[read.uid] = self.uses.get(read.uid, 0) + 2
        return out

    def _leaves(self, region) -> list:
        """What a region reads from outside, in order of first use."""
        inside = {m.uid for m in region.members}
        found: dict = {}
        for m in region.members:
            for c in m.children():
                if c.uid not in inside and not isinstance(c, (P.Env, P.Static)):
                    found.setdefault(c.uid, c)
        return list(found.values())

    def _lifted(self, n):
        return self.self_mode and isinstance(n, P.Lift) and n.k == 0 and self.uses.get(n.uid, 0) == 0

    def region(self, reg, indent):
        index = {m.uid: k for k, m in enumerate(reg.members)}
        leaves = self._leaves(reg)
        at = {c.uid: i for i, c in enumerate(leaves)}
        args, shown = [], []         # the inputs as the call passes them, as the comment shows them
        for c in leaves:
            if self._lifted(c):      # a per-input array lifted to the packed pairs: x[I] in the program
                x, idx = self.value(c.x), "I" if c.side == 1 else "J"
                args.append(f"({x}, {idx})")
                shown.append(f"{x}[{idx}]")
            else:
                args.append(self.value(c))
                shown.append(args[-1])

        def ref(v):
            if not isinstance(v, P.PNode):
                return float(v)
            return ("step", index[v.uid]) if v.uid in index else ("leaf", at[v.uid])

        steps, envs = [], []
        for m in reg.members:
            if isinstance(m, (P.Add, P.Mul)):
                steps.append(("add" if isinstance(m, P.Add) else "mul",
                              tuple(ref(t) for t in (m.terms if isinstance(m, P.Add) else m.factors))))
            elif m.fn is expect.angle:
                steps.append(("angle", tuple(ref(a) for a in m.args[1:])))
            elif program.reduction(m):
                x, batch, sp = program.reduction_args(m)
                if self.value(batch) not in envs:
                    envs.append(self.value(batch))
                steps.append(("sum", (ref(x),), m.fn, sp, envs.index(self.value(batch))))
            else:
                steps.append(("rule", tuple(ref(a) for a in m.args[2:]), m.args[0].obj))
        prog = program.Program(steps, len(leaves), [index[o.uid] for o in reg.outputs])
        names = [self.fresh() for _ in reg.outputs]
        rules = sum(1 for m in reg.members if isinstance(m, P.Call) and not program.reduction(m))
        env = f", envs=({', '.join(envs)},)" if envs else ""
        text = (f"{indent}{', '.join(names)}{',' if len(names) == 1 else ''} = program({self.bind(prog, 'prog')}, "
                f"like, {', '.join(args)}{env})  # fused: {len(steps)} steps, {rules} closed forms")
        steps = [f"{indent}#   {line}" for line in prog.lines(shown)]
        self.statements.append((steps + [text] + self._checked(names[0], reg.outputs[0], indent), tuple(names)))
        for o, name in zip(reg.outputs, names):
            self.names[o.uid] = name

    # ------------------------------------------------------------ statements
    def emit_all(self, order, indent=""):
        for n in order:
            self.emit(n, indent)

    def emit(self, n, indent=""):
        if isinstance(n, _Region):
            self.region(n, indent)
            return
        gather = isinstance(n, P.Lift) and self.self_mode and self.uses.get(n.uid, 0) > 1
        if isinstance(n, (P.Input, P.Env, P.Static, P.Lift, P.LiftAll, P.Slot, P.LoopVar, P.Fn, P.Apply,
                          P.ToPairs)) and not gather:
            return        # written inline where used (a lift against itself, a gather, once if reused)
        if isinstance(n, P.SetDiagonal) and not self.self_mode:
            self.names[n.uid] = self.value(n.x)
            return
        if isinstance(n, _ARITH) and self.uses.get(n.uid, 0) == 1:
            return                                  # used once: inline
        if isinstance(n, P.Contract):
            self.names[n.uid] = self.contract(n, indent)
            return
        if isinstance(n, P.Loop):
            self.loop(n, indent)
            return
        if isinstance(n, P.LoopOut):
            self.names[n.uid] = f"c{n.loop.id}_{n.i}"
            return
        name = self.fresh()
        text = f"{indent}{name} = {self.expr(n)}"
        if isinstance(n, P.Call) and n.note:
            text += f"  # {n.note[0]}: {n.note[1]}"
        if isinstance(n, P.Call) and hasattr(n.fn, "arrays"):       # a helper whose result holds several
            self.weights[name] = n.fn.arrays(*n.args)
        self.statements.append(([text] + self._checked(name, n, indent), name))
        self.names[n.uid] = name

    def _checked(self, name, n, indent):
        """With ``check``: a line that raises ``NonFiniteValue(uid)`` if the array has a NaN or inf."""
        return [f"{indent}_chk({name}, {n.uid})"] if self.check else []

    def contract(self, n, indent):
        """The contraction along a path fixed now: one ``torch.einsum`` line per pairwise step.

        The path is opt_einsum's (``optimal`` up to 4 operands, else ``greedy``),
        planned on nominal shapes (a path does not depend on batch sizes in any way
        that matters here).  Plain torch is emitted so that ``torch.compile`` traces it.
        """
        strategy = "optimal" if len(n.operands) <= 4 else "greedy"
        _, info = opt_einsum.contract_path(n.equation, *n.shapes, shapes=True, optimize=strategy)
        names = [self.value(o) for o in n.operands]
        for step, (inds, _, eq, _, _) in enumerate(info.contraction_list):
            args = [names.pop(i) for i in inds]     # opt_einsum's order: indices descending
            name = self.fresh()
            expr = _pair_gram(eq, args, info.size_dict) or f"torch.einsum({eq!r}, {', '.join(args)})"
            line = f"{indent}{name} = {expr}"
            if step == len(info.contraction_list) - 1:
                line += (f"  # opt_einsum {n.equation!r} step {step + 1}/{len(info.contraction_list)}, "
                         f"{float(info.opt_cost):.2g} flops at nominal sizes")
            self.statements.append(([line] + self._checked(name, n, indent), name))
            names.append(name)
        return names[0]

    def loop(self, n, indent):
        """``for t in range(count)``: carried values ``c<id>_<i>``, body lines inside."""
        carried = [f"c{n.id}_{i}" for i in range(len(n.init))]
        for name, v in zip(carried, n.init):
            self.statements.append(([f"{indent}{name} = {self.value(v)}"], name))
        outer, outer_uses = self.statements, self.uses
        self.statements, self.uses = [], dict(outer_uses)
        own = lambda m: ("loop", n.id) in self.free[m.uid]  # noqa: E731
        body = [v for v in postorder([v for v in n.body if isinstance(v, P.PNode)], self.children) if own(v)]
        for m in body:
            self.count_uses(m)
        self.emit_all(body, indent + "    ")
        new = [self.value(v) for v in n.body]
        lines = [f"{indent}for t{n.id} in range({n.count}):"]
        lines += [ln for stmt, _ in self.statements for ln in stmt]
        lines.append(f"{indent}    {', '.join(carried)} = {', '.join(new)}")
        for m in body:
            self.names.pop(m.uid, None)
            self._text.pop(m.uid, None)
        self.statements, self.uses = outer, outer_uses
        self.statements.append((lines, None))


def _boundary(roots, local) -> tuple:
    """Nodes outside a scope that the scope's values ``roots`` use."""
    out, seen, stack = [], set(), [r for r in roots if isinstance(r, P.PNode)]
    while stack:
        n = stack.pop()
        if n.uid in seen:
            continue
        seen.add(n.uid)
        if local(n):
            stack.extend(n.children())
        else:
            out.append(n)
    return tuple(out)


_ASSIGN = re.compile(r"^\s*(k\d+|c\d+_\d+) = ")
_NAME = re.compile(r"\b(k\d+|c\d+_\d+)\b")


def _free_dead(statements, returns, weights=None):
    """``del`` after the last use of every temporary: peak memory is then the live set of
    ``(N1, N2, ...)`` arrays, not every intermediate of the program.  Returns the lines
    and the size of the largest live set (a name counting as ``weights[name]`` arrays, else 1)."""
    weights = weights or {}
    last = {}
    for i, (lines, _) in enumerate(statements):
        for line in lines:
            for name in _NAME.findall(line.split("  #")[0]):
                last[name] = i
    keep = set(_NAME.findall(returns))
    dies: dict = {}
    for name, i in last.items():
        dies.setdefault(i, []).append(name)
    out, live, most = [], 0, 0
    for i, (lines, assigned) in enumerate(statements):
        out.extend(lines)
        assigned = (assigned,) if isinstance(assigned, str) else assigned or ()     # a fused program: several
        live += sum(weights.get(a, 1) for a in assigned)
        most = max(most, live)
        dead = sorted(n for n in dies.get(i, ()) if n not in keep and n not in assigned and not n.startswith("c"))
        if dead:
            out.append("del " + ", ".join(dead))
            live -= sum(weights.get(d, 1) for d in dead)
    return out, most


def _build(signature, head, body_statements, returns, namespace, weights=None):
    lines, most = _free_dead(body_statements, returns, weights)
    body = head + lines + [f"return {returns}"]
    src = f"def {signature}:\n" + "".join(f"    {line}\n" for line in body)
    ns = dict(namespace)
    fname = signature.split("(")[0]
    exec(compile(src, f"<ntkcompile:{fname}>", "exec"), ns)
    fn = ns[fname]
    fn.live_arrays = max(1, most)     # the most pair arrays alive at once (for memory estimates)
    return fn, src


def function(values, *, name="f", self_mode=False):
    """``(function, source)`` computing plan ``values`` from the fixed inputs ``F1``
    (a tuple), without the kernel's set-up: the core of ``render``, and a way to run a
    piece of a plan on its own."""
    r = _Renderer(self_mode)
    r.emit_all(r.schedule(list(values)))
    returns = ", ".join(r.value(v) for v in values) + ("," if len(values) == 1 else "")
    names = set(_NAME.findall(returns))
    statements = r.statements + [([f"_out = ({returns})"], None)] if names else r.statements
    r.namespace["_MC"] = (quadrature.DEFAULT_MC_SAMPLES, 0)
    return _build(f"{name}(F1, MC=_MC)", ["F2 = F1", "like = F1[0]", "_err = []"], statements,
                  "_out" if names else f"({returns})", r.namespace, r.weights)


class NonFiniteValue(ArithmeticError):
    """Raised by code rendered with ``check=True``: a plan node produced a NaN or inf.

    ``origin`` is what the planner was computing when it made the node (a request
    key, ``Plan.origin``), ``kind`` the node's type name, ``value`` the array.
    """

    def __init__(self, origin, kind, value):
        super().__init__(kind)
        self.origin, self.kind, self.value = origin, kind, value


def _checker(origins, kinds):
    import torch

    def _chk(x, uid):
        if torch.is_tensor(x) and not bool(torch.isfinite(x).all()):
            raise NonFiniteValue(origins.get(uid), kinds[uid], x)

    def _chk_inputs(fixed):
        for i, x in enumerate(fixed):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteValue(("fixed", i), "Input", x)

    return _chk, _chk_inputs


def render(plan: P.Plan, *, self_mode: bool, outputs=("nngp", "ntk"), prep=None, check=False, mc=(quadrature.DEFAULT_MC_SAMPLES, 0),
           fuse=False):
    """``(function, source)`` of the kernel for one call mode; outputs not requested are None.

    ``fuse=True`` computes chains of elementwise steps as fused programs (``kernels/program.py``:
    one pass in C where it applies, else the same torch calls).

    ``check=True`` checks every array as it is computed and raises ``NonFiniteValue``
    with the plan node of the first one that is not finite (for diagnosis: slower).
    ``mc``: the default ``(samples, seed)`` of the Monte Carlo evaluator, which a
    call may change (``MC=``: independent replicates).
    """
    wanted = [n for n in ("nngp", "ntk") if n in outputs]
    values, origins = specialize(plan, self_mode, wanted)
    if fuse:
        values, origins = _split_sums(values, origins)
    r = _Renderer(self_mode, check)
    r.namespace["prep"] = prep
    head = ["F1 = prep(x1)", "F2 = F1" if self_mode else "F2 = prep(x2)", "like = F1[0]"]
    if check:
        nodes = P.reachable(list(values.values()))
        r.namespace["_chk"], r.namespace["_chk_inputs"] = _checker(origins, {n.uid: type(n).__name__ for n in nodes})
        head[2:2] = ["_chk_inputs(F1)", "_chk_inputs(F2)"]
    if self_mode:
        head += ["I, J, DIAG = pair_indices(x1.shape[0], like.device)", "BATCH = (I.shape[0],)"]
    else:
        head += ["BATCH = (F1[0].shape[0], F2[0].shape[0])"]
    seeds = plan.seeds      # a readout at every position: (*P, *P)
    if seeds:
        head.append(f"DBATCH = {seeds!r} + BATCH")
    head.append("_err = []")
    roots = list(values.values())
    order = r.schedule(roots)
    r.emit_all(r.fuse(order, roots) if fuse else order)
    for name in ("nngp", "ntk"):
        if name not in values:
            r.statements.append(([f"{name} = None"], None))
            continue
        v = "0.0" if values[name] is None else r.value(values[name])      # None: exactly zero
        if seeds:
            out = (f"unpack_seeds(full({v}, like, BATCH + {seeds!r}), I, J, x1.shape[0], {len(seeds)})"
                   if self_mode else f"full({v}, like, BATCH + {seeds!r})")
        else:
            out = (f"unpack(full({v}, like, BATCH), I, J, x1.shape[0])" if self_mode
                   else f"full({v}, like, BATCH)")
        r.statements.append(([f"{name} = {out}"], None))
    sig = "kernel_self(x1, MC=_MC)" if self_mode else "kernel_cross(x1, x2, MC=_MC)"
    r.namespace["_MC"] = tuple(mc)
    return _build(sig, head, r.statements, "nngp, ntk, _err", r.namespace, r.weights)


def _pair_gram(eq: str, args, sizes) -> Optional[str]:
    """``x`` and ``y`` contracted into an array over pairs, ``'acs,bct->abst'`` (a Gram of two
    inputs' patches over pairs of positions), as ``spatial.pair_gram``: one GEMM, written in
    the order ``(a, b, s, t)``.  torch.einsum returns the same values as a permuted view of
    its matmul's ``(b, t, a, s)`` layout, which the fused programs reading it (twice) then
    walk across rows.  None for any other contraction, or where the patches have more
    entries than the positions (``c > t``: torch.einsum there; the GEMM and its output copy
    were not measured against it)."""
    ins, out = eq.split("->")
    if len(out) != 4 or len(args) != 2 or "," not in ins:
        return None
    lhs, rhs = ins.split(",")
    x, y = args
    if out[0] in rhs:                              # the left operand owns the output's first index
        lhs, rhs, x, y = rhs, lhs, y, x
    a, b, s, t = out
    contracted = [i for i in lhs if i in rhs]
    if sorted(lhs) != sorted([a, s] + contracted) or sorted(rhs) != sorted([b, t] + contracted) \
            or len(contracted) != 1 or len(set(lhs + rhs)) != 5:
        return None
    c = contracted[0]
    if sizes.get(c, 0) > sizes.get(t, 0):
        return None

    def ordered(name, have, want):
        perm = [have.index(i) for i in want]
        return name if perm == sorted(perm) else f"{name}.permute({', '.join(map(str, perm))})"

    return f"pair_gram({ordered(x, lhs, a + s + c)}, {ordered(y, rhs, c + b + t)})"
