"""A strict parser of the DOT text ``kfn.graph()`` writes, and the edges TP IIb's notation
prescribes for a program, read off its IR (the oracle of tests/ir/test_graph.py and tests/test_cli.py)."""
import re

from ntkcompile.ir import GInput, GMatMul, HAtom
from ntkcompile.ir.printer import atom_label

_ID = r'"((?:[^"\\]|\\.)*)"'
_ATTRS = r"\[(.*)\];"


def parse_dot(text):
    """``(nodes {id: attrs}, edges [(src, dst, attrs)], clusters [label])``; fails on anything else."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    assert re.fullmatch(r"digraph " + _ID + r" \{", lines[0]) and lines[-1] == "}", (lines[0], lines[-1])
    nodes, edges, clusters, depth = {}, [], [], 1
    for ln in lines[1:-1]:
        if m := re.fullmatch(_ID + " -> " + _ID + " " + _ATTRS, ln):
            edges.append((m[1], m[2], _attrs(m[3])))
        elif m := re.fullmatch(_ID + " " + _ATTRS, ln):
            assert m[1] not in nodes, f"node {m[1]} declared twice"
            nodes[m[1]] = _attrs(m[2])
        elif m := re.fullmatch(r"subgraph (cluster_\w+) \{", ln):
            depth += 1
        elif ln == "}":
            depth -= 1
        elif m := re.fullmatch(r"label=" + _ID + r";.*", ln):
            clusters.append(m[1])
        elif not re.fullmatch(r"(rankdir|node|edge)\b.*;", ln):
            raise AssertionError(f"unexpected DOT statement: {ln}")
        assert depth >= 1
    assert depth == 1, "unbalanced braces"
    for src, dst, _ in edges:
        assert src in nodes and dst in nodes, (src, dst)
    return nodes, edges, clusters


def _attrs(text):
    out = {}
    for m in re.finditer(r"(\w+)=(" + _ID + r"|[^,\s]+)", text):
        out[m[1]] = m[3] if m[3] is not None else m[2]
    return out


def expected_edges(program):
    """The edges the notation prescribes, from the IR: (src, dst, class, label prefix)."""
    want = set()
    for a in program.nodes:
        if isinstance(a, GInput):
            want.add((f"x{a.fixed}", atom_label(a), "matrix", a.param.name))
        elif isinstance(a, GMatMul):
            (_, var), = a.arg.pieces
            (_, src), = var.terms
            want.add((atom_label(src), atom_label(a), "matrix", a.param.name))
        elif isinstance(a, HAtom) and a.gargs:
            for g in a.gargs:
                want |= {(atom_label(b), atom_label(a), "join", "") for _, b in g.terms}
    (_, var), = program.readout.vec.pieces
    (_, last), = var.terms
    want.add((atom_label(last), "f", "readout", f"v[{program.readout.name}]"))
    for g, users in program.backward.consumers.items():
        for u in users:
            src = "df" if u == "readout" else "d" + atom_label(u)
            label = f"v[{program.readout.name}]" if u == "readout" else f"{u.param.name}^T"
            want.add((src, "d" + atom_label(g), "adjoint", label))
    return want
