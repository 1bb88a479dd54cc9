"""Codegen: plans rendered as Python source; contractions along opt_einsum paths fixed at compile time."""
import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import codegen
from ntkcompile import plan as P


def _contraction(equation, shapes):
    plan = P.Plan()
    operands = tuple(plan.make(P.Input, 1, i) for i in range(len(shapes)))
    fn, text = codegen.function([plan.make(P.Contract, equation, operands, tuple(shapes))])
    return (lambda *xs: fn(tuple(xs))[0]), text


@pytest.mark.parametrize("equation, shapes", [
    ("ab,bc,cd->ad", [(5, 40), (40, 3), (3, 30)]),          # a chain: the order matters
    ("pab,pbc,pc->pa", [(4, 6, 7), (4, 7, 2), (4, 2)]),
    ("acs,bct->abst", [(3, 5, 4), (2, 5, 4)]),
])
def test_contract_matches_numpy_einsum(equation, shapes):
    fn, text = _contraction(equation, shapes)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s) for s in shapes]
    got = fn(*[torch.from_numpy(x) for x in xs])
    np.testing.assert_allclose(got.numpy(), np.einsum(equation, *xs), rtol=1e-12, atol=1e-12)
    steps = text.count("torch.einsum(")
    assert steps == len(shapes) - 1                          # one line per pairwise step
    assert f"opt_einsum {equation!r} step {steps}/{steps}" in text


@pytest.mark.parametrize("equation, shapes, matmul", [
    ("acs,bct->abst", [(3, 5, 9), (2, 5, 9)], True),       # a conv input layer's Gram over position pairs
    ("bct,acs->abst", [(2, 5, 9), (3, 5, 9)], True),       # its operands either way round
    ("sca,tbc->abst", [(9, 5, 3), (9, 2, 5)], True),       # their axes in any order
    ("acs,bct->abst", [(3, 12, 9), (2, 12, 9)], False),    # more patch entries than positions: einsum
])
def test_a_gram_over_position_pairs_is_written_in_its_own_order(equation, shapes, matmul):
    """The programs that read it walk it row by row: ``spatial.pair_gram`` (one GEMM) writes
    it in the order ``(a, b, s, t)`` (torch.einsum returns a permuted view of ``(b, t, a, s)``)."""
    fn, text = _contraction(equation, shapes)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(s) for s in shapes]
    got = fn(*[torch.from_numpy(x) for x in xs])
    np.testing.assert_allclose(got.numpy(), np.einsum(equation, *xs), rtol=1e-12, atol=1e-12)
    assert ("pair_gram(" in text) == matmul and ("torch.einsum(" in text) != matmul
    if matmul:
        assert got.is_contiguous()


def test_chain_follows_the_cheaper_path():
    # (5x40)(40x3) first costs 600 + 450 multiplies; (40x3)(3x30) first costs 3600 + 6000
    _, text = _contraction("ab,bc,cd->ad", [(5, 40), (40, 3), (3, 30)])
    first = next(line for line in text.splitlines() if "torch.einsum(" in line)
    assert "F1[0]" in first and "F1[1]" in first and "F1[2]" not in first


def test_generated_code_contracts_the_inputs():
    """Input covariances (MLP Gram, conv patches) are einsum contractions in kfn.code."""
    mlp = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    assert "torch.einsum('ad,bd->ab'" in mlp.code or "torch.einsum('bd,ad->ab'" in mlp.code
    conv = ntkcompile.compile(nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 1)),
                              input_shape=(2, 4, 4))
    assert "opt_einsum 'acs,bcs->abs'" in conv.code    # aligned positions: flatten readout


def test_arithmetic_keeps_its_grouping_and_constants():
    """``Mul``/``Add`` render left to right with their grouping; non-finite constants stay valid
    Python; a value used once is written inline, one used twice gets a name."""
    plan = P.Plan()
    a, b, c = (plan.make(P.Input, 1, i) for i in range(3))
    inner = plan.add([plan.mul(2.0, a), b])               # 2a + b, used twice
    prod = plan.make(P.Mul, (c, plan.make(P.Mul, (a, b))))  # c * (a * b): not ((c * a) * b)
    fn, text = codegen.function([plan.mul(inner, inner), plan.add([prod, float("inf")])])
    xs = tuple(torch.tensor([v], dtype=torch.float64) for v in (1e308, 3.0, 1e-308))
    first, second = fn(xs)
    assert torch.isinf(first).all()                        # (2a + b)^2 overflows, as written
    assert float(second) == float("inf")
    assert "c" not in text.split("=")[0] and "float('inf')" in text
    assert text.count(" = 2.0 * F1[0] + F1[1]") == 1       # the shared sum has a name
    assert "F1[2] * (F1[0] * F1[1])" in text


def test_a_loop_carries_values_and_hoists_what_does_not_change():
    """``Loop``: the arc-cosine recursion of a deep ReLU net (NNGP on the diagonal, unit
    variance in, W_std^2 = 2): q_{l+1} = 2 * E relu(z)^2 = q_l, with one value carried."""
    plan = P.Plan()
    lid = plan.new_loop_id()
    q = plan.make(P.LoopVar, lid, 0)
    scale = plan.mul(2.0, plan.make(P.Input, 1, 1))        # loop-invariant: computed once, before
    step = plan.mul(scale, 0.5, q)                          # E relu(z)^2 = q / 2
    loop = plan.make(P.Loop, lid, 50, (plan.make(P.Input, 1, 0),), (step,))
    fn, text = codegen.function([plan.make(P.LoopOut, loop, 0)])
    q0, s = torch.tensor([1.3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    (out,) = fn((q0, s))
    torch.testing.assert_close(out, q0, rtol=1e-15, atol=0)
    (out,) = fn((q0, 1.01 * s))
    torch.testing.assert_close(out, q0 * 1.01 ** 50, rtol=1e-13, atol=0)
    lines = text.splitlines()
    loop_at = next(i for i, ln in enumerate(lines) if ln.strip().startswith("for "))
    assert any("2.0 * F1[1]" in ln for ln in lines[:loop_at])    # hoisted
    assert len(lines) < 15


def test_the_live_set_counts_what_a_value_holds():
    """``_free_dead``'s largest live set, counted by hand: a value that holds several pair arrays
    (``weights``: a family of N-D expectations' results) counts as that many while alive."""
    statements = [(["k1 = f()"], "k1"), (["k2 = g()"], "k2"), (["k3 = h(k1)"], "k3"), (["k4 = u(k2, k3)"], "k4")]
    lines, most = codegen._free_dead(statements, "k4")
    assert most == 3 and "del k1" in lines and "del k2, k3" in lines     # k1, k2, k3 alive at k3
    _, most = codegen._free_dead(statements, "k4", {"k1": 5})
    assert most == 7                                                      # 5 + k2 + k3
    _, most = codegen._free_dead(statements, "k4", {"k2": 5})
    assert most == 7                                                      # k1 + 5 + k3; then 5 + k3 + k4
    _, most = codegen._free_dead(statements, "k4", {"k4": 9})
    assert most == 11                                                     # k2, k3 die after k4 is made
