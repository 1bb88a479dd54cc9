"""The block quasi-Monte Carlo of the N-D evaluator (``kernels.qmc``, ``expect.qn_pair``).

Oracles: the dense ``quadrature.expect_nd`` on the same covariance at 2^20 points, exact
linear algebra for the factors, Cauchy-Schwarz for the ratio estimate, and the spread of
independent scrambles for the decorrelation across positions.
"""
import math

import pytest
import torch

from ntkcompile.kernels import expect, qmc
from ntkcompile.kernels import quadrature as Q

F64 = torch.float64
relu = torch.relu


def _chain_entries(batch, seed=0):
    """A 3-block residual chain on a pair: slots 0-2 side 1 (outermost first), 3-5 side 2;
    blocks {i, i + 3}, the zero covariances between blocks as the constant 0.0."""
    g = torch.Generator().manual_seed(seed)
    e = [[0.0] * 6 for _ in range(6)]
    for i in range(3):
        a, c = torch.rand(batch, generator=g, dtype=F64) + 0.5, torch.rand(batch, generator=g, dtype=F64) + 0.5
        r = torch.rand(batch, generator=g, dtype=F64) * 1.8 - 0.9
        e[i][i], e[i + 3][i + 3] = a, c
        e[i][i + 3] = e[i + 3][i] = r * (a * c).sqrt()
    return e


def _side(z, o):
    return relu(z[..., o] + relu(z[..., o + 1] + relu(z[..., o + 2])))


def _dense(entries, batch):
    rows = [torch.stack([torch.as_tensor(v, dtype=F64).expand(batch) for v in row], -1) for row in entries]
    return torch.stack(rows, -2)


def test_blocks_follow_the_constant_zeros():
    e = _chain_entries(4)
    assert qmc.blocks(e) == [[0, 3], [1, 4], [2, 5]]
    e[0][1] = e[1][0] = torch.ones(4, dtype=F64)          # a covariance that is not a constant zero joins them
    assert qmc.blocks(e) == [[0, 1, 3, 4], [2, 5]]


def test_factors_reproduce_the_covariance_and_clamp_correlations():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(64, generator=g, dtype=F64) + 0.1
    c = torch.rand(64, generator=g, dtype=F64) + 0.1
    rho = torch.rand(64, generator=g, dtype=F64) * 2.2 - 1.1          # some beyond [-1, 1]: noisy inputs
    b = rho * (a * c).sqrt()
    sub = torch.stack([torch.stack([a, b], -1), torch.stack([b, c], -1)], -2)
    factor, evals = qmc._factor(sub)
    got = factor @ factor.transpose(-1, -2)
    clamped = rho.clamp(-1, 1) * (a * c).sqrt()
    torch.testing.assert_close(got[:, 0, 0], a, rtol=1e-14, atol=0)     # variances kept exactly
    torch.testing.assert_close(got[:, 1, 1], c, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[:, 0, 1], clamped, rtol=1e-13, atol=1e-15)
    want = torch.linalg.eigvalsh(torch.stack([torch.stack([a, clamped], -1), torch.stack([clamped, c], -1)], -2))
    torch.testing.assert_close(evals, want.clamp_min(0), rtol=1e-12, atol=1e-14)
    big = torch.eye(3, dtype=F64) * 2 + 0.5
    f3, _ = qmc._factor(big[None])
    torch.testing.assert_close(f3[0] @ f3[0].T, big, rtol=1e-13, atol=1e-13)


def test_block_estimate_matches_the_dense_evaluator_and_is_unbiased():
    batch = 40
    e = _chain_entries(batch)
    like = torch.zeros((), dtype=F64)

    def f(z):
        return _side(z, 0) * _side(z, 3)

    ref, ref_se = Q.expect_nd(f, _dense(e, batch), mc_samples=2**20, seed=5)
    b, d, groups, evals = qmc.prepare(e, like)
    assert qmc.rank(evals) == 6
    runs = torch.stack([qmc.expect_blocks(f, b, d, groups, 4096, s)[0] for s in range(16)])
    spread = runs.std(0) / math.sqrt(16)
    z = (runs.mean(0) - ref) / (spread ** 2 + ref_se ** 2).sqrt()
    assert float(z.abs().max()) < 4.5             # 40 entries: |z| < 4.5 fails with probability ~3e-4
    assert float(z.pow(2).mean().sqrt()) < 1.6


