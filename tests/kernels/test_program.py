"""Fused programs (kernels/program.py, fused.c's ntk_program): chains of elementwise plan
steps run in one pass.  The oracle is the same chain as torch ops: the generated code
without fusion (``codegen.render(..., fuse=False)``), which must agree to the last bit,
and the torch forms of the closed forms (``fused.disabled()``), to a few ulps."""
import re

import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import codegen
from ntkcompile.kernels import fused, program
from ntkcompile.kernels import spatial as spatial_module
from ntkcompile.ops.activations import _relu_family

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"fused kernels unavailable: {fused.status()}")

F64 = torch.float64


def _unfused(kfn, self_mode, *xs):
    fn, _ = codegen.render(kfn._plan, self_mode=self_mode, prep=kfn._program.prep, fuse=False)
    return fn(*xs)[:2]


def _fused(kfn, self_mode, *xs):
    fn, text = codegen.render(kfn._plan, self_mode=self_mode, prep=kfn._program.prep, fuse=True)
    return fn(*xs)[:2], text


def _mlp(depth=4, act=nn.ReLU):
    layers, d = [], 7
    for _ in range(depth):
        layers += [nn.Linear(d, 16), act()]
        d = 16
    return nn.Sequential(*layers, nn.Linear(16, 1))


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.Tanh])
def test_a_fused_mlp_kernel_equals_the_unfused_code_bit_for_bit(act):
    torch.manual_seed(0)
    kfn = ntkcompile.compile(_mlp(act=act), W_std=1.4, b_std=0.1)
    x1, x2 = torch.randn(23, 7, dtype=F64), torch.randn(9, 7, dtype=F64)
    (nngp, ntk), text = _fused(kfn, True, x1)
    ref = _unfused(kfn, True, x1)
    rules = [int(n) for n in re.findall(r"# fused: \d+ steps, (\d+) closed forms", text)]
    if act is nn.Tanh:       # no fused closed form (quadrature): only arithmetic is fused
        assert not any(rules)
    else:
        assert sum(rules) > 0
        assert "#   s2 = angle(" in text and "-> out 0" in text      # each program's steps, shown
    assert torch.equal(nngp, ref[0]) and torch.equal(ntk, ref[1])
    (nngp, ntk), _ = _fused(kfn, False, x1, x2)
    ref = _unfused(kfn, False, x1, x2)
    assert torch.equal(nngp, ref[0]) and torch.equal(ntk, ref[1])


def test_the_default_path_fuses_and_agrees_with_the_torch_forms():
    """``kfn(x)`` runs the fused programs; with every fused kernel off it takes the torch
    forms of the rules: the same kernels to a few ulps."""
    torch.manual_seed(1)
    kfn = ntkcompile.compile(_mlp(6), W_std=1.5, b_std=0.05)
    assert "program(" in kfn.code
    x = torch.randn(40, 7, dtype=F64)
    k = kfn(x, tile_size=16)
    with fused.disabled():
        ref = kfn(x, tile_size=16)
    torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-13, atol=0)


def test_a_zero_variance_input_falls_back_to_the_pinned_torch_form():
    """An all-zero input with no biases has variance 0 in every layer: the fused program
    declines (the closed forms pin such entries in ops.elementwise.pin_zero_variance) and
    the torch form runs, so the result is the unfused code's, exactly 0 where it must be."""
    torch.manual_seed(2)
    kfn = ntkcompile.compile(_mlp(3), W_std=1.3, b_std=0.0)
    x = torch.randn(6, 7, dtype=F64)
    x[2] = 0.0
    (nngp, ntk), _ = _fused(kfn, True, x)
    ref = _unfused(kfn, True, x)
    assert torch.equal(nngp, ref[0]) and torch.equal(ntk, ref[1])
    assert (nngp[2] == 0).all() and (ntk[2] == 0).all()


