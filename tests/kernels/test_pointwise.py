"""The fused quasi-Monte Carlo of the N-D evaluator (``kernels.pointwise``, ``sampling.c``).

Oracle: the torch form of the same integrand (the lambda the generated code passes, here
written by hand with torch's own functions) on the same points, through
``qmc.expect_blocks``; the fused pass must give the same means to rounding (only the sums
over points add in another order).
"""
import types

import pytest
import torch
import torch.nn.functional as F

from ntkcompile.ir import nodes as irn
from ntkcompile.kernels import fused, native, pointwise, qmc
from ntkcompile.kernels import piecewise as pw

F64 = torch.float64
pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused path does not exist here")


_MODE = {}


def _fn(piecewise):
    return types.SimpleNamespace(piecewise=piecewise)


RELU, STEP = _fn(pw.relu()), _fn(pw.step())
LEAKY = _fn(pw.Piecewise((0.0,), ((0.0, 0.1), (0.0, 1.0))))
HARDTANH = _fn(pw.hardtanh(-0.5, 1.5))
SQUARED = _fn(pw.Piecewise((0.0,), ((0.0,), (0.0, 0.0, 1.0))))      # relu(x)^2
ONE, HALF = irn.SConst(1.0), irn.SConst(0.5)


def _lin(*terms):
    return irn.ELin(tuple((irn.SConst(c) if isinstance(c, float) else c, e) for c, e in terms))


def _chain(o):
    """relu(z_o + relu(1.5 z_{o+1} + relu(z_{o+2}) - 0.25)) over slots o, o+1, o+2."""
    s = [irn.ESlot(j) for j in range(3)]
    inner = irn.ECall(RELU, s[2])
    mid = irn.ECall(RELU, _lin((1.5, s[1]), (ONE, inner), (-0.25, irn.EConst(1.0))))
    return irn.ECall(RELU, _lin((ONE, s[0]), (ONE, mid))), (lambda z: torch.relu(
        1.0 * z[..., o] + 1.0 * torch.relu(1.5 * z[..., o + 1] + 1.0 * torch.relu(z[..., o + 2]) + -0.25 * 1.0)))


def _entries(batch, seed, blocks=3):
    """A residual chain's slot covariance on a pair (as ``test_qmc``): slots ``i`` and
    ``i + blocks`` (its two sides) covary, other pairs are the constant 0.0."""
    g = torch.Generator().manual_seed(seed)
    e = [[0.0] * (2 * blocks) for _ in range(2 * blocks)]
    for i in range(blocks):
        a, c = torch.rand(batch, generator=g, dtype=F64) + 0.5, torch.rand(batch, generator=g, dtype=F64) + 0.5
        r = torch.rand(batch, generator=g, dtype=F64) * 1.8 - 0.9
        e[i][i], e[i + blocks][i + blocks] = a, c
        e[i][i + blocks] = e[i + blocks][i] = r * (a * c).sqrt()
    return e


@pytest.fixture(params=["compiled", "interpreted"])
def way(request, monkeypatch):
    """A test on both fused paths: the program compiled to C (``native``) and interpreted by
    ``sampling.c``."""
    if request.param == "interpreted":
        monkeypatch.setattr(native, "body", lambda program: None)
    else:
        assert native.status().startswith("compiled for calls of")
        monkeypatch.setattr(native, "WORTH", 0)           # these small calls too
    _MODE["way"] = request.param
    return request.param


def _both(f, program, entries, samples, positions=0, stream=0):
    b, d, groups, _ = qmc.prepare(entries, torch.zeros((), dtype=F64))
    calls = []
    real = qmc._fused

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    bodies = []
    real_body = native.body

    def body_spy(p):
        bodies.append(real_body(p))
        return bodies[-1]

    qmc._fused, native.body = spy, body_spy
    try:
        got = qmc.expect_blocks(f, b, d, groups, samples, 3, positions, stream, program)
    finally:
        qmc._fused, native.body = real, real_body
    assert calls == [True]                        # the fused pass ran, compiled or interpreted
    assert any(x is not None for x in bodies) == (_MODE["way"] == "compiled")
    want = qmc.expect_blocks(f, b, d, groups, samples, 3, positions, stream)
    return got, want


