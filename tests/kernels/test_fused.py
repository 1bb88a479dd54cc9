"""Fused kernels (``ntkcompile.kernels.fused``): the arc-cosine rules and the window sums of
pair arrays as C loops, compiled once per machine, with the torch forms as fallback.

Oracles: the closed forms evaluated in numpy long double (independent of both paths), the
torch forms of the same steps (``fused.disabled()``), the adjoint identity of the window
sums, and whole kernels of models computed with the fused path on and off.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import ntkcompile
from ntkcompile.ir.geometry import ConvGeometry
from ntkcompile.kernels import fused, spatial
from ntkcompile.kernels import quadrature as quad
from ntkcompile.ops.elementwise import from_function, from_module

needs_compiler = pytest.mark.skipif(fused._compiler() is None, reason="no C compiler on this machine")

# (name, a, b) of phi = a relu(x) + b relu(-x): relu, leaky relu, abs
RELU_FAMILY = [("relu", 1.0, 0.0), ("leaky", 1.0, -0.2), ("abs", 1.0, 1.0)]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache and a library loaded anew; the shared state is restored afterwards."""
    monkeypatch.setenv("NTKCOMPILE_CACHE", str(tmp_path))
    fused.reset()
    yield tmp_path
    monkeypatch.undo()
    fused.reset()


def _pairs(n, seed, spread=1.0, cmax=0.999):
    g = torch.Generator().manual_seed(seed)
    k11 = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
    k22 = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
    c = cmax * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    return k11, c * (k11 * k22).sqrt(), k22


def _long_double_rules(k11, k12, k22, a, b):
    """``E phi phi'`` and ``E phi' phi''`` of ``phi = a relu + b relu(-.)`` in long double."""
    L = np.longdouble
    k11, k12, k22 = (t.numpy().astype(L) for t in (k11, k12, k22))
    pi = L(np.pi)
    s = np.sqrt(k11 * k22)
    c = np.clip(k12 / s, -1, 1)
    th = np.arccos(c)

    def R(c, th):
        return s * (np.sqrt(1 - c * c) + (pi - th) * c) / (2 * pi)

    def S(th):
        return (pi - th) / (2 * pi)

    vt = (a * a + b * b) * R(c, th) + 2 * a * b * R(-c, pi - th)
    dvt = (a * a + b * b) * S(th) - 2 * a * b * S(pi - th)      # phi' = a step(x) - b step(-x)
    return th, vt, dvt


@needs_compiler
def test_the_fused_path_is_in_use_here():
    assert fused.available(), fused.status()
    assert "fused C kernels in use" in fused.status()


@needs_compiler
@pytest.mark.parametrize("name,a,b", RELU_FAMILY)
def test_rules_against_long_double(name, a, b):
    k11, k12, k22 = _pairs(20_000, seed=1, spread=2.0)
    th_ref, vt_ref, dvt_ref = _long_double_rules(k11, k12, k22, a, b)
    th = fused.angle(k11, k12, k22)
    vt = fused.relu_family(k11, k12, k22, th, a * a + b * b, 2 * a * b)
    dvt = fused.step_family(k11, th, k22, a * a + b * b, -2 * a * b)
    # errors against each value's natural size: the angle and the step kernel against 1, the
    # arc-cosine kernel against sqrt(k11 k22) (it cancels to 0 at c = -1, as relu(z) relu(-z));
    # |c| <= 0.999: arccos amplifies c's rounding at most 1/sqrt(1 - c^2) = 22x (measured:
    # 3.3e-15 for the angle, as torch's own arccos; 2e-15 for the rest)
    scale = (k11 * k22).sqrt().numpy()
    for got, ref, size in ((th, th_ref, 1.0), (vt, vt_ref, scale), (dvt, dvt_ref, 1.0)):
        err = np.abs(got.numpy() - ref) / size
        assert float(err.max()) < 3e-14, name


def _entry(name):
    return {"relu": from_module(nn.ReLU()), "leaky": from_module(nn.LeakyReLU(0.2)),
            "abs": from_function(torch.abs), "sign": from_function(torch.sign)}[name]


@needs_compiler
@pytest.mark.parametrize("name", ["relu", "leaky", "abs", "sign"])
def test_activation_rules_equal_their_torch_forms(name):
    """Through the activation table (the path kernels take), on broadcast and strided
    arrays as the planner passes them: per-input variances against pair arrays."""
    e = _entry(name)
    g = torch.Generator().manual_seed(2)
    v = torch.exp(torch.randn(40, 9, generator=g, dtype=torch.float64))          # (N, P)
    k11, k22 = v[:, None, :, None], v[None, :, None, :]                          # (N, 1, P, 1), (1, N, 1, P)
    c = 0.99 * (2 * torch.rand(40, 40, 9, 9, generator=g, dtype=torch.float64) - 1)
    k12 = (c * (k11 * k22).sqrt()).transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous
    outs = []
    for off in (False, True):
        if off:
            ctx = fused.disabled()
        else:
            ctx = warnings.catch_warnings()
        with ctx:
            th = quad.angle(k11, k12, k22)
            outs.append([th, e.vt_angle(k11, k12, k22, th)])
            if e.dvt_angle is not None:              # sign's derivative vanishes: no rule
                outs[-1].append(e.dvt_angle(k11, k12, k22, th))
    for got, ref in zip(*outs):
        assert got.shape == ref.shape == (40, 40, 9, 9) and got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)


