"""Elementwise table: closed forms against quadrature / Monte Carlo, resolution."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkcompile.ir import Elementwise
from ntkcompile.ops.elementwise import (
    ELEMENTWISE,
    from_callable,
    from_function,
    from_method,
    from_module,
    register,
    register_elementwise,
)
from ntkcompile.kernels.quadrature import expect_1d, expect_2d
from helpers.registry import restore_registry  # noqa: F401  (a fixture)

F64 = torch.float64
VARIANCES = (0.3, 1.0, 2.5)
CS = (-1.0, -0.5, 0.0, 0.7, 1.0)
MOMENTS = ("vt", "dvt", "mean", "dmean")


def t(x):
    return torch.as_tensor(x, dtype=F64)


def _cases():
    """(k11, c, k22) triples: every variance pair and correlation, plus zero variances."""
    cases = [(a, c, b) for a in VARIANCES for b in VARIANCES for c in CS]
    cases += [(0.0, 0.0, b) for b in VARIANCES] + [(b, 0.0, 0.0) for b in VARIANCES] + [(0.0, 0.0, 0.0)]
    return cases


def _ks(cases):
    k11 = t([a for a, _, _ in cases])
    k22 = t([b for _, _, b in cases])
    k12 = t([c * math.sqrt(a * b) for a, c, b in cases])
    return k11, k12, k22


ONE_D = t((0.0,) + VARIANCES)

WITH_CLOSED_FORMS = [
    (name, moment)
    for name, e in ELEMENTWISE.items()
    for moment in MOMENTS
    if getattr(e, moment) is not None
]


def _phi_pair(e, moment):
    return (e.fn, e.fn) if moment in ("vt", "mean") else (e.derivative, e.derivative)


_N_MC = 100_000
_GEN = torch.Generator().manual_seed(0)
_U, _V = torch.randn(2, _N_MC, 1, generator=_GEN, dtype=F64)


def _monte_carlo_pair(f, g, cases):
    """Independent MC oracle: z1 = sqrt(k11) u, z2 = sqrt(k22) (c u + sqrt(1-c^2) v).

    Returns per-case means and standard errors, shape (len(cases),).
    """
    s1 = t([math.sqrt(a) for a, _, _ in cases])
    s2 = t([math.sqrt(b) for _, _, b in cases])
    c = t([c for _, c, _ in cases])
    vals = f(s1 * _U) * g(s2 * (c * _U + (1 - c * c).clamp_min(0).sqrt() * _V))
    return vals.mean(0), vals.std(0) / math.sqrt(_N_MC)


def _monte_carlo_one(f, ks):
    vals = f(ks.sqrt() * _V)
    return vals.mean(0), vals.std(0) / math.sqrt(_N_MC)


def _unseen_tail(f, fg):
    """What events too rare to appear in the sample (probability below ~3/n: the rule of
    three) can move a mean by: 3/n times the range of the integrand."""
    grid = torch.linspace(-12.0, 12.0, 4801, dtype=F64)
    values = f(grid) * (fg(grid) if fg is not None else 1.0)
    return 3.0 / _N_MC * float(values.max() - values.min())


@pytest.mark.parametrize("name,moment", WITH_CLOSED_FORMS)
def test_closed_form_matches_independent_oracle(name, moment):
    e = ELEMENTWISE[name]
    f, g = _phi_pair(e, moment)
    closed = getattr(e, moment)
    if moment in ("vt", "dvt"):
        cases = _cases()
        got = closed(*_ks(cases))
        assert got.shape == (len(cases),) and torch.isfinite(got).all()
        if e.smooth:
            # erf' (variance 2.5, c = -1) needs degree ~160 to reach 1e-12.
            ref = expect_2d(f, g, *_ks(cases), degree=160)
            torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
        else:
            mean, se = _monte_carlo_pair(f, g, cases)
            bad = (got - mean).abs() > 5 * se + _unseen_tail(f, g) + 1e-12
            assert not bad.any(), [(cases[i], float(got[i]), float(mean[i]), float(se[i])) for i in bad.nonzero()[:, 0]]
    else:
        got = closed(ONE_D)
        assert got.shape == ONE_D.shape and torch.isfinite(got).all()
        if e.smooth:
            torch.testing.assert_close(got, expect_1d(f, ONE_D, degree=128), rtol=1e-8, atol=1e-10)
        else:
            mean, se = _monte_carlo_one(f, ONE_D)
            assert ((got - mean).abs() <= 5 * se + _unseen_tail(f, None) + 1e-12).all(), (got, mean, se)


@pytest.mark.parametrize("name,moment", [p for p in WITH_CLOSED_FORMS if p[1] in ("vt", "dvt")])
def test_closed_form_is_finite_past_the_clamp_and_broadcasts(name, moment):
    closed = getattr(ELEMENTWISE[name], moment)
    # k12 rounded slightly past +-sqrt(k11 k22), and a (2, 1) x (3,) broadcast.
    out = closed(t([[1.0], [2.0]]), t([1.0 + 1e-12, -1.0 - 1e-12, 0.5]), t(1.0))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    same = closed(t(1.0), t(1.0), t(1.0))
    torch.testing.assert_close(out[0, 0], same, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- known values


def test_relu_known_values():
    relu = ELEMENTWISE["relu"]
    k = t(VARIANCES)
    torch.testing.assert_close(relu.vt(k, k, k), k / 2)
    k11, k22 = t(0.7), t(2.0)
    torch.testing.assert_close(relu.vt(k11, t(0.0), k22), relu.mean(k11) * relu.mean(k22))
    torch.testing.assert_close(relu.dvt(k, k, k), torch.full_like(k, 0.5))
    torch.testing.assert_close(relu.vt(k, -k, k), torch.zeros_like(k))


def test_sign_step_abs_leaky_known_values():
    c = t(CS)
    one = torch.ones_like(c)
    torch.testing.assert_close(ELEMENTWISE["sign"].vt(one, c, one), (2 / math.pi) * torch.arcsin(c))
    torch.testing.assert_close(ELEMENTWISE["abs"].dvt(one, c, one), (2 / math.pi) * torch.arcsin(c))
    torch.testing.assert_close(ELEMENTWISE["step"].vt(one, c, one), 1 - torch.arccos(c) / (2 * math.pi) - 0.5)
    # E|z1||z2| = (2/pi)(sqrt(1-c^2) + c arcsin c) for unit variances.
    ref = (2 / math.pi) * (torch.sqrt(1 - c * c) + c * torch.arcsin(c))
    torch.testing.assert_close(ELEMENTWISE["abs"].vt(one, c, one), ref)
    leaky = from_function(F.leaky_relu, (0.2,), {})
    torch.testing.assert_close(leaky.vt(t(3.0), t(3.0), t(3.0)), t((1 + 0.04) * 1.5))


def test_zero_variance_follows_torch_convention_at_the_kink():
    step, relu = ELEMENTWISE["step"], ELEMENTWISE["relu"]
    # z1 = 0 exactly and step(0) = relu'(0) = 0 in torch.
    assert float(step.vt(t(0.0), t(0.0), t(1.0))) == 0.0
    assert float(relu.dvt(t(0.0), t(0.0), t(1.0))) == 0.0
    assert float(relu.dmean(t(0.0))) == 0.0
    # torch's leaky_relu'(0) = slope.
    leaky = from_function(F.leaky_relu, (0.2,), {})
    assert float(leaky.dvt(t(0.0), t(0.0), t(0.0))) == pytest.approx(0.04)
    assert float(leaky.dvt(t(2.0), t(0.0), t(0.0))) == pytest.approx(0.2 * 0.6)
    half = from_function(torch.heaviside, (0.5,), {})
    assert float(half.vt(t(0.0), t(0.0), t(1.0))) == pytest.approx(0.25)
    assert float(half.vt(t(1.0), t(0.3), t(1.0))) == float(step.vt(t(1.0), t(0.3), t(1.0)))


def test_ndtr_known_values_and_zero_variance():
    """Phi(0) = 1/2 and p(0) = 1/sqrt(2 pi) exactly at zero variance; c = +-1 at unit variances."""
    ndtr = ELEMENTWISE["ndtr"]
    zero, k = t(0.0), t(VARIANCES)
    p0 = 1 / math.sqrt(2 * math.pi)
    torch.testing.assert_close(ndtr.vt(zero, zero, zero), t(0.25), rtol=0, atol=1e-15)
    torch.testing.assert_close(ndtr.vt(zero, zero, k), torch.full_like(k, 0.25), rtol=0, atol=1e-15)
    torch.testing.assert_close(ndtr.dvt(zero, zero, zero), t(p0 * p0), rtol=1e-15, atol=0)
    torch.testing.assert_close(ndtr.dvt(k, zero, zero), p0 * ndtr.dmean(k), rtol=1e-15, atol=0)
    torch.testing.assert_close(ndtr.dmean(zero), t(p0), rtol=1e-15, atol=0)
    assert float(ndtr.mean(zero)) == 0.5
    # E Phi(z)^2 = 1/4 + arcsin(k / (1 + k)) / (2 pi); E Phi(z) Phi(-z) = 1/2 - E Phi(z)^2.
    same = 0.25 + torch.arcsin(k / (1 + k)) / (2 * math.pi)
    torch.testing.assert_close(ndtr.vt(k, k, k), same, rtol=1e-15, atol=0)
    torch.testing.assert_close(ndtr.vt(k, -k, k), 0.5 - same, rtol=1e-14, atol=0)


def test_gelu_closed_form_on_the_diagonal_matches_1d_quadrature():
    gelu = ELEMENTWISE["gelu"]
    k = t(VARIANCES)
    torch.testing.assert_close(gelu.vt(k, k, k), expect_1d(lambda z: F.gelu(z) ** 2, k, 128), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        gelu.dvt(k, k, k), expect_1d(lambda z: gelu.derivative(z) ** 2, k, 128), rtol=1e-10, atol=0
    )


# ------------------------------------------------------------------- derivative


def _away_from_kinks(n=200):
    x = torch.linspace(-2.9, 2.9, n, dtype=F64)
    kinks = t([-1.0, 0.0, 1.0])
    return x[(x[:, None] - kinks).abs().min(1).values > 1e-2]


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_derivative_matches_finite_differences(name):
    e = ELEMENTWISE[name]
    x = _away_from_kinks()
    h = 1e-6
    fd = (e.fn(x + h) - e.fn(x - h)) / (2 * h)
    torch.testing.assert_close(e.derivative(x), fd, rtol=1e-6, atol=1e-6)
    y = e.derivative(x.reshape(2, -1, 1).clone().requires_grad_(True))
    assert y.shape == (2, x.numel() // 2, 1) and not y.requires_grad


@pytest.mark.parametrize("name", sorted(n for n, e in ELEMENTWISE.items() if e.deriv is not None))
def test_closed_form_derivative_is_torchs_own_at_the_kinks_too(name):
    """An entry's own ``deriv`` (the N-D evaluator applies it to every sample, where autograd
    per call cost an eighth of a residual CNN's time) equals backpropagation through ``fn``,
    at its kinks as well: ``relu'(0) = 0``, ``leaky_relu'(0) = slope``, the network's gradient."""
    e = ELEMENTWISE[name]
    x = t([-3.5, -3.0, -2.5, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.5, 3.0, 3.5])
    auto = Elementwise("autograd", e.fn).derivative(x)
    # 1e-7: torch's own backward of hardsigmoid in float64 uses 1/6 rounded to float32; a wrong
    # value at a kink is off by the jump (1, or a slope)
    torch.testing.assert_close(e.derivative(x), auto, rtol=1e-7, atol=1e-15)


