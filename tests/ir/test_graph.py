"""``kfn.graph()``: the program in TP IIb's graphical notation (Graphviz DOT).

Oracle: the DOT text is parsed here (a strict parser of the statements it may
contain), and its nodes and edges are compared with the program's IR walked
independently: atoms, ``HAtom.gargs``, ``GMatMul.arg/param``, the readout, and
``program.backward.consumers``.
"""
import shutil
import subprocess
import sys

import pytest
from torch import nn

import ntkcompile
from ntkcompile.ir import GBias, GInput, GMatMul, HAtom
from ntkcompile.ir.graph import render
from ntkcompile.ir.printer import atom_label
from helpers.dot import expected_edges, parse_dot
from models import ConvResNet, SharedLinear

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
    assert got == expected_edges(program)
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
