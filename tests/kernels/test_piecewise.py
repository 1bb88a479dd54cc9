"""Exact moments of piecewise polynomials against independent oracles.

* ``bvn_cdf``: scipy's bivariate normal cdf and mpmath (1-D integral at 20 digits).
* ``expect2`` / ``expect1``: nested Gauss-Legendre written here, split at every
  kink of the integrand, evaluating the torch functions themselves (``F.hardswish``,
  ...), not the ``Piecewise`` under test.
* the relu family: the arc-cosine closed form (tensor_programs.md, Sec. 3);
  a jumpy function: Monte Carlo within 5 standard errors.
* structure: symmetry, PSD Gram matrices, zero variances and ``c = +-1``, the
  ``meta`` device, torch.compile (marked slow).
"""

import math

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal

from ntkcompile.kernels import piecewise as pw
from ntkcompile.kernels.piecewise import Piecewise, bvn_cdf, expect1, expect2

F64 = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=F64)


# A function with jumps, a quadratic piece and a slope on the right, and its torch form
# (its values and autograd derivatives at the jumps are the right-hand limits).
JUMPY = Piecewise((-0.5, 1.0), ((-1.0,), (0.2, 0.0, 1.0), (2.0, -1.0)), at=(0.45, 1.0),
                   deriv_at=(-1.0, -1.0))


def _jumpy(x):
    return torch.where(x < -0.5, -1.0, torch.where(x < 1.0, 0.2 + x * x, 2.0 - x))


def _between(lo, hi, slope=1.0):
    return lambda x: slope * ((x > lo) & (x < hi)).to(x.dtype)


# name: (Piecewise, torch function, its derivative written out, kinks). The
# derivatives are written here rather than taken by autograd: torch's hardsigmoid
# backward multiplies by a float32 1/6.
FUNCTIONS = {
    "relu": (pw.relu(), torch.relu, lambda x: (x > 0).to(x.dtype), (0.0,)),
    "step": (pw.step(), lambda x: (x > 0).to(x.dtype), torch.zeros_like, (0.0,)),
    "clamp": (pw.clamp(-0.5, 2.0), lambda x: torch.clamp(x, -0.5, 2.0), _between(-0.5, 2.0), (-0.5, 2.0)),
    "hardtanh": (pw.hardtanh(), F.hardtanh, _between(-1.0, 1.0), (-1.0, 1.0)),
    "relu6": (pw.relu6(), F.relu6, _between(0.0, 6.0), (0.0, 6.0)),
    "hardsigmoid": (pw.hardsigmoid(), F.hardsigmoid, _between(-3.0, 3.0, 1.0 / 6.0), (-3.0, 3.0)),
    "hardswish": (pw.hardswish(), F.hardswish,
                  lambda x: torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, x / 3 + 0.5)), (-3.0, 3.0)),
    "jumpy": (JUMPY, _jumpy, lambda x: torch.where((x > -0.5) & (x < 1.0), 2 * x, torch.where(x > 1, -1.0, 0.0)),
              (-0.5, 1.0)),
    "relu_cubed": (Piecewise((0.0,), ((0.0,), (0.0, 0.0, 0.0, 1.0))), lambda x: torch.relu(x) ** 3,
                   lambda x: 3 * torch.relu(x) ** 2, (0.0,)),
}

# (k11, c, k22): moderate, near-singular, tiny and huge variances, mixed scales.
CASES = [
    (1.0, 0.3, 1.0),
    (0.3, -0.7, 2.5),
    (4.0, 0.0, 1.0),
    (1.0, 1.0 - 1e-12, 1.0),
    (2.0, 1.0, 2.0),
    (2.0, -1.0, 0.5),
    (36.0, 0.99, 25.0),
    (1e-8, 0.5, 1e-8),
    (1e4, 1.0 - 1e-12, 1e4),
    (1e4, -0.95, 1e4),
    (1e-8, 0.9, 1e4),
]
VARIANCES = (0.0, 1e-8, 0.3, 1.0, 9.0, 1e4)


# ------------------------------------------------------------------------ oracle
#
# E f(s1 u) g(s2 (c u + c' w)), u, w iid N(0, 1), c' = sqrt(1 - c^2): the inner
# integral over u is split at f's kinks t / s1 and at g's kinks (t / s2 - c' w) / c,
# so each segment has a polynomial times a Gaussian; the outer integral over w is
# split where two of those kinks meet. Gauss-Legendre on [-13, 13] (the mass outside
# is 1e-38), also split at -6.5, 0, 6.5.

