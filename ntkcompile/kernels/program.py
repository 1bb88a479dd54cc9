"""Chains of elementwise plan steps run as one fused pass (``fused.c``'s programs).

A warm kernel call is mostly chains of elementwise steps over the pair arrays: per layer an
angle, a V-transform, an affine map of it, later the derivative's V-transform and the NTK's
products and sums.  Run as torch ops (or one fused rule at a time) each step reads and
writes whole arrays.  ``codegen`` gathers such chains into a ``Program`` (``render(...,
fuse=True)``, the default path of ``compile()`` on a CPU); ``run`` executes it block by
block in C, so each block's intermediates stay in L1 and only the chain's inputs and its
outputs touch memory.

A program is a list of steps over *refs*: ``("leaf", i)`` (the ``i``-th array passed to
``run``: a pair array, or ``(x, idx)``, a per-input array lifted to the packed pairs
``x[idx]``), ``("step", k)`` (an earlier step's value) or a float constant.  Steps:

* ``("add", terms)``, ``("mul", factors)``: left to right, as the generated torch code;
* ``("angle", (k11, k12, k22))``: ``quadrature.angle``;
* ``("rule", (k11, k12, k22, theta), fn)``: ``expect.cf(fn, like, ...)`` for a closed form
  whose ``fn.fused_rule`` is ``("relu" | "step", aa, ab2)`` (``ops/activations.py``);
* ``("sum", (x,), fn, spatial, e)``: ``spatial.spatial_sum(x, batch, spatial)`` or
  ``spatial.global_mean(x, spatial, batch)`` (``fn``), ``batch`` the ``e``-th of ``run``'s
  ``envs``: a reduction over the trailing position axes, an output that no step reads (its
  value is complete only after the pass).  It adds in blocks, so it rounds apart from
  torch's sum (1e-16 relative), the one step that does.

Where the C path does not apply (no C compiler, another device or dtype, a variance that is
not positive: zero variances are pinned by ``ops.elementwise.pin_zero_variance``), ``run``
takes the torch form: the same calls, in the same order, as the unfused generated code, so
the two paths agree to the last bit for the arithmetic, to a few ulps for the rules (as
the fused rules and their torch forms do) and to rounding for the sums (another order).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import plan
from . import expect, fused, spatial

_OPS = {"load": 0, "const": 1, "add": 2, "mul": 3, "angle": 4, "relu": 5, "step": 6, "store": 7, "angle_cs": 8,
        "relu_cs": 9, "sum": 10}
_REDUCTIONS = (spatial.spatial_sum, spatial.global_mean)


class Program:
    """A chain of elementwise steps with ``n_leaves`` inputs and the values of the steps
    ``outputs`` as its results; its C form (instructions over registers) is made here once."""

    def __init__(self, steps, n_leaves: int, outputs):
        self.steps, self.n_leaves, self.outputs = tuple(steps), n_leaves, tuple(outputs)
        self.code, self.consts, self.registers = _assemble(self.steps, n_leaves, self.outputs)
        self.shapes_ok: dict = {}
        self.dies = [[] for _ in self.steps]      # the steps whose value is last read by step k
        for ref, k in _last_reads(self.steps).items():
            if ref[0] == "step" and ref[1] not in self.outputs:
                self.dies[k].append(ref[1])
        self.sums = {k: group(step) for k, step in enumerate(self.steps) if step[0] == "sum"}
        self.sum_axes = {k: axes(self.steps[k]) for k in self.sums}
        assert all(k in self.outputs and ("step", k) not in _last_reads(self.steps) for k in self.sums)

    def __repr__(self):
        return f"<fused program: {len(self.steps)} steps, {self.n_leaves} inputs, {len(self.outputs)} outputs>"

    def lines(self, leaf_names) -> list:
        """The steps, one per line (``s3 = relu[1, 0](k2, s1, k5, s2)``; ``-> out 0`` marks
        the outputs), with the inputs called ``leaf_names``: what ``kfn.code`` shows."""
        def name(ref):
            if isinstance(ref, float):
                return repr(ref)
            return leaf_names[ref[1]] if ref[0] == "leaf" else f"s{ref[1]}"

        out = []
        for k, step in enumerate(self.steps):
            args = [name(r) for r in step[1]]
            if step[0] in ("add", "mul"):
                text = (" + " if step[0] == "add" else " * ").join(args)
            elif step[0] == "angle":
                text = f"angle({', '.join(args)})"
            elif step[0] == "sum":
                text = f"{step[2].__name__}({args[0]}, {step[3]})"
            else:
                rule, aa, ab2 = fused_rule(step[2])
                text = f"{rule}[{aa + 0.0:g}, {ab2 + 0.0:g}]({', '.join(args)})"     # + 0.0: no -0
            mark = [f"out {i}" for i, o in enumerate(self.outputs) if o == k]
            out.append(f"s{k} = {text}" + (f"  -> {', '.join(mark)}" if mark else ""))
        return out


def run(prog: Program, like, *leaves, envs=()):
    """The outputs of ``prog`` (a tuple) for its inputs ``leaves`` (``envs``: the batch shapes
    its sums read)."""
    out = None
    arrays = [x if isinstance(x, (torch.Tensor, tuple)) else torch.tensor(float(x), dtype=torch.float64)
              for x in leaves]         # a constant a plan computes at run time
    shape = _one_shape(prog, tuple(fused.leaf_shape(x) for x in arrays))
    if isinstance(shape, _Split):
        return shape.run(like, leaves, envs)
    if shape is not None and _sums_fit(prog, shape, envs):
        out = fused.program(prog, arrays, shape)
        for i, k in enumerate(prog.outputs if out is not None else ()):
            if k in prog.sums and prog.steps[k][2] is spatial.global_mean:
                out[i].div_(prog.sums[k])      # the mean, as torch's: the sum divided by the count
    return out if out is not None else _torch(prog, like, leaves, envs)


def group(step) -> int:
    """The entries a sum step adds into each of its outputs."""
    n = math.prod(step[3])
    return n * n if step[2] is spatial.global_mean else n


def axes(step) -> int:
    """The trailing axes a sum step reduces."""
    return len(step[3]) * (2 if step[2] is spatial.global_mean else 1)


def _sums_fit(prog, shape, envs) -> bool:
    """Whether every sum of ``prog`` reduces the trailing axes of ``shape`` to its batch (the
    fused pass reduces entry ``e`` into ``e / group``); not in a band (its own layout)."""
    if not prog.sums:
        return True
    if spatial.bands.active() is not None:
        return False
    for k in prog.sums:
        _, _, fn, sp, e = prog.steps[k]
        if prog.sums[k] >= 2 ** 31:          # (the instruction holds it as an int32)
            return False
        want = tuple(envs[e]) + tuple(sp) * (2 if fn is spatial.global_mean else 1)
        if tuple(shape) != want:
            return False
    return True


def _one_shape(prog, shapes):
    """The shape of all of ``prog``'s inputs broadcast together, if every output has it (the
    fused pass computes every step at that shape).  Else, where steps differ in shape (a
    readout's means beside the position pairs' chains), a ``_Split``: the largest steps run
    fused, the others as their own program.  None if a step's inputs do not broadcast (the
    torch form raises as the unfused code would).  Memoized per input shapes."""
    if shapes in prog.shapes_ok:
        return prog.shapes_ok[shapes]
    try:
        own: list = []
        for step in prog.steps:
            own.append(torch.broadcast_shapes(*[() if isinstance(r, float) else
                                                (shapes[r[1]] if r[0] == "leaf" else own[r[1]])
                                                for r in step[1]]))
    except RuntimeError:
        own = None
    known = None
    if own is not None:
        try:
            full = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            full = None
        if full is not None and all(own[k] == full for k in prog.outputs):
            known = full
        else:
            known = _Split(prog, own, max(own, key=lambda s: (s.numel(), s)))
    prog.shapes_ok[shapes] = known
    return known


class _Split:
    """A program whose steps are not all at its inputs' common shape, as two: the smaller
    steps (``small``: they read only smaller arrays) and then the full-shape ones (``big``),
    which take the small values they read as extra inputs.  Each part is a ``Program`` over
    only the inputs it reads, run as ``run`` runs one, so the full-shape chain stays fused."""

    def __init__(self, prog, own, full):
        steps = prog.steps
        small = [k for k in range(len(steps)) if own[k] != full]     # they read no larger array
        big = [k for k in range(len(steps)) if own[k] == full]
        needed = [k for k in small if k in prog.outputs or any(r == ("step", k) for b in big for r in steps[b][1])]
        big_outputs = [o for o in prog.outputs if o not in small]
        self.small, self.small_leaves = _part(steps, small, needed, {})
        self.big, self.big_leaves = _part(steps, big, big_outputs, {k: i for i, k in enumerate(needed)})
        self.outputs = [("small", needed.index(k)) if k in small else ("big", big_outputs.index(k))
                        for k in prog.outputs]

    def run(self, like, leaves, envs):
        small = run(self.small, like, *[leaves[i] for i in self.small_leaves], envs=envs) if self.small else ()
        big = run(self.big, like, *[leaves[i] if i >= 0 else small[-1 - i] for i in self.big_leaves], envs=envs) \
            if self.big else ()
        parts = {"small": small, "big": big}
        return tuple(parts[part][i] for part, i in self.outputs)


def _part(steps, members, outputs, extra):
    """The steps ``members`` of a program as a ``Program`` of their own, with the leaves it
    reads: indices into the original leaves, or ``-1 - i`` for ``extra``'s ``i``-th value
    (``extra``: step -> index, steps outside ``members`` read as inputs)."""
    if not members:
        return None, []
    at = {k: i for i, k in enumerate(members)}
    leaves: list = []

    def leaf(key):
        if key not in leaves:
            leaves.append(key)
        return ("leaf", leaves.index(key))

    def ref(r):
        if isinstance(r, float):
            return r
        if r[0] == "leaf":
            return leaf(r[1])
        return ("step", at[r[1]]) if r[1] in at else leaf(-1 - extra[r[1]])

    part = [(steps[k][0], tuple(ref(r) for r in steps[k][1]), *steps[k][2:]) for k in members]
    return Program(part, len(leaves), [at[k] for k in outputs]), leaves


def _torch(prog, like, leaves, envs=()):
    """The program as torch ops: what the generated code computes without fusion."""
    inputs = [spatial.gather(*x) if isinstance(x, tuple) else x for x in leaves]
    vals: list = []

    def get(ref):
        if isinstance(ref, float):
            return ref
        return inputs[ref[1]] if ref[0] == "leaf" else vals[ref[1]]

    for k, step in enumerate(prog.steps):
        kind, args = step[0], [get(r) for r in step[1]]
        for j in prog.dies[k]:
            vals[j] = None         # as the generated code's del: memory as without fusion
        if kind in ("add", "mul"):
            out = args[0]
            for a in args[1:]:
                out = out + a if kind == "add" else out * a
        elif kind == "angle":
            out = expect.angle(like, *args)
        elif kind == "sum":
            fn, sp, batch = step[2], step[3], envs[step[4]]
            out = fn(args[0], batch, sp) if fn is spatial.spatial_sum else fn(args[0], sp, batch)
        else:
            out = expect.cf(step[2], like, *args)
        vals.append(out)
    return tuple(vals[k] for k in prog.outputs)


def fused_rule(fn) -> Optional[tuple]:
    """``("relu" | "step", aa, ab2)`` when the closed form ``fn`` has a fused C form."""
    return getattr(fn, "fused_rule", None)


def _last_reads(steps) -> dict:
    """For each leaf and step ref that a step reads, the last step that reads it."""
    return {ref: k for k, step in enumerate(steps) for ref in step[1] if not isinstance(ref, float)}


def _assemble(steps, n_leaves, outputs):
    """Instructions (``fused.c``: ``PROG_WIDTH`` int32s each), constants and the register count.

    Registers are reused once a value is dead: a layer's chain needs a handful of them,
    and they stay in L1.  Constants get their own registers, filled once."""
    consts, const_reg = [0.0], {}
    last = _last_reads(steps)
    for k in outputs:
        last[("step", k)] = max(last.get(("step", k), -1), k)
    shared = {}        # a relu rule at the angle of its own variances: that angle's c and scale
    for k, step in enumerate(steps):
        if step[0] == "rule" and fused_rule(step[2])[0] == "relu":
            theta = step[1][3]
            if not isinstance(theta, float) and theta[0] == "step" and steps[theta[1]][0] == "angle" \
                    and tuple(steps[theta[1]][1]) == tuple(step[1][:3]):
                shared[k] = theta[1]
                last[("c", theta[1])] = last[("s", theta[1])] = k
    code, free, where, count = [], [], {}, [0]
    for step in steps:             # constants first: their registers are filled once, never reused
        for ref in step[1]:
            if isinstance(ref, float) and ref not in const_reg:
                consts.append(ref)
                const_reg[ref] = count[0]
                count[0] += 1
                code.append((_OPS["const"], const_reg[ref], len(consts) - 1, 0, 0, 0, 0))

    def alloc():
        if free:
            return free.pop()
        count[0] += 1
        return count[0] - 1

    def reg(ref):
        if isinstance(ref, float):
            return const_reg[ref]
        if ref not in where:           # a leaf, loaded before its first use
            where[ref] = alloc()
            code.append((_OPS["load"], where[ref], ref[1], 0, 0, 0, 0))
        return where[ref]

    params: dict = {}

    def param(fn):                     # a rule's (aa, ab2), once in the constants
        _, aa, ab2 = fused_rule(fn)
        if (aa, ab2) not in params:
            consts.extend((aa, ab2))
            params[(aa, ab2)] = len(consts) - 2
        return params[(aa, ab2)]

    for k, step in enumerate(steps):
        regs = [reg(r) for r in step[1]]
        kind = step[0]
        if kind == "sum":       # into its output (no register: no step reads it)
            code.extend((_OPS["sum"], i, regs[0], group(step), 0, 0, 0) for i, o in enumerate(outputs) if o == k)
            for r in dict.fromkeys(r for r in step[1] if not isinstance(r, float)):
                if last[r] == k:
                    free.append(where.pop(r))
            continue
        dst = alloc()           # not over an operand: a chain's temporaries read them later
        if kind in ("add", "mul"):      # left to right, up to 5 operands a pass, dst accumulating
            code.append((_OPS[kind], dst, *regs[:5], *[-1] * (5 - len(regs[:5]))))
            for i in range(5, len(regs), 4):
                part = regs[i:i + 4]
                code.append((_OPS[kind], dst, dst, *part, *[-1] * (4 - len(part))))
        elif kind == "angle" and ("c", k) in last:
            where[("c", k)], where[("s", k)] = alloc(), alloc()
            code.append((_OPS["angle_cs"], dst, *regs, where[("c", k)], where[("s", k)]))
        elif kind == "angle":
            code.append((_OPS["angle"], dst, *regs, 0, 0))
        elif k in shared:
            a = shared[k]
            code.append((_OPS["relu_cs"], dst, where[("c", a)], where[("s", a)], regs[3], 0, param(step[2])))
            for r in (("c", a), ("s", a)):
                if last[r] == k:
                    free.append(where.pop(r))
        else:
            rule = fused_rule(step[2])[0]
            k11, k12, k22, theta = regs
            args = (k11, k12, k22, theta) if rule == "relu" else (k11, theta, k22, 0)
            code.append((_OPS[rule], dst, *args, param(step[2])))
        for r in dict.fromkeys(r for r in step[1] if not isinstance(r, float)):
            if last[r] == k:
                free.append(where.pop(r))
        where[("step", k)] = dst
        if k in outputs:
            for i, o in enumerate(outputs):
                if o == k:
                    code.append((_OPS["store"], i, dst, 0, 0, 0, 0))
        if last.get(("step", k), -1) <= k:
            free.append(where.pop(("step", k)))
    return tuple(code), tuple(consts), max(count[0], 1)


# ------------------------------------------------------------------ what codegen fuses


def chains(order, roots, children, self_mode):
    """The plan nodes ``order`` (children first; ``children(n)``: what ``n`` needs computed
    before it) with their chains of fusable steps gathered: a list of nodes and of
    ``(members, outputs)`` pairs, each a chain to compute as one program at that place.

    A chain holds steps of one layout (pair arrays, or one side's per-input arrays: each
    layer's variances), several chains being open at once; it is closed, in place, when a
    step that cannot join it reads it (a stencil, a contraction, a quadrature), or before a
    chain that reads it is closed.  Lifts written inline wait for what reads them.  Chains
    of one step stay plain nodes.  ``outputs``: the members read outside the chain."""
    order = _hoist_sums(_hoist_products(_hoist_step_rules(order, children), children), children)
    domain, users = {}, {}
    for n in order:
        domain[n.uid] = _domain(n, domain)
        for c in children(n):
            users.setdefault(c.uid, set()).add(n.uid)
    for r in roots:
        if isinstance(r, plan.PNode):
            users.setdefault(r.uid, set()).add(-1)
    out, open_, deps = [], {}, {}   # an open chain per layout, in order; chains to close before it
    where: dict = {}                 # uid of a member of an open chain -> its layout
    held: dict = {}                  # lifts (written inline): uid -> (node, layouts of open chains read)

    def reads(n):
        found, lifts = set(), []
        for c in children(n):
            if c.uid in where:
                found.add(where[c.uid])
            elif c.uid in held:
                found |= held[c.uid][1]
                lifts.append(c)
        return found, lifts

    def release(lifts):
        for c in lifts:
            if c.uid in held:
                out.append(held.pop(c.uid)[0])

    def close(d):
        if d not in open_:
            return
        for e in deps.pop(d, ()):
            close(e)
        cur = open_.pop(d)
        inside = {m.uid for m in cur}
        for m in cur:
            del where[m.uid]
            release(reads(m)[1])
        if len(cur) > 1:
            out.append((cur, [m for m in cur if users.get(m.uid, set()) - inside]))
        else:
            out.extend(cur)

    def before(d, e) -> bool:          # whether chain e must close before chain d already
        todo, seen = [d], set()
        while todo:
            x = todo.pop()
            if x == e:
                return True
            if x not in seen:
                seen.add(x)
                todo.extend(deps.get(x, ()))
        return False

    for n in order:
        d = domain[n.uid]
        found, lifts = reads(n)
        if isinstance(n, (plan.Lift, plan.LiftAll)) and not (self_mode and n.k == 0):
            held[n.uid] = (n, found)   # inline views: what reads them waits for their chains
            continue
        if d not in (None, "mixed") and _fusable(n):
            for c in children(n):
                if c.uid in where and reduction(c):
                    close(where[c.uid])        # a sum is complete only after its chain's pass
            found, lifts = reads(n)
            for e in found - {d}:
                if before(e, d):       # e waits for d: d's chain so far goes first
                    close(d)
                deps.setdefault(d, set()).add(e)
            open_.setdefault(d, []).append(n)
            where[n.uid] = d
            continue
        for e in found:
            close(e)                   # n reads it: it is computed first
        release(lifts)
        out.append(n)
    for d in list(open_):
        close(d)
    out.extend(node for node, _ in held.values())
    return out


def _hoist_step_rules(order, children):
    """``order`` with each step-family rule (a derivative's V-transform: it reads the angle and
    the variances only) moved to just after the latest thing it reads.  The backward pass
    reads it much later; computed there, it reloads the angle and both variances from memory
    and stores its value, while beside its angle it joins the forward chain, whose angle
    then need not be stored (its value takes the angle's place in memory)."""
    at, data, _ = _positions(order, children)
    after: dict = {}
    for n in order:
        if isinstance(n, plan.Call) and n.fn is expect.cf and _fusable(n) and fused_rule(n.args[0].obj)[0] == "step":
            last = max((at[c.uid] for c in data(n)), default=None)     # (constants are written inline)
            if last is not None and last < at[n.uid]:
                after.setdefault(last, []).append(n)
    return _moved(order, after)


def _positions(order, children):
    """For the hoists: each node's position in ``order``, ``data(n)`` (what ``n`` reads there,
    constants aside) and the nodes reading each node."""
    at = {n.uid: i for i, n in enumerate(order)}
    data = lambda n: [c for c in children(n) if c.uid in at and not isinstance(c, (plan.Env, plan.Static))]  # noqa: E731
    users: dict = {}
    for n in order:
        for c in data(n):
            users.setdefault(c.uid, set()).add(n.uid)
    return at, data, users


def _moved(order, after):
    """``order`` with the nodes ``after[i]`` taken from their places to just after position ``i``."""
    if not after:
        return order
    moved = {n.uid for ns in after.values() for n in ns}
    out = []
    for i, n in enumerate(order):
        if n.uid not in moved:
            out.append(n)
        out.extend(after.get(i, ()))
    return out


def _hoist_products(order, children):
    """``order`` with each fusable product moved to just after the fusable step it reads
    last, with those of its other factors that come later but read only what comes before
    (a readout's backward seed ``mean_seeds``, a constant).  The backward's first product,
    ``step * seed``, then joins the last layer's forward chain, which stores the product
    instead of the step (one pass over the pair arrays fewer)."""
    at, data, users = _positions(order, children)
    after: dict = {}
    moved: set = set()
    for n in order:
        if not (isinstance(n, plan.Mul) and _fusable(n)):
            continue
        late = [c for c in data(n) if c.uid not in moved and _fusable(c)]
        last = max((at[c.uid] for c in late), default=None)
        if last is None or last + 1 >= at[n.uid] or len(users[order[last].uid]) != 1:
            continue                   # (a step read elsewhere too would be stored beside the product)
        carried = [c for c in data(n) if at[c.uid] > last]
        if any(c.uid in moved or any(at[g.uid] > last for g in data(c)) for c in carried):
            continue
        after.setdefault(last, []).extend(carried + [n])
        moved |= {c.uid for c in carried} | {n.uid}
    return _moved(order, after)


def _hoist_sums(order, children):
    """``order`` with each fusable sum over positions moved, with the steps that compute its
    argument and nothing else, to just after the fusable step it reads last: a term of the
    NTK (``sum_st P_l(s, t) C_l(s, t)``, split from the others by ``codegen._split_sums``) is
    then summed in the pass that computes its factor ``P_l`` or reads its ``C_l``, and
    neither is kept for a final pass over all terms."""
    at, data, users = _positions(order, children)
    after: dict = {}
    moved: set = set()
    for n in order:
        if not reduction(n) or n.uid in moved:
            continue
        sub, todo = {}, [n.args[0]]            # the argument's own steps: fusable, read only here
        while todo:
            m = todo.pop()
            if isinstance(m, plan.PNode) and m.uid in at and m.uid not in sub and m.uid not in moved \
                    and _fusable(m) and not reduction(m):
                sub[m.uid] = m
                todo.extend(data(m))
        while True:                            # drop steps also read outside (they stay put)
            outside = [u for u, m in sub.items() if users.get(u, set()) - set(sub) - {n.uid}]
            if not outside:
                break
            for u in outside:
                del sub[u]
            keep = {}                          # and what only they reached
            todo = [n.args[0]]
            while todo:
                m = todo.pop()
                if isinstance(m, plan.PNode) and m.uid in sub and m.uid not in keep:
                    keep[m.uid] = sub[m.uid]
                    todo.extend(data(m))
            sub = keep
        group = set(sub) | {n.uid}
        external = [c for u in group for c in data(sub.get(u, n)) if c.uid not in group]
        last = max((at[c.uid] for c in external), default=None)
        if last is None or last + 1 >= at[n.uid] or not _fusable(order[last]) or reduction(order[last]):
            continue
        members = sorted(sub.values(), key=lambda m: at[m.uid]) + [n]
        after.setdefault(last, []).extend(members)
        moved |= group
    return _moved(order, after)


def _domain(n, known):
    """The layout of ``n``'s array: ``"pair"`` (pairs of inputs), ``("input", side)`` (one
    side's inputs), ``"mixed"`` (both sides' inputs: a Gram matrix), None (constants)."""
    if isinstance(n, (plan.Lift, plan.LiftAll, plan.ToPairs, plan.SetDiagonal)):
        return "pair"
    if isinstance(n, plan.Input):
        return ("input", n.side)
    if isinstance(n, (plan.Fn, plan.Loop, plan.LoopOut, plan.Slot, plan.LoopVar)):
        return "mixed"
    found = {known.get(c.uid) for c in n.children()} - {None}
    if "pair" in found:
        return "pair"
    return found.pop() if len(found) == 1 else ("mixed" if found else None)


def _fusable(n) -> bool:
    """Whether a plan step can join a fused program."""
    operand = lambda v: isinstance(v, (plan.PNode, float)) and not isinstance(v, (plan.Env, plan.Static))  # noqa: E731
    if isinstance(n, plan.Add):
        return all(map(operand, n.terms))
    if isinstance(n, plan.Mul):
        return all(map(operand, n.factors))
    if isinstance(n, plan.Call) and n.fn is expect.angle:
        return len(n.args) == 4 and all(map(operand, n.args[1:]))
    if isinstance(n, plan.Call) and n.fn is expect.cf:
        return (len(n.args) == 6 and isinstance(n.args[0], plan.Static) and fused_rule(n.args[0].obj) is not None
                and all(map(operand, n.args[2:])))
    if isinstance(n, plan.Call) and n.fn in _REDUCTIONS:
        if len(n.args) != 3:
            return False
        x, batch, sp = reduction_args(n)
        return isinstance(x, plan.PNode) and operand(x) and isinstance(batch, plan.Env) and isinstance(sp, tuple)
    return False


def reduction_args(n) -> tuple:
    """``(x, batch, spatial)`` of a ``spatial_sum(x, batch, spatial)`` or
    ``global_mean(x, spatial, batch)`` call (the two take them in different orders)."""
    x, a, b = n.args
    return (x, a, b) if n.fn is spatial.spatial_sum else (x, b, a)


def reduction(n) -> bool:
    """Whether ``n`` is a sum a program can compute (its value is complete after the pass)."""
    return isinstance(n, plan.Call) and n.fn in _REDUCTIONS and _fusable(n)