def test_nets_decorrelate_positions_so_a_mean_over_them_averages_errors():
    """The same 2x2-block chain at 64 position entries: with one net per position the error of
    their mean falls like 1/sqrt(64); with common points (``MAX_NETS = 1``) it does not."""
    e = _chain_entries(1, seed=3)
    e = [[v if isinstance(v, float) else v.expand(64).clone() for v in row] for row in e]
    like = torch.zeros((), dtype=F64)
    b, d, groups, _ = qmc.prepare(e, like)

    def f(z):
        return _side(z, 0) * _side(z, 3)

    def spread(nets):
        old = qmc.MAX_NETS
        qmc.MAX_NETS = nets
        try:
            means = torch.stack([qmc.expect_blocks(f, b, d, groups, 256, s, positions=1)[0].mean()
                                 for s in range(24)])
        finally:
            qmc.MAX_NETS = old
        return float(means.std())

    common, nets = spread(1), spread(64)
    assert nets < common / 3, (common, nets)       # expected ratio about 8 for independent errors


def test_values_do_not_depend_on_the_pairs_of_inputs_beside_them():
    """The net of an entry is a function of its position (and the call) alone: a batch of one
    pair of inputs and the same pair inside a batch of three give the same values."""
    e1 = _chain_entries(16, seed=7)
    big = [[v if isinstance(v, float) else torch.stack([v * 0.5, v, v * 2.0]) for v in row] for row in e1]
    like = torch.zeros((), dtype=F64)

    def f(z):
        return _side(z, 0) * _side(z, 3)

    one = qmc.expect_blocks(f, *qmc.prepare(e1, like)[:3], 128, 2, positions=1, stream=4)[0]
    three = qmc.expect_blocks(f, *qmc.prepare(big, like)[:3], 128, 2, positions=1, stream=4)[0]
    torch.testing.assert_close(three[1], one, rtol=0, atol=0)


def test_ratio_estimate_keeps_correlations_within_one():
    """``qn_pair`` against the variances it is given: |E[a b']| <= sqrt(va vb) entry by entry
    (Cauchy-Schwarz on the same points), here on pairs with correlation close to 1, where an
    estimate on points of its own exceeds it."""
    batch = 50
    e = _chain_entries(batch, seed=11)
    for i in range(3):                           # both sides alike, correlation 0.999 in every block
        e[i + 3][i + 3] = e[i][i]
        e[i][i + 3] = e[i + 3][i] = 0.999 * e[i][i]
    like = torch.zeros((), dtype=F64)
    fa, fb = (lambda z: _side(z, 0)), (lambda z: _side(z, 3))
    same1 = [[e[i][j] for j in range(3)] for i in range(3)]
    same2 = [[e[i][j] for j in range(3, 6)] for i in range(3, 6)]
    va = expect.qn(lambda z: _side(z, 0) ** 2, same1, like, [], (1024, 1), False, layout=(0, True, 1))
    vb = expect.qn(lambda z: _side(z, 0) ** 2, same2, like, [], (1024, 1), False, layout=(0, True, 2))
    errors = []
    ab = expect.qn_pair(fa, fb, va, vb, e, like, errors, (256, 1), False, layout=(0, False, 3))
    assert bool((ab.abs() <= (va * vb).sqrt() * (1 + 1e-12)).all())
    plain = expect.qn(lambda z: fa(z) * fb(z), e, like, [], (256, 1), False, layout=(0, False, 3))
    ref, _ = Q.expect_nd(lambda z: fa(z) * fb(z), _dense(e, batch), mc_samples=2**17, seed=9)
    # the correlation against the given variances: the ratio estimate's is near exact, the plain
    # one's carries the full error of 256 points (the noise that crosses 1 nearer to it)
    corr = lambda k: k / (va * vb).sqrt()                      # noqa: E731
    err_ratio = float((corr(ab) - corr(ref)).abs().mean())
    err_plain = float((corr(plain) - corr(ref)).abs().mean())
    assert err_ratio < err_plain / 10                          # measured: 4.6e-5 against 8.9e-3
    assert errors and errors[0][0] == "mc"


def test_large_seeds_are_accepted():
    """A user's seed times the replicate and call numbers must stay a valid generator seed."""
    e = _chain_entries(4)
    b, d, groups, _ = qmc.prepare(e, torch.zeros((), dtype=F64))
    f = lambda z: _side(z, 0) * _side(z, 3)                    # noqa: E731
    for positions in (0, 1):
        v, se, _ = qmc.expect_blocks(f, b, d, groups, 64, 12345 * 1_000_003 + 7, positions=positions, stream=99)
        assert torch.isfinite(v).all() and torch.isfinite(se).all()


def test_same_input_entries_take_more_points():
    assert qmc.samples_for(512, True) == 512 * qmc.SAME_INPUT_BOOST
    assert qmc.samples_for(512, False) == 512