_R, _NODES = 13.0, 32
_FIXED = (-_R, -_R / 2, 0.0, _R / 2, _R)
_GL = np.polynomial.legendre.leggauss(_NODES)


def _npdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _eval(f, x):
    return f(torch.as_tensor(x, dtype=F64)).numpy()


def _segments(cuts):
    """Gauss-Legendre nodes and weights on the consecutive segments of ``cuts`` (last axis)."""
    x, w = _GL
    lo, hi = cuts[..., :-1, None], cuts[..., 1:, None]
    return lo + (hi - lo) * (x + 1) / 2, (hi - lo) / 2 * w


def oracle2(f, g, f_kinks, g_kinks, k11, c, k22):
    s1, s2 = math.sqrt(k11), math.sqrt(k22)
    cc = math.sqrt(max(0.0, (1 - c) * (1 + c)))

    def inner(w):
        cuts = [np.full_like(w, a) for a in _FIXED]
        cuts += [np.full_like(w, s / s1) for s in f_kinks if s1 > 0]
        cuts += [(s / s2 - cc * w) / c for s in g_kinks if s2 > 0 and c != 0]
        u, wu = _segments(np.sort(np.clip(np.stack(cuts, -1), -_R, _R), -1))
        vals = _eval(f, s1 * u) * _eval(g, s2 * (c * u + cc * w[:, None, None])) * _npdf(u)
        return (vals * wu).sum((-1, -2))

    if cc == 0:
        return float(inner(np.zeros(1))[0])
    cuts = list(_FIXED)
    if s2 > 0:
        cuts += [s / s2 / cc for s in g_kinks]
        cuts += [(s / s2 - c * r / s1) / cc for s in g_kinks for r in f_kinks if s1 > 0]
    w, ww = _segments(np.unique(np.clip(cuts, -_R, _R)))
    w, ww = w.ravel(), ww.ravel()
    return float((inner(w) * _npdf(w) * ww).sum())


def oracle1(f, kinks, k):
    s = math.sqrt(k)
    if s == 0:
        return float(_eval(f, np.zeros(1))[0])
    u, wu = _segments(np.unique(np.clip(list(_FIXED) + [r / s for r in kinks], -_R, _R)))
    return float((_eval(f, s * u) * _npdf(u) * wu).sum())


def _exact_c(k11, c, k22):
    """The correlation ``expect2`` sees for ``k12 = c sqrt(k11 k22)``, rounding included:
    near ``c = 1`` the moments change by ~1e-11 per ulp of ``c``."""
    return max(-1.0, min(1.0, (c * math.sqrt(k11 * k22)) / math.sqrt(k11 * k22)))


# ------------------------------------------------------------------ bivariate cdf