def _close(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=1e-8, atol=1e-15)      # a difference of sums
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("samples", [256, 300])          # a whole number of blocks, and a tail
def test_a_residual_chain_matches_its_torch_form(samples, way):
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    program = pointwise.build([(ea, 0), (eb, 3)], 6, pair=False)
    entries = _entries((5, 4, 4), seed=1)
    _close(*_both(lambda z: fa(z) * fb(z), program, entries, samples, positions=2, stream=2))


def test_pair_moments_match_their_torch_form(way):
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    program = pointwise.build([(ea, 0), (eb, 3)], 6, pair=True)

    def moments(z):
        a, b = fa(z), fb(z)
        return a * b, a * a, b * b

    _close(*_both(moments, program, _entries(64, seed=2), 256, positions=1, stream=5))


@pytest.mark.parametrize("name", ["step", "leaky", "hardtanh", "squared", "gaussian"])
def test_other_piecewise_functions_and_factors(name, way):
    """Each piecewise family (constant pieces, a slope on both sides, two breaks, degree 2) and
    a bare G-var factor, times a derivative-style factor on another slot."""
    s0, s1 = irn.ESlot(0), irn.ESlot(1)
    fn, torch_fn = {"step": (STEP, lambda x: (x > 0).to(x.dtype)), "leaky": (LEAKY, lambda x: F.leaky_relu(x, 0.1)),
                    "hardtanh": (HARDTANH, lambda x: F.hardtanh(x, -0.5, 1.5)),
                    "squared": (SQUARED, lambda x: torch.relu(x) ** 2),
                    "gaussian": (None, None)}[name]
    if fn:
        side = irn.EMul((irn.ECall(STEP, s1), irn.ECall(fn, _lin((0.5, s0), (HALF, s1)))))
        parts = [(side, 0), (irn.ECall(STEP, s1), 2)]
    else:
        parts = [(None, 0), (irn.ECall(RELU, s1), 2)]
    program = pointwise.build(parts, 4, pair=False)
    entries = _entries(32, seed=3, blocks=2)
    if fn:
        def f(z):
            return ((z[..., 1] > 0).to(F64) * torch_fn(0.5 * z[..., 0] + 0.5 * z[..., 1])) * (z[..., 3] > 0).to(F64)
    else:
        def f(z):
            return z[..., 0] * torch.relu(z[..., 3])
    _close(*_both(f, program, entries, 512))


def test_what_has_no_program_takes_the_torch_form():
    tanh = types.SimpleNamespace(piecewise=None)
    assert pointwise.build([(irn.ECall(tanh, irn.ESlot(0)), 0)], 1, pair=False) is None
    coef = object.__new__(irn.SMoment)                           # a coefficient that is not a constant
    assert pointwise.build([(irn.ECall(RELU, irn.ELin(((coef, irn.ESlot(0)),))), 0)], 1, pair=False) is None


def test_registers_are_reused():
    """A long chain needs a few registers, not one per step."""
    e = irn.ESlot(0)
    for _ in range(40):
        e = irn.ECall(RELU, _lin((ONE, irn.ESlot(1)), (0.5, e)))
    program = pointwise.build([(e, 0)], 2, pair=False)
    assert len(program.code) > 80 and program.registers <= 6, program.registers


def test_a_resnet_v1_kernel_is_the_same_on_both_paths(monkeypatch, way):
    """End to end: a post-activation ResNet's kernels with the fused sampler and with the torch
    form of every integrand (same points) agree to rounding."""
    import ntkcompile
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.b(torch.relu(self.a(h))))
            h = torch.relu(0.5 * h + self.b(torch.relu(self.a(h))) - 0.25)   # the same weights again
            return self.out(h.mean(dim=(2, 3)))

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    kfn = ntkcompile.compile(Block(), mc_samples=512, mc_replicates=2)
    runs, families = [], []
    real, real_family = qmc._fused, qmc.expect_family
    monkeypatch.setattr(qmc, "_fused", lambda *a: runs.append(1) or real(*a))
    monkeypatch.setattr(qmc, "expect_family", lambda *a: families.append(real_family(*a)) or families[-1])
    fast = kfn(x, progress=False)
    assert runs and "pw_" in kfn.code and "fam_" in kfn.code
    # compiled, the expectations over one covariance ran as families of several; interpreted
    # (one standard error a pass) only families of one did, the others' members alone
    ran = [len(f) for f in families if f is not None]
    assert max(ran) >= 3 if way == "compiled" else set(ran) == {1}, ran
    # the tiles' memory estimate counts every array a family's results hold while they live
    fn = kfn._function(True, True)[0]
    held = [f.outputs + len(f.members) for name, f in fn.__globals__.items() if name.startswith("fam_")]
    assert max(held) >= 9 and fn.live_arrays > max(held)
    monkeypatch.setattr(qmc, "_fused", lambda *a: None)
    slow = kfn(x, progress=False)
    for m in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(fast, m), getattr(slow, m), rtol=1e-12, atol=0)
        torch.testing.assert_close(getattr(fast, m + "_stderr"), getattr(slow, m + "_stderr"), rtol=1e-8, atol=1e-15)


