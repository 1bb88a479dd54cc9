"""Codegen: contractions along opt_einsum paths fixed at compile time."""
import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import codegen


def _build(equation, shapes):
    src = codegen.Source()
    names = [f"x{i}" for i in range(len(shapes))]
    out = src.contract(equation, names, shapes)
    fn, text = src.build(f"f({', '.join(names)})", out, "f")
    return fn, text


@pytest.mark.parametrize("equation, shapes", [
    ("ab,bc,cd->ad", [(5, 40), (40, 3), (3, 30)]),          # a chain: the order matters
    ("pab,pbc,pc->pa", [(4, 6, 7), (4, 7, 2), (4, 2)]),
    ("acs,bct->abst", [(3, 5, 4), (2, 5, 4)]),
])
def test_contract_matches_numpy_einsum(equation, shapes):
    fn, text = _build(equation, shapes)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s) for s in shapes]
    got = fn(*[torch.from_numpy(x) for x in xs])
    np.testing.assert_allclose(got.numpy(), np.einsum(equation, *xs), rtol=1e-12, atol=1e-12)
    steps = text.count("torch.einsum(")
    assert steps == len(shapes) - 1                          # one line per pairwise step
    assert f"opt_einsum {equation!r} step {steps}/{steps}" in text


def test_chain_follows_the_cheaper_path():
    # (5x40)(40x3) first costs 600 + 450 multiplies; (40x3)(3x30) first costs 3600 + 6000
    _, text = _build("ab,bc,cd->ad", [(5, 40), (40, 3), (3, 30)])
    first = next(line for line in text.splitlines() if "torch.einsum(" in line)
    assert "x0" in first and "x1" in first and "x2" not in first


def test_contract_shape_count_checked():
    with pytest.raises(ValueError, match="2 operands but 1 shapes"):
        codegen.Source().contract("ab,bc->ac", ["x", "y"], [(2, 2)])


def test_generated_code_contracts_the_inputs():
    """Input covariances (MLP Gram, conv patches) are einsum contractions in kfn.code."""
    mlp = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    assert "torch.einsum('ad,bd->ab'" in mlp.code or "torch.einsum('bd,ad->ab'" in mlp.code
    conv = ntkcompile.compile(nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 1)),
                              input_shape=(2, 4, 4))
    assert "opt_einsum 'acs,bcs->abs'" in conv.code    # aligned positions: flatten readout
