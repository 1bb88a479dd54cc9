"""``kfn.graph()``: the program in TP IIb's graphical notation (Graphviz DOT).

Oracle: the DOT text is parsed here (a strict parser of the statements it may
contain), and its nodes and edges are compared with the program's IR walked
independently: atoms, ``HAtom.gargs``, ``GMatMul.arg/param``, the readout, and
``program.backward.consumers``.
"""
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile.ir import GBias, GInput, GMatMul, HAtom
from ntkcompile.ir.graph import render
from ntkcompile.ir.printer import atom_label
from models import ConvResNet, SharedLinear

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


def _expected(program):
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


def test_dot_of_a_model_with_weight_sharing_matches_the_program(tmp_path):
    kfn = ntkcompile.compile(SharedLinear(5, 8), W_std=1.5, b_std=0.1)
    program = kfn._program
    text = kfn.graph(tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == text
    nodes, edges, clusters = parse_dot(text)
    atoms = {atom_label(a) for a in program.nodes if isinstance(a, (GInput, GMatMul, GBias, HAtom))
             and a is not program.ONE}
    grads = {"d" + atom_label(g) for g in program.backward.consumers}
    assert set(nodes) == atoms | grads | {"x0", "f", "df"}
    got = {(s, d, a["class"], a.get("label", "").split("\\n")[0]) for s, d, a in edges}
    assert got == _expected(program)
    # weight sharing: matrix b is one label (and one colour) on two forward edges, and b^T reads
    # both of its uses' gradients back to the G-vars each use read (two each)
    shared = [a for s, d, a in edges if a["class"] == "matrix" and a["label"] == "b"]
    assert len(shared) == 2 and len({a["color"] for a in shared}) == 1
    assert sum(a["class"] == "adjoint" and a["label"].startswith("b^T") for _, _, a in edges) == 4
    assert clusters[:2] == ["forward program", "backward program (W^T: independent copies, GIA)"]


def test_repeated_layers_collapse_into_one_cluster_with_a_count():
    depth = 12
    layers = [nn.Linear(6, 16), nn.ReLU()] + [m for _ in range(depth) for m in (nn.Linear(16, 16), nn.ReLU())]
    kfn = ntkcompile.compile(nn.Sequential(*layers, nn.Linear(16, 1)), W_std=1.4, b_std=0.1)
    nodes, edges, clusters = parse_dot(kfn.graph())
    assert f"x {depth} (repeated block)" in clusters
    assert len(nodes) < 20                                    # 3 * 14 atoms, drawn as one block
    # the block's matrices are summarised on the edge back into it: "4 ... 24 (11)"
    back = [a["label"] for s, d, a in edges if a["class"] == "matrix" and "..." in a["label"]]
    assert back == [f"4 ... {2 * depth} ({depth - 1})"]


def test_a_resnet_block_draws_sums_and_convolutions():
    kfn = ntkcompile.compile(ConvResNet(3, 8), W_std=1.4, b_std=0.1, input_shape=(3, 6, 6))
    nodes, edges, _ = parse_dot(kfn.graph())
    labels = {a.get("label") for _, _, a in edges if a["class"] == "matrix"}
    assert labels == {"stem", "down", "block"}
    assert any(a["label"].startswith("v[out] (mean over positions)") for _, _, a in edges if a["class"] == "readout")
    # the residual stream h + block(relu(h)): the last relu joins four G-vars (two convs, two biases)
    joins = [d for _, d, a in edges if a["class"] == "join"]
    assert max(joins.count(d) for d in joins) == 4


def test_render_without_graphviz_writes_the_dot_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "graphviz", None)
    text = ntkcompile.compile(SharedLinear(5, 8)).graph()
    with pytest.warns(RuntimeWarning, match=r"dot -Tsvg .*g\.dot -o .*g\.svg"):
        written = render(text, tmp_path / "g.svg")
    assert written == str(tmp_path / "g.dot") and (tmp_path / "g.dot").read_text() == text
    assert not (tmp_path / "g.svg").exists()


def test_the_dot_program_accepts_the_text_where_it_is_installed(tmp_path):
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("Graphviz's dot is not installed (the parser above checks the syntax)")
    kfn = ntkcompile.compile(ConvResNet(3, 8), input_shape=(3, 6, 6))
    subprocess.run([dot, "-Tcanon"], input=kfn.graph().encode(), check=True, capture_output=True)
    kfn.graph(tmp_path / "g.svg")
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")


def test_graph_before_the_input_shape_is_known_says_how_to_get_it():
    with pytest.raises(ValueError, match="input_shape"):
        ntkcompile.compile(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 1))).graph()