def test_a_failed_build_leaves_the_interpreter(monkeypatch):
    """No working compiler for the bodies: ``native.body`` says None (and why), and the
    interpreter gives the torch form's values."""
    monkeypatch.setattr(native, "_state", {"failed": ""})
    monkeypatch.setattr(fused, "_compiler", lambda: ["false"])        # a "compiler" that always fails
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    program = pointwise.build([(ea, 0), (eb, 3)], 6, pair=False)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        assert native.body(program) is None
    assert native.status().startswith("not compiled: could not compile")
    _MODE["way"] = "interpreted"
    _close(*_both(lambda z: fa(z) * fb(z), program, _entries(16, seed=4), 256, positions=1))


def test_a_body_reads_the_terms_its_groups_give(way):
    """With the slots' groups known, the first slot of a pair reads one term; a run whose
    factor has more terms than the body reads (groups given wrongly here) takes the
    interpreter, with the same values."""
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    right = pointwise.build([(ea, 0), (eb, 3)], 6, pair=False, groups=[[0, 3], [1, 4], [2, 5]])
    assert right.terms == (1, 1, 1, 2, 2, 2)
    assert "= c0 * e0[i];" in right.source and "c1 * e1[i]" not in right.source and "+ c7 * e7[i];" in right.source
    wrong = pointwise.build([(ea, 0), (eb, 3)], 6, pair=False, groups=[[3, 0], [4, 1], [5, 2]])
    entries = _entries((4, 16), seed=6)
    for program in (right, wrong):
        _MODE["way"] = way if program is right else "interpreted"
        _close(*_both(lambda z: fa(z) * fb(z), program, entries, 256, positions=1, stream=3))


def test_small_calls_do_not_wait_for_the_compiler(monkeypatch):
    """Below ``native.WORTH`` points x entries a call is interpreted and builds nothing."""
    asked = []
    monkeypatch.setattr(native, "body", lambda p: asked.append(p))
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    program = pointwise.build([(ea, 0), (eb, 3)], 6, pair=False)
    b, d, groups, _ = qmc.prepare(_entries(8, seed=7), torch.zeros((), dtype=F64))
    assert 8 * 256 < native.WORTH
    qmc.expect_blocks(lambda z: fa(z) * fb(z), b, d, groups, 256, 3, 0, 0, program)
    assert asked == [] and program.body is None
    monkeypatch.setattr(native, "WORTH", 8 * 256)
    qmc.expect_blocks(lambda z: fa(z) * fb(z), b, d, groups, 256, 3, 0, 0, program)
    assert asked == [program]


def _step_chain(o):
    """The derivative of ``_chain(o)`` along its middle slot: step(outer) * step(middle) * 1.5."""
    s = [irn.ESlot(j) for j in range(3)]
    inner = irn.ECall(RELU, s[2])
    mid_arg = _lin((1.5, s[1]), (ONE, inner), (-0.25, irn.EConst(1.0)))
    outer_arg = _lin((ONE, s[0]), (ONE, irn.ECall(RELU, mid_arg)))
    expr = irn.EMul((irn.ECall(STEP, outer_arg), irn.ECall(STEP, mid_arg)))

    def torch_form(z):
        m = 1.5 * z[..., o + 1] + 1.0 * torch.relu(z[..., o + 2]) + -0.25 * 1.0
        return (1.0 * z[..., o] + 1.0 * torch.relu(m) > 0).to(F64) * (m > 0).to(F64)

    return expr, torch_form


