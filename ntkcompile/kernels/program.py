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
  whose ``fn.fused_rule`` is ``("relu" | "step", aa, ab2)`` (``ops/activations.py``).

Where the C path does not apply (no C compiler, another device or dtype, a variance that is
not positive: zero variances are pinned by ``ops.elementwise.pin_zero_variance``), ``run``
takes the torch form: the same calls, in the same order, as the unfused generated code, so
the two paths agree to the last bit for the arithmetic and to a few ulps for the rules
(as the fused rules and their torch forms do).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import expect, fused, spatial

_OPS = {"load": 0, "const": 1, "add": 2, "mul": 3, "angle": 4, "relu": 5, "step": 6, "store": 7}


class Program:
    """A chain of elementwise steps with ``n_leaves`` inputs and the values of the steps
    ``outputs`` as its results; its C form (instructions over registers) is made here once."""

    def __init__(self, steps, n_leaves: int, outputs):
        self.steps, self.n_leaves, self.outputs = tuple(steps), n_leaves, tuple(outputs)
        self.code, self.consts, self.registers = _assemble(self.steps, n_leaves, self.outputs)
        self.shapes_ok: dict = {}
        last = {k: k for k in range(len(self.steps))}
        for k, step in enumerate(self.steps):
            for r in step[1]:
                if not isinstance(r, float) and r[0] == "step":
                    last[r[1]] = k
        self.dies = [[] for _ in self.steps]      # the steps whose value is last read by step k
        for j, k in last.items():
            if j not in self.outputs and k > j:
                self.dies[k].append(j)

    def __repr__(self):
        return f"<fused program: {len(self.steps)} steps, {self.n_leaves} inputs, {len(self.outputs)} outputs>"


def run(prog: Program, like, *leaves):
    """The outputs of ``prog`` (a tuple) for its inputs ``leaves``."""
    out = None
    if _one_shape(prog, tuple(fused.leaf_shape(x) for x in leaves)):
        out = fused.program(prog.code, prog.consts, prog.registers, leaves, len(prog.outputs))
    return out if out is not None else _torch(prog, like, leaves)


def _one_shape(prog, shapes) -> bool:
    """Whether every output of ``prog`` has the shape of all its inputs broadcast together
    (the fused pass computes every step at that shape; an output that torch would leave
    smaller, broadcast later, takes the torch form).  Memoized per input shapes."""
    known = prog.shapes_ok.get(shapes)
    if known is None:
        try:
            full = torch.broadcast_shapes(*shapes)
            own: list = []
            for step in prog.steps:
                own.append(torch.broadcast_shapes(*[() if isinstance(r, float) else
                                                    (shapes[r[1]] if r[0] == "leaf" else own[r[1]])
                                                    for r in step[1]]))
            known = all(own[k] == full for k in prog.outputs)
        except RuntimeError:
            known = False
        prog.shapes_ok[shapes] = known
    return known


def _torch(prog, like, leaves):
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
        else:
            out = expect.cf(step[2], like, *args)
        vals.append(out)
    return tuple(vals[k] for k in prog.outputs)


def fused_rule(fn) -> Optional[tuple]:
    """``("relu" | "step", aa, ab2)`` when the closed form ``fn`` has a fused C form."""
    return getattr(fn, "fused_rule", None)


def _assemble(steps, n_leaves, outputs):
    """Instructions (``fused.c``: ``PROG_WIDTH`` int32s each), constants and the register count.

    Registers are reused once a value is dead: a layer's chain needs a handful of them,
    and they stay in L1.  Constants get their own registers, filled once."""
    consts, const_reg = [0.0], {}
    last: dict = {}
    for k, step in enumerate(steps):
        for ref in step[1]:
            if not isinstance(ref, float):
                last[ref] = k
    for k in outputs:
        last[("step", k)] = max(last.get(("step", k), -1), k)
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
    for k, step in enumerate(steps):
        regs = [reg(r) for r in step[1]]
        dst = alloc()           # not over an operand: a chain's temporaries read them later
        kind = step[0]
        if kind in ("add", "mul"):
            acc = regs[0]
            for i, r in enumerate(regs[1:]):
                out = dst if i == len(regs) - 2 else alloc()
                code.append((_OPS[kind], out, acc, r, 0, 0, 0))
                if i > 0:
                    free.append(acc)
                acc = out
        elif kind == "angle":
            code.append((_OPS["angle"], dst, *regs, 0, 0))
        else:
            rule, aa, ab2 = fused_rule(step[2])
            if (aa, ab2) not in params:
                consts.extend((aa, ab2))
                params[(aa, ab2)] = len(consts) - 2
            k11, k12, k22, theta = regs
            args = (k11, k12, k22, theta) if rule == "relu" else (k11, theta, k22, 0)
            code.append((_OPS[rule], dst, *args, params[(aa, ab2)]))
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