@needs_compiler
def test_special_entries_as_the_torch_forms():
    """Zero variances, variances whose product leaves float64's range, c beyond +-1 from
    rounding, NaN: each as the torch form decides."""
    k11 = torch.tensor([0.0, 1e200, 1e-200, 2.0, 1.0, float("nan"), 3.0, 0.0], dtype=torch.float64)
    k22 = torch.tensor([1.0, 1e150, 1e-150, 2.0, 1.0, 1.0, float("nan"), 0.0], dtype=torch.float64)
    k12 = torch.tensor([0.0, 3e174, -5e-176, 2.0 + 4e-16, -1.0 - 1e-15, 0.5, 0.5, 0.0], dtype=torch.float64)
    relu = _entry("leaky")
    got, ref = [], []
    for out in (got, ref):
        with (fused.disabled() if out is ref else warnings.catch_warnings()):
            th = quad.angle(k11, k12, k22)
            out += [th, relu.vt_angle(k11, k12, k22, th), relu.dvt_angle(k11, k12, k22, th)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0.0, equal_nan=True)
    assert torch.isnan(got[1][5:7]).all()                       # a NaN variance stays NaN


@needs_compiler
def test_roots_and_quotients_round_as_ieee():
    """With AVX-512 fused.c takes sqrt(k11 k22), k12 / sqrt(k11 k22) and sqrt(1 - c^2)
    without the divider (rsqrt14, two Newton steps, one correction): against numpy's IEEE
    sqrt and division (correctly rounded; torch's vectorized sqrt is not), bit for bit over
    the range the correlation meets, perfect squares (k12 = k11 = k22 must give c = 1)
    and 1 - c^2 near 0 included."""
    lib = fused._load()
    g = torch.Generator().manual_seed(5)
    n = 1 << 18
    u = lambda lo, hi: torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g)  # noqa: E731
    cases = [(torch.exp(u(-660.0, 660.0)), u(-1.2, 1.2), u(-0.1, 1.0)),          # in_range's whole span
             (torch.randint(1, 1 << 26, (n,), generator=g).double() ** 2, None, 1 - u(0.99, 1.0) ** 2),
             (u(0.5, 4.0), u(-1.0, 1.0), torch.ldexp(u(0.0, 1.0), torch.randint(-60, 1, (n,), generator=g)))]
    for p, c, x in cases:
        a = p.sqrt() if c is None else p.sqrt() * c      # None: a = sqrt(p), so a / sqrt(p) = 1
        s, q, r = (torch.empty(n, dtype=torch.float64) for _ in range(3))
        if lib.ntk_roots(*(t.data_ptr() for t in (p, a, x, s, q, r)), n) == 0:
            pytest.skip("built without AVX-512: sqrt and division take the divider (IEEE already)")
        ref_s = np.sqrt(p.numpy())
        for got, ref in ((s, ref_s), (q, a.numpy() / ref_s), (r, np.sqrt(np.maximum(x.numpy(), 0.0)))):
            assert np.array_equal(got.numpy(), ref)
        if c is None:
            assert bool((q == 1.0).all())


@needs_compiler
@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 70])
def test_unpacked_pairs_fill_both_triangles(n):
    """spatial.unpack of packed pairs (the C scatter, and its torch form), in pair_indices'
    order and shuffled: the symmetric matrix numpy builds from the same pairs."""
    g = torch.Generator().manual_seed(n)
    i, j, _ = spatial.pair_indices(n, torch.device("cpu"))
    packed = torch.rand(i.shape[0], generator=g, dtype=torch.float64)
    ref = np.full((n, n), np.nan)
    ref[i.numpy(), j.numpy()] = packed.numpy()
    ref[j.numpy(), i.numpy()] = packed.numpy()
    assert np.array_equal(spatial.unpack(packed, i, j, n).numpy(), ref)
    perm = torch.randperm(i.shape[0], generator=g)
    assert np.array_equal(spatial.unpack(packed[perm], i[perm], j[perm], n).numpy(), ref)
    with fused.disabled():
        assert np.array_equal(spatial.unpack(packed, i, j, n).numpy(), ref)


GEOMETRIES = [((3, 3), 1, 1, 1, (8, 8)), ((3, 3), 2, 1, 1, (9, 7)), ((3, 3), 1, 2, 2, (8, 8)),
              ((2, 2), 2, 0, 1, (6, 6)), ((5,), 1, 2, 1, (11,)), ((3,), 2, 0, 3, (13,)),
              ((3, 1), 1, (2, 0), (2, 1), (7, 5)), ((2, 2, 2), 1, 1, 1, (4, 3, 3))]