def test_a_family_runs_its_members_in_one_pass(way):
    """The integrands over one covariance (a chain's ``E[h h']`` pair moments, its derivative's,
    and a plain product) as one program: each member's mean, standard error and further means
    are its own torch form's on the same points (compiled); the shared chain is computed once.
    Interpreted, a family of several gives None (the interpreter has one standard error), and
    each member then runs alone."""
    (ea, fa), (eb, fb) = _chain(0), _chain(3)
    (da, ga), (db, gb) = _step_chain(0), _step_chain(3)
    members = [([(ea, 0), (eb, 3)], True), ([(da, 0), (db, 3)], True), ([(ea, 0), (db, 3)], False)]
    groups = [[0, 3], [1, 4], [2, 5]]
    family = pointwise.Family(6, groups, stream=4)
    assert [family.add(*m) for m in members] == [0, 1, 2]
    program = family.program
    assert program.members == ((0, 3), (3, 3), (6, 1)) and program.squared == (0, 3, 6)
    alone = [pointwise.build(parts, 6, pair, groups) for parts, pair in members]
    assert len(program.code) < sum(len(p.code) for p in alone) - 10     # the chains are shared

    def pair(f, g):
        def moments(z):
            a, b = f(z), g(z)
            return a * b, a * a, b * b
        return moments

    torch_forms = [pair(fa, fb), pair(ga, gb), lambda z: fa(z) * gb(z)]
    entries = _entries((4, 16), seed=8)
    b, d, prepared, _ = qmc.prepare(entries, torch.zeros((), dtype=F64))
    got = qmc.expect_family(program, b, d, prepared, 256, 3, 1, family.stream)
    if way == "interpreted":
        assert got is None
        return
    assert len(got) == 3
    for mine, f in zip(got, torch_forms):
        _close(mine, qmc.expect_blocks(f, b, d, prepared, 256, 3, 1, family.stream))


def test_the_cache_keeps_the_recently_used_bodies(tmp_path, monkeypatch):
    """``native.prune``: of the integrand libraries beside the one used, those beyond the
    ``KEEP`` most recently used go once unused for ``KEEP_DAYS``; other files stay."""
    import os
    import time

    monkeypatch.setattr(native, "KEEP", 3)
    now, day = time.time(), 86400.0
    ages = {"a": 30, "b": 20, "c": 10, "d": 3, "e": 40, "f": 50}       # days since last use
    for name, age in ages.items():
        p = tmp_path / f"bodies-{name}.so"
        p.write_bytes(b"")
        os.utime(p, (now - age * day, now - age * day))
    other = tmp_path / "fused-x.so"
    other.write_bytes(b"")
    os.utime(other, (now - 99 * day, now - 99 * day))
    native.prune(tmp_path / "bodies-f.so")               # used now: the newest
    # newest first: f (now), d (3 days), c (10): kept as the 3 most recent; b, a, e: beyond and old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bodies-c.so", "bodies-d.so", "bodies-f.so", "fused-x.so"]
    monkeypatch.setattr(native, "KEEP", 1)
    os.utime(tmp_path / "bodies-f.so", (now - 8 * day, now - 8 * day))
    native.prune(tmp_path / "bodies-c.so")               # beyond KEEP: d used 3 days ago stays, f (8) goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bodies-c.so", "bodies-d.so", "fused-x.so"]


def test_a_full_family_starts_another(monkeypatch):
    """``pointwise.join``: members join their covariance's family until its program would have
    more than ``MAX_OUTPUTS`` outputs (sampling.c's limit); the next starts a family of its own,
    with its own stream; other covariances have theirs."""
    monkeypatch.setattr(pointwise, "MAX_OUTPUTS", 6)
    (ea, _), (eb, _) = _chain(0), _chain(3)
    (da, _), (db, _) = _step_chain(0), _step_chain(3)
    pair, product = [(ea, 0), (eb, 3)], [(da, 0), (db, 3)]
    families = {}
    calls = [("k", pair, True, 1), ("k", product, False, 2), ("other", pair, True, 3), ("k", product, True, 4),
             ("k", pair, False, 5)]
    joined = [pointwise.join(families, key, parts, is_pair, 6, None, stream) for key, parts, is_pair, stream in calls]
    first, second, other = joined[0][0], joined[3][0], joined[2][0]
    assert [index for _, index in joined] == [0, 1, 0, 0, 1]
    assert joined[1][0] is first and joined[4][0] is second and len({id(first), id(second), id(other)}) == 3
    assert (first.stream, other.stream, second.stream) == (1, 3, 4)
    assert (first.outputs, second.outputs) == (4, 4) and first.program.members == ((0, 3), (3, 1))
    assert all(f.program.outputs <= 6 for f in (first, second, other))