def test_a_cnn_with_position_arrays_equals_the_unfused_code():
    """Pair arrays with positions (and per-pair scalars beside them, which a program cannot
    broadcast to one shape: those take the torch form).  The same values as the unfused
    code but for the order of the sums over positions (blocks of 8 running sums against
    torch's): to 1e-15 relative."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    kfn = ntkcompile.compile(model, W_std=1.4, b_std=0.1, input_shape=(2, 5, 5))
    x1, x2 = torch.randn(5, 2, 5, 5, dtype=F64), torch.randn(3, 2, 5, 5, dtype=F64)
    (nngp, ntk), text = _fused(kfn, True, x1)
    assert "program(" in text
    # each derivative's step rule joins its layer's forward chain, beside the angle it reads
    # (only the backward pass reads it: left there, it would reload the angle and variances)
    steps = [ln for ln in text.splitlines() if "= step[" in ln]
    assert len(steps) == 2 and all(re.search(r"step\[1, 0\]\((\w+), (s\d+), (\w+), \2\)", ln) for ln in steps)
    # the NTK's terms over all position pairs (merged by plan.merge_calls, split again by
    # codegen._split_sums) are summed in the passes that compute their factors: per layer
    # sum_st P C and sum_st P, in the pass that computes P (program._hoist_sums)
    assert text.count("spatial_sum(") == 4
    # the backward's first product (the last layer's step times the readout's seed) joins that
    # layer's forward chain (program._hoist_products): stored instead of the step, no pass of its own
    seed = re.search(r"(k\d+) = mean_seeds\(", text).group(1)
    blocks = re.findall(r"((?:    #   .*\n)+)    .* = program\(", text)
    with_seed = [b for b in blocks if f" * {seed}" in b]
    assert len(with_seed) == 1 and "= step[" in with_seed[0] and "= relu[" in with_seed[0]
    assert with_seed[0].count("= spatial_sum(") == 2
    # the readout's mean and the NTK's sum over position pairs are computed in the pass that
    # computes what they sum (no array of the position pairs is stored for them)
    assert not re.search(r"^ +k\d+ = (global_mean|spatial_sum)\(", text, re.M)
    assert re.search(r"#   s\d+ = global_mean\(s\d+, \(5, 5\)\)  -> out", text)
    assert re.search(r"#   s\d+ = spatial_sum\(s\d+, \(5, 5, 5, 5\)\)  -> out", text)
    ref = _unfused(kfn, True, x1)
    torch.testing.assert_close(nngp, ref[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(ntk, ref[1], rtol=1e-15, atol=0)
    (nngp, ntk), _ = _fused(kfn, False, x1, x2)
    ref = _unfused(kfn, False, x1, x2)
    torch.testing.assert_close(nngp, ref[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(ntk, ref[1], rtol=1e-15, atol=0)


@pytest.mark.parametrize("name, threads", [("spatial_sum", 1), ("spatial_sum", 2), ("global_mean", 2)])
def test_a_sum_over_positions_in_a_program_equals_torchs(name, threads):
    """A program ending in a sum over the trailing position axes (``1.5 x y`` summed), large
    enough to be split between threads (at whole sums), against torch's sum: equal to
    rounding (sums of 1764 terms, added in another order)."""
    gen = torch.Generator().manual_seed(4)
    batch, shape = (9, 5), (9, 5, 6, 7, 6, 7)          # 79,380 entries: two threads
    x, y = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    fn = getattr(spatial_module, name)
    sp = (6, 7, 6, 7) if name == "spatial_sum" else (6, 7)
    prog = program.Program([("mul", (1.5, ("leaf", 0), ("leaf", 1))), ("sum", (("step", 0),), fn, sp, 0)], 2, [1])
    ref = fn(1.5 * x * y, batch, sp) if name == "spatial_sum" else fn(1.5 * x * y, sp, batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        direct = fused.program(prog, [x, y], torch.Size(shape))       # the C pass itself (a sum, not yet a mean)
        got, = program.run(prog, x, x, y, envs=(batch,))
        again, = program.run(prog, x, x, y, envs=(batch,))
    finally:
        torch.set_num_threads(before)
    assert direct is not None and torch.equal(got, direct[0] / (1764 if name == "global_mean" else 1))
    assert got.shape == ref.shape == batch and torch.equal(got, again)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-14 * float(ref.abs().max()))
    with fused.disabled():                       # the torch form: torch's own sum
        assert torch.equal(program.run(prog, x, x, y, envs=(batch,))[0], ref)


def _random_program(gen, n_leaves, n_steps, relu):
    """Random chains: sums and products of leaves, constants and earlier steps (several
    values live at once, so registers are reused), angles and rules of positive variances."""
    steps, positive = [], [("leaf", 0), ("leaf", 1)]      # leaves 0, 1: variances
    refs = [("leaf", i) for i in range(n_leaves)]
    for k in range(n_steps):
        kind = int(torch.randint(0, 4, (), generator=gen))
        pick = lambda: refs[int(torch.randint(0, len(refs), (), generator=gen))]  # noqa: E731
        if kind == 0:
            steps.append(("add", (pick(), pick(), float(torch.rand((), generator=gen)))))
        elif kind == 1:
            steps.append(("mul", (float(torch.rand((), generator=gen)) + 0.5, pick(), pick())))
        elif kind == 2:
            k12 = pick()
            steps.append(("angle", (positive[0], k12, positive[1])))
            theta = ("step", len(steps) - 1)      # a relu at its own angle shares c and the scale
            steps.append(("rule", (positive[0], k12 if k % 3 else pick(), positive[1], theta),
                          relu.vt_angle if k % 2 else relu.dvt_angle))
        else:                # a new positive variance: 1 + x * x
            x = pick()
            steps.append(("mul", (x, x)))
            steps.append(("add", (("step", len(steps) - 1), 1.0)))
            positive = [positive[1], ("step", len(steps) - 1)]
        refs.append(("step", len(steps) - 1))
    outputs = sorted({len(steps) - 1, *[int(i) for i in torch.randint(0, len(steps), (3,), generator=gen)]})
    return program.Program(steps, n_leaves, outputs)


@pytest.mark.parametrize("seed", range(6))
def test_random_programs_equal_their_torch_form(seed):
    """The C program against the same steps as torch calls (each rule as its own fused
    kernel, which the program's rules must equal bit for bit); a packed-pair gather leaf
    and a broadcast leaf among the inputs; across the block size (256) and thread split."""
    gen = torch.Generator().manual_seed(seed)
    relu = _relu_family("leaky", lambda x: torch.nn.functional.leaky_relu(x, 0.2), 1.0, -0.2 * (seed % 2))
    prog = _random_program(gen, 5, 30, relu)
    n = 1000 + 37 * seed
    per_input = torch.rand(50, generator=gen, dtype=F64) + 0.5
    idx = torch.randint(0, 50, (n,), generator=gen)
    leaves = [torch.rand(n, generator=gen, dtype=F64) + 0.5, (per_input, idx),
              torch.rand(n, generator=gen, dtype=F64) - 0.5, torch.rand(n, generator=gen, dtype=F64)[::1],
              torch.tensor(0.7, dtype=F64)]
    like = leaves[0]
    got = fused.program(prog, leaves, torch.Size([n]))
    assert got is not None
    want = program._torch(prog, like, leaves)
    for g, w in zip(got, want):
        assert torch.equal(g, w.expand_as(g))
    with fused.disabled():
        torch_forms = program._torch(prog, like, leaves)
    for g, w in zip(got, torch_forms):
        torch.testing.assert_close(g, w.expand_as(g), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("cols", [300, 700, 1100])
def test_broadcast_leaves_on_long_rows_equal_the_torch_form(cols):
    """Pair arrays of 2-D tiles: a row-major leaf, per-input variances broadcast along rows
    and along columns, a transposed leaf.  Rows of 512 or more entries end their blocks
    (which then read unit-stride rows in place); shorter ones let blocks span rows."""
    gen = torch.Generator().manual_seed(cols)
    relu = _relu_family("relu", torch.relu, 1.0, 0.0)
    prog = _random_program(gen, 4, 30, relu)
    rows = 5
    v1 = torch.rand(rows, 1, generator=gen, dtype=F64) + 0.5
    v2 = torch.rand(1, cols, generator=gen, dtype=F64) + 0.5
    leaves = [v1.expand(rows, cols), v2.expand(rows, cols), torch.rand(rows, cols, generator=gen, dtype=F64),
              torch.rand(cols, rows, generator=gen, dtype=F64).T]
    got = fused.program(prog, leaves, torch.Size([rows, cols]))
    assert got is not None
    for g, w in zip(got, program._torch(prog, leaves[2], leaves)):
        assert torch.equal(g, w.expand_as(g))


@pytest.mark.parametrize("kind", ["add", "mul"])
def test_chains_of_any_length_round_as_their_binary_steps(kind):
    """An add or mul of m operands runs as one pass of up to 5 (then 4 more a pass): its
    value must be ((a op b) op c) op ... as the torch form's, bit for bit, for m = 1 to 13
    (one, two and three instructions), with constants and repeated operands among them.
    m = 1 (a sum of one term, which codegen writes) once stored a register never written."""
    gen = torch.Generator().manual_seed(7)
    n = 700
    leaves = [torch.rand(n, generator=gen, dtype=F64) * 2 - 0.5 for _ in range(4)]
    for m in range(1, 14):
        picks = [("leaf", int(i)) for i in torch.randint(0, 4, (m,), generator=gen)]
        if m > 1:
            picks[m // 2] = 1.0 + 1e-3 * m      # a constant inside the chain
        first = ("add" if kind == "mul" else "mul", (picks[0], 1.5))      # a computed first operand
        prog = program.Program([first, (kind, (("step", 0), *picks[1:]))], 4, (1,))
        assert len([ins for ins in prog.code if ins[0] == program._OPS[kind]]) == 1 + max(0, m - 2) // 4
        got = fused.program(prog, leaves, torch.Size([n]))
        assert got is not None and torch.equal(got[0], program._torch(prog, leaves[0], leaves)[0]), m


def test_a_relu_rule_shares_the_correlation_of_its_angle():
    """``relu`` at the angle of its own variances takes that angle's correlation and scale
    (RELU_CS); a rule at another angle computes them itself: both as the rules alone."""
    relu = _relu_family("leaky", lambda x: torch.nn.functional.leaky_relu(x, 0.3), 1.0, -0.3)
    gen = torch.Generator().manual_seed(7)
    n = 700
    k11, k22 = (torch.rand(n, generator=gen, dtype=F64) + 0.1 for _ in range(2))
    k12 = (torch.rand(n, generator=gen, dtype=F64) - 0.5) * (k11 * k22).sqrt() * 2
    other = k12.flip(0)
    L = [("leaf", i) for i in range(4)]
    steps = [("angle", (L[0], L[1], L[2])), ("rule", (L[0], L[1], L[2], ("step", 0)), relu.vt_angle),
             ("rule", (L[0], L[3], L[2], ("step", 0)), relu.vt_angle), ("rule", (L[0], L[1], L[2], ("step", 0)),
                                                                          relu.dvt_angle)]
    prog = program.Program(steps, 4, [1, 2, 3])
    ops = [ins[0] for ins in prog.code]
    assert ops.count(program._OPS["relu_cs"]) == 1 and ops.count(program._OPS["relu"]) == 1
    got = fused.program(prog, [k11, k12, k22, other], torch.Size([n]))
    want = program._torch(prog, k11, [k11, k12, k22, other])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_steps_of_a_smaller_shape_run_as_their_own_program():
    """A program computes every step at the inputs' common shape; an output that torch keeps
    smaller (broadcast only later) would change shape, so the program is split: the smaller
    steps run as a program of their own shape, the rest fused at the common shape, reading
    them as inputs.  Values and shapes are the torch form's, to the bit."""
    a = torch.rand(5, 1, dtype=F64)
    b = torch.rand(4, 5, dtype=F64).t()           # (5, 4), strided
    steps = [("mul", (2.0, ("leaf", 0))), ("add", (("step", 0), ("leaf", 1)))]
    both = program.Program(steps, 2, [0, 1])
    with fused.metered() as meter:
        s0, s1 = program.run(both, a, a, b)
    # two passes: s0 over 5 entries (1 input, 1 output), s1 over 20 (s0 and b in, s1 out)
    assert meter.bytes == 8 * 5 * 2 + 8 * 20 * 3
    assert s0.shape == (5, 1) and torch.equal(s0, 2.0 * a) and torch.equal(s1, 2.0 * a + b)
    assert isinstance(program._one_shape(both, (a.shape, b.shape)), program._Split)
    last = program.Program(steps, 2, [1])
    assert program._one_shape(last, (a.shape, b.shape)) == (5, 4)
    with fused.metered() as meter:
        (s1,) = program.run(last, a, a, b)
    assert meter.bytes == 8 * 20 * 3    # one fused pass: two inputs and one output of 20 entries
    assert torch.equal(s1, 2.0 * a + b)


def test_a_readout_beside_position_pairs_splits_where_shapes_do_not_broadcast():
    """A pooled readout's per-pair values ``(B,)`` beside a chain on ``(B, P, P)`` arrays (which
    do not broadcast together: torch aligns trailing axes) split into two programs; the
    results equal the torch form's to the bit."""
    gen = torch.Generator().manual_seed(3)
    mean = torch.rand(6, dtype=F64, generator=gen)
    k11 = torch.rand(6, 4, 1, dtype=F64, generator=gen) + 0.5
    k22 = torch.rand(6, 1, 4, dtype=F64, generator=gen) + 0.5
    k12 = (k11 * k22).sqrt() * (torch.rand(6, 4, 4, dtype=F64, generator=gen) * 2 - 1)
    seeds = torch.tensor(0.25, dtype=F64)
    steps = [("mul", (1.5, ("leaf", 0))), ("add", (("step", 0), 0.01)),
             ("angle", (("leaf", 1), ("leaf", 2), ("leaf", 3))),
             ("mul", (("step", 2), ("leaf", 4)))]
    prog = program.Program(steps, 5, [1, 3])
    leaves = (mean, k11, k12, k22, seeds)
    assert isinstance(program._one_shape(prog, tuple(x.shape for x in leaves)), program._Split)
    with fused.metered() as meter:
        got = program.run(prog, mean, *leaves)
    assert meter.bytes == 8 * 6 * 2 + 8 * 96 * 5     # (B,) fused: 1 in, 1 out; (B, P, P): 4 in, 1 out
    want = program._torch(prog, mean, leaves)
    with fused.disabled():
        plain = program.run(prog, mean, *leaves)
    for g, w, p in zip(got, want, plain):
        assert g.shape == w.shape == p.shape
        assert torch.equal(g, w) and torch.allclose(g, p, rtol=1e-15, atol=0)
    assert torch.equal(got[0], 1.5 * mean + 0.01)