def test_bvn_cdf_matches_scipy():
    rng = np.random.default_rng(1)
    n = 300
    h, k = rng.uniform(-6, 6, n), rng.uniform(-6, 6, n)
    near_one = rng.choice([-1.0, 1.0], n // 2) * (1 - 10.0 ** rng.uniform(-13, -0.5, n // 2))
    r = np.concatenate([rng.uniform(-1, 1, n - n // 2), near_one])
    ours = bvn_cdf(t(h), t(k), t(r)).numpy()
    ref = [multivariate_normal.cdf([a, b], cov=[[1, c], [c, 1]], allow_singular=True) for a, b, c in zip(h, k, r)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-14)


def _mp_bvn(h, k, r):
    """``int_-inf^h phi(x) Phi((k - r x) / sqrt(1 - r^2)) dx`` at 20 digits."""
    mpmath.mp.dps = 20
    h, k, r = mpmath.mpf(h), mpmath.mpf(k), mpmath.mpf(r)
    cc = mpmath.sqrt((1 - r) * (1 + r))
    pts = [-mpmath.inf, h]
    if r != 0 and k / r < h:          # the integrand steps at x = k / r when r -> +-1
        pts = [-mpmath.inf, k / r, h]
    return float(mpmath.quad(lambda x: mpmath.npdf(x) * mpmath.ncdf((k - r * x) / cc), pts))


def test_bvn_cdf_matches_mpmath():
    """Both of Genz's forms, either side of the switch at |r| = 0.925, and r -> +-1."""
    for r in [0.0, 0.3, -0.6, 0.92499999, 0.925, -0.925, 0.99, 1 - 1e-12, -1 + 1e-12]:
        for h, k in [(0.3, 0.3), (-1.0, 2.0), (-4.0, -4.5), (2.5, -2.5)]:
            assert abs(bvn_cdf(t(h), t(k), t(r)).item() - _mp_bvn(h, k, r)) < 2e-16, (h, k, r)


def test_bvn_cdf_limits():
    h = t([-2.0, 0.0, 0.7, 3.0, 60.0, -60.0])
    k = t([0.5, 0.0, 0.7, -1.0, 1.0, 1.0])
    ndtr = torch.special.ndtr
    assert torch.equal(bvn_cdf(h, k, t(1.0)), ndtr(torch.minimum(h, k)))
    torch.testing.assert_close(bvn_cdf(h, k, t(-1.0)), (ndtr(h) - ndtr(-k)).clamp_min(0), rtol=0, atol=1e-16)
    torch.testing.assert_close(bvn_cdf(h, k, t(0.0)), ndtr(h) * ndtr(k), rtol=0, atol=1e-16)


# ------------------------------------------------------------- expectations


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("deriv", [False, True], ids=["phi", "dphi"])
def test_expect2_matches_quadrature(name, deriv):
    """Error <= 1e-10 of ``sqrt(E phi(z1)^2 E phi(z2)^2)`` (for relu at tiny variances
    that is relative to the value; wherever ``phi(0) != 0`` the value dominates
    ``sqrt(k11 k22)`` and no float64 result gets within 1e-10 of the latter)."""
    p, fn, dfn, kinks = FUNCTIONS[name]
    p, fn = (p.derivative(), dfn) if deriv else (p, fn)
    k11, c, k22 = (t(v) for v in zip(*CASES))
    ours = expect2(p, p, k11, c * (k11 * k22).sqrt(), k22)
    for (k11, c, k22), value in zip(CASES, ours.tolist()):
        ref = oracle2(fn, fn, kinks, kinks, k11, _exact_c(k11, c, k22), k22)
        size = math.sqrt(oracle1(lambda x: fn(x) ** 2, kinks, k11) * oracle1(lambda x: fn(x) ** 2, kinks, k22))
        assert abs(value - ref) <= 1e-10 * size, (k11, c, k22, value, ref)


def test_expect2_of_two_different_functions():
    pairs = [("hardswish", "jumpy"), ("relu6", "hardsigmoid"), ("step", "clamp")]
    for a, b in pairs:
        (p, f, _, fk), (q, g, _, gk) = FUNCTIONS[a], FUNCTIONS[b]
        for k11, c, k22 in [(2.0, 0.6, 0.5), (0.5, -0.97, 3.0), (9.0, 1.0, 4.0), (1.0, 0.0, 1.0)]:
            ours = expect2(p, q, t(k11), t(c * math.sqrt(k11 * k22)), t(k22)).item()
            ref = oracle2(f, g, fk, gk, k11, _exact_c(k11, c, k22), k22)
            assert abs(ours - ref) < 1e-12, (a, b, k11, c, k22)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_expect1_matches_quadrature(name):
    p, fn, dfn, kinks = FUNCTIONS[name]
    for q, f in [(p, fn), (p.derivative(), dfn)]:
        ours = expect1(q, t(VARIANCES))
        for k, value in zip(VARIANCES, ours.tolist()):
            size = math.sqrt(oracle1(lambda x: f(x) ** 2, kinks, k))
            assert abs(value - oracle1(f, kinks, k)) <= 1e-12 * size + 1e-300, (k, value)


def _arccos_kernel(k11, k12, k22):
    """tensor_programs.md, Sec. 3: relu and step (= relu')."""
    s = math.sqrt(k11 * k22)
    c = max(-1.0, min(1.0, k12 / s))
    theta = math.acos(c)
    return s * (math.sqrt(1 - c * c) + (math.pi - theta) * c) / (2 * math.pi), (math.pi - theta) / (2 * math.pi)


def test_relu_family_matches_the_arccos_kernel():
    """relu, step, abs = relu(x) + relu(-x), leaky relu a relu(x) - b relu(-x):
    ``E phi phi = (a^2 + b^2) R(c) - 2ab R(-c)``, ``E phi' phi' = (a^2 + b^2) S(c) + 2ab S(-c)``."""
    for a, b in [(1.0, 0.0), (1.0, -1.0), (1.0, 0.1)]:
        p = Piecewise((0.0,), ((0.0, b), (0.0, a)))
        for k11, k22 in [(1.0, 1.0), (0.3, 2.5), (1e-8, 1e4)]:
            for c in [-1.0, -0.9, -0.3, 0.0, 0.5, 0.99, 1 - 1e-12, 1.0]:
                k12 = c * math.sqrt(k11 * k22)
                r, s = _arccos_kernel(k11, k12, k22)
                r_neg, s_neg = _arccos_kernel(k11, -k12, k22)
                scale = math.sqrt(k11 * k22)
                vt = expect2(p, p, t(k11), t(k12), t(k22)).item()
                dvt = expect2(p.derivative(), p.derivative(), t(k11), t(k12), t(k22)).item()
                assert abs(vt - ((a * a + b * b) * r - 2 * a * b * r_neg)) < 2e-15 * scale, (a, b, k11, c)
                assert abs(dvt - ((a * a + b * b) * s + 2 * a * b * s_neg)) < 1e-15, (a, b, k11, c)


def test_jumpy_function_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    for k11, c, k22 in [(1.0, 0.6, 2.0), (3.0, -0.8, 0.5)]:
        n = 10**6
        u, w = torch.randn(2, n, dtype=F64, generator=g)
        z1 = math.sqrt(k11) * u
        z2 = math.sqrt(k22) * (c * u + math.sqrt(1 - c * c) * w)
        samples = _jumpy(z1) * _jumpy(z2)
        mean, se = samples.mean().item(), (samples.std() / math.sqrt(n)).item()
        ours = expect2(JUMPY, JUMPY, t(k11), t(c * math.sqrt(k11 * k22)), t(k22)).item()
        assert abs(ours - mean) < 5 * se, (ours, mean, se)


# --------------------------------------------------------------- structure


def _reflect(p):
    """``x -> p(-x)`` as a Piecewise."""
    coeffs = tuple(tuple(a * (-1) ** j for j, a in enumerate(q)) for q in reversed(p.coeffs))
    at = None if p.at is None else tuple(reversed(p.at))
    return Piecewise(tuple(-b for b in reversed(p.breaks)), coeffs, at=at)


def test_symmetries():
    k11, k22 = t([0.5, 2.0, 1e-8, 1e4]), t([3.0, 2.0, 1.0, 1e-8])
    k12 = t([0.3, -0.99, 0.9, 1.0]) * (k11 * k22).sqrt()
    for (p, *_), (q, *_) in [(FUNCTIONS["hardswish"], FUNCTIONS["jumpy"]), (FUNCTIONS["relu6"], FUNCTIONS["step"])]:
        pq = expect2(p, q, k11, k12, k22)
        torch.testing.assert_close(expect2(q, p, k22, k12, k11), pq, rtol=1e-14, atol=0)
        # reflecting one argument is flipping the correlation
        torch.testing.assert_close(expect2(_reflect(p), q, k11, -k12, k22), pq, rtol=1e-12, atol=1e-15)
    odd = pw.hardtanh()
    torch.testing.assert_close(expect2(odd, odd, k11, -k12, k22), -expect2(odd, odd, k11, k12, k22),
                               rtol=1e-13, atol=0)


def test_gram_matrices_are_psd():
    """``V_ij = E phi(z_i) phi(z_j)`` over inputs that include 0, a duplicate and an
    antipodal pair (so zero variance and ``c = +-1`` occur), for phi and phi'."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, dtype=F64, generator=g) * t([[0.3], [1.0], [3.0], [10.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    x = torch.cat([x, x[:1], -x[1:2], torch.zeros(1, 5, dtype=F64)])
    gram = x @ x.T / 5
    d = gram.diagonal()
    for name, (p, *_) in FUNCTIONS.items():
        for q in (p, p.derivative()):
            v = expect2(q, q, d[:, None], gram, d[None, :])
            torch.testing.assert_close(v, v.T, rtol=0, atol=1e-12 * v.abs().max().item(), msg=name)
            ev = torch.linalg.eigvalsh(0.5 * (v + v.T))
            assert ev.min() >= -1e-13 * ev.abs().max(), (name, ev.min().item())


@pytest.mark.parametrize("name, p, fn", [
    ("relu", pw.relu(), torch.relu),
    ("step", pw.step(), lambda x: (x > 0).to(x.dtype)),
    ("relu6", pw.relu6(), F.relu6),
    ("clamp(0, 1)", pw.clamp(0.0, 1.0), lambda x: torch.clamp(x, 0.0, 1.0)),
    ("clamp(-1, 0)", pw.clamp(-1.0, 0.0), lambda x: torch.clamp(x, -1.0, 0.0)),
    ("hardtanh(0, 1)", pw.hardtanh(0.0, 1.0), lambda x: F.hardtanh(x, 0.0, 1.0)),
    ("hardtanh(-1, 0)", pw.hardtanh(-1.0, 0.0), lambda x: F.hardtanh(x, -1.0, 0.0)),
    ("hardswish", pw.hardswish(), F.hardswish),
])
def test_zero_variance_uses_torchs_value_at_the_kink(name, p, fn):
    """``k11 = 0`` means ``z1 = 0``: ``E = phi(0) E psi(z2)`` with torch's ``phi(0)`` and
    autograd's ``phi'(0)``, even where 0 is a breakpoint (clamp and hardtanh differ)."""
    x = torch.zeros((), dtype=F64, requires_grad=True)
    y = fn(x)
    value = y.item()
    slope = torch.autograd.grad(y, x)[0].item() if y.requires_grad else 0.0
    k = t([0.0, 0.0, 1.0, 2.0])
    for q, at0 in [(p, value), (p.derivative(), slope)]:
        assert q.value(0.0) == at0 and q(t(0.0)).item() == at0
        for k22 in (0.0, 0.7):
            expected = at0 * expect1(q, t(k22))
            assert expect2(q, q, t(0.0), t(0.0), t(k22)).item() == expected.item()
            assert expect2(q, q, t(k22), t(0.0), t(0.0)).item() == expected.item()
        assert torch.equal(expect1(q, k)[:2], t([at0, at0]))


def test_call_and_derivative_match_torch():
    x = torch.linspace(-8, 8, 321, dtype=F64)
    x = torch.cat([x, t([-3.0, -1.0, -0.5, 0.0, 1.0, 2.0, 3.0, 6.0])]).requires_grad_(True)
    for name, (p, fn, _, _) in FUNCTIONS.items():
        y = fn(x)
        torch.testing.assert_close(p(x.detach()), y.detach(), rtol=1e-15, atol=1e-15, msg=name)
        if y.requires_grad:   # hardsigmoid's backward rounds 1/6 to float32
            (grad,) = torch.autograd.grad(y.sum(), x)
            torch.testing.assert_close(p.derivative()(x.detach()), grad, rtol=1e-7, atol=0, msg=name)


def test_broadcasting_and_moments():
    k11, k22 = t([[0.5], [2.0], [0.0]]), t([1.0, 3.0])
    k12 = 0.4 * (k11 * k22).sqrt()
    p = pw.hardswish()
    out = expect2(p, p, k11, k12, k22)
    assert out.shape == (3, 2) and out.dtype == F64
    m = pw.moments(p)
    d = p.derivative()
    assert torch.equal(m["vt"](k11, k12, k22), out)
    assert torch.equal(m["dvt"](k11, k12, k22), expect2(d, d, k11, k12, k22))
    assert torch.equal(m["mean"](k22), expect1(p, k22)) and torch.equal(m["dmean"](k22), expect1(d, k22))
    assert m["deriv"] == d
    assert expect2(p, p, 1.0, 0.5, 2.0).dtype == F64       # plain numbers work too


def test_invalid_pieces_are_rejected():
    with pytest.raises(ValueError, match="pieces"):
        Piecewise((0.0,), ((1.0,),))
    with pytest.raises(ValueError, match="increasing"):
        Piecewise((1.0, 0.0), ((0.0,), (1.0,), (2.0,)))
    with pytest.raises(ValueError, match="at needs"):
        Piecewise((0.0,), ((0.0,), (1.0,)), at=(0.0, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        pw.hardtanh(1.0, 1.0)


# --------------------------------------------------------------- devices


class _DeviceLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the device of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.devices.add(x.device.type)
        return out


def test_meta_device_creates_no_cpu_tensor():
    k11, k12, k22 = (torch.empty(4, 3, dtype=F64, device="meta") for _ in range(3))
    p = pw.hardswish()
    with _DeviceLog() as log:
        outs = [expect2(p, JUMPY.derivative(), k11, k12, k22), expect1(p, k11), p(k11)]
    assert log.devices == {"meta"}
    assert all(o.device.type == "meta" and o.shape == (4, 3) and o.dtype == F64 for o in outs)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """One graph, no break (relu: one bivariate cdf; hardswish's four take minutes to compile)."""
    p = pw.relu()
    fn = torch.compile(lambda a, b, c: expect2(p, p, a, b, c), fullgraph=True)
    k11, k22 = t([0.0, 0.5, 2.0, 1e4]), t([1.0, 0.0, 2.0, 1e-8])
    k12 = t([0.0, 0.0, 2.0, 0.3e-2])
    torch.testing.assert_close(fn(k11, k12, k22), expect2(p, p, k11, k12, k22), rtol=1e-13, atol=1e-15)