def test_from_callable_uses_autograd():
    e = from_callable(lambda x: x**3, "cube")
    torch.testing.assert_close(e.derivative(t([1.0, -2.0])), t([3.0, 12.0]))
    assert e.vt is None and e.smooth and "cube" not in ELEMENTWISE


# ------------------------------------------------------------------- resolution

X = torch.linspace(-3.0, 3.0, 13, dtype=F64)

MODULES = [
    (nn.ReLU(), "relu"),
    (nn.ReLU(inplace=True), "relu"),
    (nn.LeakyReLU(0.1), "leaky_relu(0.1)"),
    (nn.LeakyReLU(), "leaky_relu(0.01)"),
    (nn.Tanh(), "tanh"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu(tanh)"),
    (nn.SiLU(), "silu"),
    (nn.ELU(alpha=0.5), "elu(0.5)"),
    (nn.CELU(alpha=2.0), "celu(2.0)"),
    (nn.Softplus(beta=2, threshold=10), "softplus(2.0, 10.0)"),
    (nn.Mish(), "mish"),
    (nn.SELU(), "selu"),
    (nn.Hardtanh(-2, 3), "hardtanh(-2.0, 3.0)"),
    (nn.ReLU6(), "hardtanh(0.0, 6.0)"),
    (nn.Softsign(), "softsign"),
    (nn.Hardsigmoid(), "hardsigmoid"),
    (nn.Hardswish(), "hardswish"),
    (nn.LogSigmoid(), "logsigmoid"),
]


@pytest.mark.parametrize("module,name", MODULES, ids=[n for _, n in MODULES])
def test_from_module(module, name):
    e = from_module(module)
    assert e is not None and e.name == name and ELEMENTWISE[name] is e
    torch.testing.assert_close(e.fn(X), module(X.clone()))


FUNCTIONS = [
    (torch.relu, (), {}, "relu"),
    (F.relu, (), {"inplace": True}, "relu"),
    (torch.tanh, (), {}, "tanh"),
    (F.tanh, (), {}, "tanh"),
    (torch.sigmoid, (), {}, "sigmoid"),
    (torch.special.expit, (), {}, "sigmoid"),
    (F.gelu, (), {}, "gelu"),
    (F.gelu, (), {"approximate": "tanh"}, "gelu(tanh)"),
    (torch.erf, (), {}, "erf"),
    (torch.special.erf, (), {}, "erf"),
    (torch.special.ndtr, (), {}, "ndtr"),
    (torch.sin, (), {}, "sin"),
    (torch.cos, (), {}, "cos"),
    (torch.exp, (), {}, "exp"),
    (torch.abs, (), {}, "abs"),
    (torch.sign, (), {}, "sign"),
    (F.leaky_relu, (0.3,), {}, "leaky_relu(0.3)"),
    (F.leaky_relu, (), {"negative_slope": 0.3, "inplace": False}, "leaky_relu(0.3)"),
    (F.elu, (), {"alpha": 0.7}, "elu(0.7)"),
    (F.softplus, (3.0, 5.0), {}, "softplus(3.0, 5.0)"),
    (F.silu, (), {}, "silu"),
    (F.mish, (), {}, "mish"),
    (torch.atan, (), {}, "atan"),
    (F.hardtanh, (-0.5, 0.5), {}, "hardtanh(-0.5, 0.5)"),
    (F.relu6, (), {}, "hardtanh(0.0, 6.0)"),
    (F.softsign, (), {}, "softsign"),
    (torch.heaviside, (torch.tensor(0.0, dtype=F64),), {}, "step"),
    (torch.Tensor.relu, (), {}, "relu"),
]


@pytest.mark.parametrize("target,args,kwargs,name", FUNCTIONS, ids=[f[3] for f in FUNCTIONS])
def test_from_function(target, args, kwargs, name):
    e = from_function(target, args, kwargs)
    assert e is not None and e.name == name
    torch.testing.assert_close(e.fn(X), target(X.clone(), *args, **kwargs))


METHODS = [
    ("relu", (), {}, "relu"),
    ("tanh", (), {}, "tanh"),
    ("sigmoid", (), {}, "sigmoid"),
    ("exp", (), {}, "exp"),
    ("sin", (), {}, "sin"),
    ("cos", (), {}, "cos"),
    ("abs", (), {}, "abs"),
    ("sign", (), {}, "sign"),
    ("erf", (), {}, "erf"),
    ("atan", (), {}, "atan"),
]


@pytest.mark.parametrize("method,args,kwargs,name", METHODS, ids=[m[0] for m in METHODS])
def test_from_method(method, args, kwargs, name):
    e = from_method(method, args, kwargs)
    assert e is not None and e.name == name
    torch.testing.assert_close(e.fn(X), getattr(X, method)(*args, **kwargs))


def test_unknown_ops_return_none():
    assert from_module(nn.Linear(2, 2)) is None
    assert from_module(nn.PReLU()) is None  # trainable slope: not a fixed nonlinearity
    assert from_function(torch.matmul, (), {}) is None
    assert from_function(lambda x: x, (), {}) is None
    assert from_method("view", (3,), {}) is None


@pytest.mark.parametrize(
    "target,args,kwargs",
    [
        (F.gelu, (), {"approximate": "foo"}),
        (F.leaky_relu, ("slope",), {}),
        (F.leaky_relu, (), {"slope": 0.1}),
        (torch.relu, (1.0,), {}),
        (F.hardtanh, (1.0, -1.0), {}),
        (torch.heaviside, (object(),), {}),
    ],
)
def test_known_ops_with_unsupported_arguments_raise(target, args, kwargs):
    with pytest.raises(ValueError):
        from_function(target, args, kwargs)


def test_method_with_unsupported_arguments_raises():
    with pytest.raises(ValueError):
        from_method("relu", (2,), {})


# --------------------------------------------------------------------- registry


def test_double_registration_raises(restore_registry):
    with pytest.raises(ValueError, match="already registered"):
        register(ELEMENTWISE["relu"])
    with pytest.raises(ValueError):
        register(Elementwise("tanh", torch.tanh))


def test_register_elementwise_is_found_by_from_function(restore_registry):
    def cube(x):
        return x**3

    e = register_elementwise(cube, "cube", vt=lambda a, b, c: 9 * a * b * c)
    assert ELEMENTWISE["cube"] is e and from_function(cube, (), {}) is e
    torch.testing.assert_close(e.derivative(t(2.0)), t(12.0))
    with pytest.raises(ValueError):
        register_elementwise(lambda x: x, "cube")
    with pytest.raises(ValueError):
        register_elementwise(cube, "cube2")
    with pytest.raises(ValueError):
        register_elementwise(lambda x: x, "other", variance=None)
    with pytest.raises(ValueError):
        from_function(cube, (1,), {})


def test_names_are_unique_and_descriptive():
    assert all(e.name == name for name, e in ELEMENTWISE.items())
    assert not any(e.smooth for e in map(ELEMENTWISE.get, ("relu", "abs", "step", "sign", "hardtanh(-1.0, 1.0)")))
