"""Dead-node elimination: the forward program keeps what the readout uses, then freezes.

Lowering interns every intermediate canonical form it builds (a sum before its
last term was added, a branch the model computes and drops); only the nodes the
readout reaches (and the constant vector ``ONE``) are part of the program.  The
node objects and their uids are kept, so canonical orders do not change.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import walk
from ..ir.builder import Builder


def prune(program):
    b = program.builder
    keep = walk.postorder([program.readout.vec, b.ONE])
    live = {id(n) for n in keep}
    out = Builder.__new__(Builder)
    out.parent, out.frozen, out._end, out.ONE = None, False, b._end, b.ONE
    out._table = {k: n for k, n in b._table.items() if id(n) in live}
    out._ids = {id(n) for n in out._table.values()}
    out.nodes = [n for n in b.nodes if id(n) in live]
    used = {id(getattr(n, "param", None)) for n in out.nodes}
    out.params = [p for p in b.params if id(p) in used]
    names = {k: v for k, v in program.names.items() if id(k) in live}
    return replace(program, builder=out.freeze(), names=names)
