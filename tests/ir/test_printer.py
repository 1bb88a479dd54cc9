"""``print(kfn.program)`` reads like the paper: the user's names, a backward pass one can follow.

Oracle: the program's own IR (atoms, consumers), walked here independently of the printer.
"""
import re

import torch
from torch import nn

import ntkcompile
from ntkcompile.ir import GMatMul
from ntkcompile.ir.printer import atom_label


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.relu(self.b(h))
        return self.o(h)


def test_forward_lines_name_the_users_modules_and_source_lines():
    seq = ntkcompile.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    text = seq.program
    assert "from 0 (Linear)" in text and "from 1 (ReLU)" in text
    assert "<-" not in text and "_1" not in text            # no internal fx node names
    text = ntkcompile.compile(Net(), b_std=0.1).program
    assert re.search(r"= tanh\(\[g\d+ \+ g\d+\]\).*from test_printer\.py:\d+  h = torch\.tanh\(self\.a\(x\)\)", text)
    assert re.search(r"W\[b\] \(h\d+\).*from b \(Linear\)", text)


def test_exported_programs_print_the_same_module_names():
    ep = torch.export.export(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), (torch.randn(2, 4),))
    text = ntkcompile.compile(ep).program
    assert "from 0 (Linear)" in text and "from 1 (ReLU)" in text


def test_backward_lists_every_g_var_from_the_readout_back():
    kfn = ntkcompile.compile(Net(), W_std=1.2, b_std=0.1)
    program = kfn._program
    text = kfn.program
    section = text.split("backward (")[1].split("\n\n")[0]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("dg")]
    consumers = program.backward.consumers
    assert [ln.split(" = ")[0] for ln in lines] == \
        ["d" + atom_label(g) for g in sorted(consumers, key=lambda a: a.uid, reverse=True)]
    for ln in lines:
        g = next(a for a in consumers if "d" + atom_label(a) == ln.split(" = ")[0])
        for u in consumers[g]:
            src = "v[o]" if not isinstance(u, GMatMul) else f"W[{u.param.name}]^T d{atom_label(u)}"
            assert src in ln, (ln, src)
    # derivatives written out, not as h-labels: dg of the input layer reads tanh'(...) * W[b]^T dg..
    assert re.search(r"= tanh'\(g\d+ \+ g\d+\) \* W\[b\]\^T dg\d+", section)
    assert "Gradient independence" in section


def test_a_cnn_program_before_the_first_call():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 1))
    assert "conv*" in ntkcompile.compile(cnn, input_shape=(3, 4, 4)).program
    lazy = ntkcompile.compile(cnn).program
    assert "input_shape=(3, 32, 32)" in lazy and "ntkcompile show" in lazy and "kfn(x)" in lazy