@needs_compiler
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_window_sums_equal_the_shifted_views(geom):
    """The same taps added in the same order as the torch form: equal to the bit (pairs of
    positions, their adjoint, and one input's positions)."""
    g = ConvGeometry.make(*geom)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, *g.in_shape, *g.in_shape, generator=gen, dtype=torch.float64)
    d = torch.randn(5, *g.out_shape, *g.out_shape, generator=gen, dtype=torch.float64)
    got = spatial.stencil_pair(a, g), spatial.stencil_pair_adjoint(d, g, (5,))
    with fused.disabled():
        ref = spatial.stencil_pair(a, g), spatial.stencil_pair_adjoint(d, g, (5,))
    for x, y in zip(got, ref):
        assert x.shape == y.shape and torch.equal(x, y)
    # stride 1 with the output the input's size: one shift per tap (ntk_window_pair_shift), else runs
    same_size = g.stride == (1,) * len(g.kernel) and g.out_shape == g.in_shape
    assert all((fused._window_shifts(g, adjoint) is not None) == same_size for adjoint in (False, True))
    if geom == GEOMETRIES[0]:   # 3x3, stride 1, padding 1: each tap one run, masked across the padding
        for adjoint in (False, True):
            _, runs, run_at = fused._window_table(g, adjoint)
            assert runs.shape == (9, 4) and run_at.tolist() == list(range(10))
            assert runs[:, 3].tolist() == [1, 0, 1] * 3      # a column shift crosses row ends
    # and the adjoint is the adjoint: <S a, d> = <a, S* d>, up to the 1/|K| each side divides by
    lhs = (got[0] * d).sum() * g.size
    rhs = (a * got[1]).sum() * g.size
    assert math.isclose(float(lhs), float(rhs), rel_tol=1e-12, abs_tol=1e-12)
    # one input's variances over its positions (ntk_window_same), and a constant one, as the
    # padded views' sum: to the bit
    v = torch.rand(5, *g.in_shape, generator=gen, dtype=torch.float64)
    c = torch.rand(5, generator=gen, dtype=torch.float64)
    assert fused.window_same(v, g) is not None
    got = spatial.stencil_same(v, g), spatial.stencil_same(c, g)
    with fused.disabled():
        ref = spatial.stencil_same(v, g), spatial.stencil_same(c, g)
    for x, y in zip(got, ref):
        assert x.shape == y.shape == (5, *g.out_shape) and torch.equal(x, y)


@needs_compiler
def test_threads_split_the_work_without_changing_it():
    k11, k12, k22 = _pairs(300_000, seed=4)
    g = ConvGeometry.make((3, 3), 1, 1, 1, (8, 8))
    a = torch.randn(40, 8, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            th = fused.angle(k11, k12, k22)
            results.append((th, fused.relu_family(k11, k12, k22, th, 1.0, 0.0), spatial.stencil_pair(a, g)))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


class LeakyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.c1(x), 0.1)
        h = torch.relu(self.c2(h)) + torch.abs(self.c2(h))
        return self.fc(h.mean((2, 3)))


def _mlp(act, depth=4):
    layers, d = [], 5
    for _ in range(depth):
        layers += [nn.Linear(d, 16), act]
        d = 16
    return nn.Sequential(*layers, nn.Linear(d, 1))


@needs_compiler
@pytest.mark.parametrize("model,shape", [(_mlp(nn.ReLU(), depth=6), (5,)), (_mlp(nn.LeakyReLU(0.3)), (5,)),
                                         (LeakyCNN(), (2, 6, 6))])
def test_kernels_equal_with_the_fused_path_on_and_off(model, shape):
    gen = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(9, *shape, generator=gen), torch.randn(4, *shape, generator=gen)
    kfn = ntkcompile.compile(model, W_std=1.3, b_std=0.2)
    on = [kfn(x1), kfn(x1, x2)]
    with fused.disabled():
        off = [kfn(x1), kfn(x1, x2)]
    for a, b in zip(on, off):
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-11, atol=0.0)


def test_disabled_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("NTKCOMPILE_FUSED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # disabling on purpose warns of nothing
        assert not fused.available()
    assert "NTKCOMPILE_FUSED=0" in fused.status()
    k11, k12, k22 = _pairs(10, seed=7)
    assert fused.angle(k11, k12, k22) is None     # the callers then take the torch form


def test_no_compiler_falls_back_to_torch_with_a_warning(fresh, monkeypatch):
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(8))
    model = _mlp(nn.ReLU())
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        got = ntkcompile.compile(model)(x)
    assert "no C compiler" in fused.status()
    fused.reset()
    monkeypatch.undo()
    with fused.disabled():
        ref = ntkcompile.compile(model)(x)
    torch.testing.assert_close(got.ntk, ref.ntk, rtol=0, atol=0)


@needs_compiler
def test_a_failed_build_says_why(fresh, monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(fused, "SOURCE", bad)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        assert not fused.available()
    assert "bad.c" in fused.status()


@needs_compiler
def test_built_once_then_loaded_from_the_cache(fresh):
    assert fused.available()
    built = sorted(fresh.glob("fused-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fused.reset()
    assert fused.available()
    assert sorted(fresh.glob("fused-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert not list(fresh.glob("*.tmp*")) and len(list(fresh.iterdir())) == 1    # no temporaries left