def test_qn_keeps_quadrature_for_low_rank_and_checks_the_integrand_shape():
    like = torch.zeros((), dtype=F64)
    v = torch.tensor([1.0, 2.0], dtype=F64)
    errors = []
    # rank 1 (kinked: quadrature up to rank 1): E relu(z)^2 = v / 2, no Monte Carlo error
    got = expect.qn(lambda z: relu(z[..., 0]) ** 2, ((v,),), like, errors, (256, 0), False)
    torch.testing.assert_close(got, v / 2, rtol=1e-4, atol=0)
    assert all(kind != "mc" for kind, _ in errors)
    e = _chain_entries(3)
    b, d, groups, _ = qmc.prepare(e, like)
    with pytest.raises(ValueError, match="expect_blocks"):
        qmc.expect_blocks(lambda z: z, b, d, groups, 16, 0)


def test_calls_on_the_same_covariance_share_its_factors():
    """``prepare_shared``: the same arrays give the kept factors; an array changed in place
    or a new one recomputes them (oracle: ``prepare`` itself); a dead array drops them."""
    import gc

    like = torch.zeros((), dtype=F64)
    e = _chain_entries(8, seed=11)
    first = qmc.prepare_shared(e, like)
    assert qmc.prepare_shared(e, like) is first
    e[0][0].mul_(2.0)                                   # in place: the version changes
    again = qmc.prepare_shared(e, like)
    assert again is not first
    want = qmc.prepare(e, like)
    assert again[4] == qmc.rank(want[3]) == 6
    for (_, got_terms), (_, want_terms) in zip(again[2], want[2]):
        for (s1, j1, c1), (s2, j2, c2) in zip(got_terms, want_terms):
            assert (s1, j1) == (s2, j2)
            torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    kept = len(qmc._prepared.items)
    e[1][1] = None
    del e, again
    gc.collect()
    assert len(qmc._prepared.items) < kept               # its arrays' death dropped the kept factors


def test_c_factors_and_rank_match_their_torch_forms():
    """``_factor2`` and ``rank`` in one C pass each (``sampling.c``) against their torch forms
    (``fused.disabled()``): the factors to rounding, the rank exactly, on blocks with
    negative variances (rounding), correlations past 1, zero and tiny eigenvalues."""
    from ntkcompile.kernels import fused

    if not fused.available():
        pytest.skip("no C compiler: only the torch form exists here")
    g = torch.Generator().manual_seed(12)
    n = 5000
    a = torch.rand(n, generator=g, dtype=F64) - 0.05
    c = torch.rand(n, generator=g, dtype=F64)
    b = (torch.rand(n, generator=g, dtype=F64) * 2.4 - 1.2) * (a.clamp_min(0) * c).sqrt()
    got = qmc._factor2(a, b, c)
    with fused.disabled():
        want = qmc._factor2(a, b, c)
    for x, y in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    for cols, zeros in ((4, 0), (6, 2), (5, 5)):
        ev = torch.rand(n, cols, generator=g, dtype=F64)
        ev[:, :zeros] = 0.0
        ev[: n // 2, -1] *= 1e-14                       # below 1e-12 of the entry's largest: not counted
        with fused.disabled():
            want_rank = qmc.rank(ev)
        assert qmc.rank(ev) == want_rank == _quad_rank(ev)


def _quad_rank(ev):
    top = ev.amax(-1, keepdim=True)
    return int(((ev > 1e-12 * top) & (ev > 0)).sum(-1).max())


def test_vanishing_columns_and_zero_terms_are_dropped_on_both_paths():
    """A block of correlation 1 everywhere has one column; a zero variance no term; the C pass
    and the torch form (``fused.disabled()``) keep the same terms (oracle: the factor by hand)."""
    from ntkcompile.kernels import fused

    like = torch.zeros((), dtype=F64)
    a = torch.tensor([1.0, 4.0, 2.0], dtype=F64)
    e = [[a, 0.0, 2 * a, 0.0], [0.0, torch.zeros(3, dtype=F64), 0.0, 0.0],
         [2 * a, 0.0, 4 * a, 0.0], [0.0, 0.0, 0.0, a]]          # slots 0, 2: correlation 1; slot 1: variance 0
    for ctx in (fused.disabled(), torch.no_grad()):
        with ctx:
            _, _, groups, evals = qmc.prepare(e, like)
        layout = [(cols, [(slot, j) for slot, j, _ in terms]) for cols, terms in groups]
        assert layout == [(1, [(0, 0), (2, 0)]), (0, []), (1, [(3, 0)])], layout
        torch.testing.assert_close(groups[0][1][0][2], a.sqrt(), rtol=1e-15, atol=0)
        torch.testing.assert_close(groups[0][1][1][2], 2 * a.sqrt(), rtol=1e-15, atol=0)
        assert qmc.rank(evals) == 2
