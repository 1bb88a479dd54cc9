"""The table of elementwise nonlinearities: each one entry, with its torch names.

Every entry is an ``ir.Elementwise``: ``phi`` plus whichever Gaussian moments
have a closed form (the V-transform ``vt``, its derivative's ``dvt``, the means);
moments without one are evaluated by quadrature (``kernels.quadrature``).  The
``activation(...)`` call beside each entry lists the module types, functions
and method names it is found under (``ops/elementwise.py``).  Adding a
nonlinearity is one such call here, plus its tests.

Closed-form conventions: inputs are broadcastable float64 tensors;
``c = k12 / sqrt(k11 k22)`` is clamped into ``[-1, 1]`` and taken as 0 where
``k11 k22 = 0``; a variance of exactly 0 means ``z = 0`` exactly, and for kinked
functions the value there is torch's own (``relu'(0) = 0``,
``leaky_relu'(0) = slope``, ``sign(0) = 0``), which ``pin_zero_variance`` enforces.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ir import Elementwise
from ..kernels import fused
from ..kernels import piecewise as pw
from ..kernels.quadrature import angle, correlation
from .elementwise import (INV_2PI, PI, SQRT_2PI, activation, f64, from_callable, intern, number,
                          pin_zero_variance, register, zeros_like_pairs)


# ------------------------------------------- the a*relu(x) + b*relu(-x) family
#
# With R(c) = E relu(z1) relu(z2) (the arc-cosine kernel) and S(c) = E step(z1)
# step(z2), and the symmetry (z1, z2) -> (-z1, -z2):
#   E[phi phi]   = (a^2 + b^2) R(c) + 2ab R(-c)
#   E[phi' phi'] = (a^2 + b^2) S(c) - 2ab S(-c)      (phi' = a step(x) - b step(-x))
# and the same algebra gives the a*step(x) + b*step(-x) family (step, sign).


def _relu_kernel(scale: Tensor, c: Tensor, theta: Tensor) -> Tensor:
    """``E relu(z1) relu(z2) = sqrt(k11 k22) (sqrt(1-c^2) + (pi - theta) c) / (2 pi)``,
    ``theta = arccos c`` (not modified: it is shared with the derivative's kernel).

    ``sqrt(1 - c^2)`` and ``theta c`` cancel to ``O((1 - c)^(3/2))`` near ``c = 1``; both come
    from the same rounded ``c``, so the cancellation is exact.  (The multiplied-out
    ``sqrt(k11 k22 - k12^2)`` saves a division, but rounded apart from ``theta`` it left
    errors of 4e-10 relative at ``c = 1 - ulp``: tests/ops/test_attention.py.)"""
    # in place on fresh temporaries (each op rounds exactly as the out-of-place form)
    out = torch.rsub(c * c, 1.0).clamp_min_(0.0).sqrt_()
    out.add_(torch.rsub(theta, PI).mul_(c))
    return out.mul_(scale).mul_(INV_2PI)


def _step_kernel(theta: Tensor) -> Tensor:
    """``E step(z1) step(z2) = (pi - theta) / (2 pi)`` (orthant probability)."""
    return torch.rsub(theta, PI).mul_(INV_2PI)


def _combine(kernel, a: float, b: float):
    """``(a^2 + b^2) kernel(c) + 2ab kernel(-c)``, skipping the second term when ``ab = 0``.

    ``kernel(*rest, c, theta)`` takes the angle too; at ``-c`` it is ``pi - theta``.
    """
    def combined(*args):
        *rest, c, theta = args
        out = kernel(*rest, c, theta)
        if a * a + b * b != 1.0:
            out = (a * a + b * b) * out
        if a * b == 0:
            return out
        return out + 2.0 * a * b * kernel(*rest, None if c is None else -c, PI - theta)

    return combined


def _step_family_vt(a: float, b: float):
    comb = _combine(lambda c, theta: _step_kernel(theta), a, b)

    def vt_angle(k11, k12, k22, theta):
        out = fused.step_family(k11, theta, k22, a * a + b * b, 2.0 * a * b)
        return comb(None, theta) if out is None else out      # c itself is not needed: only the angle

    vt_angle.fused_rule = ("step", a * a + b * b, 2.0 * a * b)      # kernels/program.py

    def vt(k11, k12, k22):
        return vt_angle(k11, k12, k22, angle(k11, k12, k22))

    return vt, vt_angle


def _family_piecewise(fn, left, right) -> "pw.Piecewise":
    """A member of the families below as a ``Piecewise``, with torch's values at 0."""
    zero = torch.zeros((), dtype=torch.float64)
    return pw.Piecewise((0.0,), (left, right), at=(float(fn(zero)),),
                        deriv_at=(float(Elementwise("", fn).derivative(zero)),))


def _relu_family(name: str, fn, a: float, b: float) -> Elementwise:
    comb = _combine(_relu_kernel, a, b)
    dvt, dvt_angle = _step_family_vt(a, -b)

    def vt_angle(k11, k12, k22, theta):
        out = fused.relu_family(k11, k12, k22, theta, a * a + b * b, 2.0 * a * b)
        if out is not None:
            return out
        scale, c = correlation(k11, k12, k22)
        return comb(scale, c, theta)

    vt_angle.fused_rule = ("relu", a * a + b * b, 2.0 * a * b)

    def vt(k11, k12, k22):
        return vt_angle(k11, k12, k22, angle(k11, k12, k22))

    at0 = float(Elementwise("", fn).derivative(torch.zeros((), dtype=torch.float64)))   # torch's own

    def deriv(x):       # phi' without autograd: the N-D evaluator applies it to every sample
        d = (x > 0).to(x.dtype)                    # a (x > 0) - b (x < 0) + phi'(0) (x == 0), the
        if a != 1.0:                               # terms that are 0 left out (relu: one pass)
            d = d * a
        if b != 0.0:
            d = d - (x < 0).to(x.dtype) * b
        return d + (x == 0).to(x.dtype) * at0 if at0 != 0.0 else d

    return pin_zero_variance(
        Elementwise(
            name=name,
            fn=fn,
            vt=vt,
            dvt=dvt,
            mean=lambda k: (a + b) * (f64(k).clamp_min(0.0) / (2.0 * PI)).sqrt(),
            dmean=lambda k: torch.full_like(f64(k), (a - b) / 2.0),
            deriv=deriv,
            smooth=False,
            breaks=(0.0,),
            vt_angle=vt_angle,
            dvt_angle=dvt_angle,
            piecewise=_family_piecewise(fn, (0.0, -b), (0.0, a)),
        )
    )


def _step_family(name: str, fn, a: float, b: float) -> Elementwise:
    zero2 = lambda k11, k12, k22: zeros_like_pairs(k11, k12, k22)  # noqa: E731
    zero1 = lambda k: torch.zeros_like(f64(k))  # noqa: E731
    vt, vt_angle = _step_family_vt(a, b)
    return pin_zero_variance(
        Elementwise(
            name=name,
            fn=fn,
            vt=vt,
            dvt=zero2,
            mean=lambda k: torch.full_like(f64(k), (a + b) / 2.0),
            dmean=zero1,
            deriv=torch.zeros_like,
            smooth=False,
            jumps=True,
            breaks=(0.0,),
            vt_angle=vt_angle,
            piecewise=_family_piecewise(fn, (b,), (a,)),
        )
    )


activation(_relu_family("relu", torch.relu, 1.0, 0.0), modules=(nn.ReLU,),
           functions=(torch.relu, torch.relu_, F.relu, F.relu_), methods=("relu", "relu_"))
activation(_relu_family("abs", torch.abs, 1.0, 1.0), functions=(torch.abs, torch.absolute, torch.abs_),
           methods=("abs", "abs_", "absolute", "absolute_"))
STEP = activation(_step_family("step", lambda x: (x > 0).to(x.dtype), 1.0, 0.0))
activation(_step_family("sign", torch.sign, 1.0, -1.0), functions=(torch.sign, torch.sgn),
           methods=("sign", "sign_", "sgn", "sgn_"))


def _leaky_relu(negative_slope=0.01) -> Elementwise:
    slope = number("leaky_relu", "negative_slope", negative_slope)
    fn = lambda x: F.leaky_relu(x, slope)  # noqa: E731
    return intern(f"leaky_relu({slope!r})", lambda name: _relu_family(name, fn, 1.0, -slope))


activation(build=_leaky_relu, params=(("negative_slope", 0.01),),
           modules={nn.LeakyReLU: lambda m: (m.negative_slope,)}, functions=(F.leaky_relu, F.leaky_relu_))


def _heaviside(values=None) -> Elementwise:
    """``x > 0``, with ``values`` at 0 (which matters only for zero variance)."""
    value = number("heaviside", "values", values)
    if value == 0.0:
        return STEP

    def fn(x):
        return torch.where(x > 0, 1.0, torch.where(x == 0, value, 0.0)).to(x.dtype)

    return intern(f"heaviside({value!r})", lambda name: _step_family(name, fn, 1.0, 0.0))


activation(build=_heaviside, params=(("values", None),), functions=(torch.heaviside,),
           methods=("heaviside", "heaviside_"))


# ------------------------------------------------------- smooth closed forms


def _erf_vt(k11, k12, k22):
    """``(2/pi) arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22)))`` (Williams 1997)."""
    k11, k12, k22 = f64(k11), f64(k12), f64(k22)
    arg = 2.0 * k12 / ((1.0 + 2.0 * k11) * (1.0 + 2.0 * k22)).sqrt()
    return (2.0 / PI) * torch.arcsin(arg.clamp(-1.0, 1.0))


def _erf_dvt(k11, k12, k22):
    """``(4/pi) det(I + 2K)^(-1/2)``, with ``erf'(x) = (2/sqrt(pi)) exp(-x^2)``."""
    k11, k12, k22 = f64(k11), f64(k12), f64(k22)
    det = ((1.0 + 2.0 * k11) * (1.0 + 2.0 * k22) - 4.0 * k12 * k12).clamp_min(1.0)
    return (4.0 / PI) * det.rsqrt()


activation(
    Elementwise(
        name="erf",
        fn=torch.erf,
        vt=_erf_vt,
        dvt=_erf_dvt,
        mean=lambda k: torch.zeros_like(f64(k)),
        dmean=lambda k: (2.0 / math.sqrt(PI)) * (1.0 + 2.0 * f64(k)).rsqrt(),
        deriv=lambda x: (2.0 / math.sqrt(PI)) * torch.exp(-x * x),
    ),
    functions=(torch.erf, torch.special.erf), methods=("erf", "erf_"),
)


# GELU, phi(x) = x Phi(x). With Phi the normal cdf, pdf p, A = (1 + k11)(1 + k22),
# det = det(I + K) = A - k12^2 (>= 1 + k11 + k22 > 0), rho = k12 / sqrt(A) and
#   P  = E Phi(z1) Phi(z2)  = 1/4 + arcsin(rho) / (2 pi)      (orthant probability)
#   Dp = E p(z1) p(z2)      = 1 / (2 pi sqrt(det)),
# Gaussian integration by parts (E z_i h(z) = sum_j K_ij E d_j h) gives
#   E[phi phi]   = k12 P + Dp (k11 k22 - k12^2 + k12^2 / (1 + k11) + k12^2 / (1 + k22))
#   E[phi' phi'] = P + k12 Dp (1 / (1 + k11) + 1 / (1 + k22) + 1 / det)
# using E z2 Phi(z1) p(z2) = k12 Dp / (1 + k22) and E z1 z2 p(z1) p(z2) = k12 Dp / det.
# Checked against 2-D quadrature to 1e-10 in tests/kernels/test_elementwise.py.


def _gelu_terms(k11, k12, k22):
    k11, k12, k22 = f64(k11), f64(k12), f64(k22)
    a = (1.0 + k11) * (1.0 + k22)
    det = (a - k12 * k12).clamp_min(1.0)
    p = 0.25 + torch.arcsin((k12 / a.sqrt()).clamp(-1.0, 1.0)) / (2.0 * PI)
    dp = 1.0 / (2.0 * PI * det.sqrt())
    return k11, k12, k22, det, p, dp


def _gelu_vt(k11, k12, k22):
    k11, k12, k22, _, p, dp = _gelu_terms(k11, k12, k22)
    sq = k12 * k12
    return k12 * p + dp * (k11 * k22 - sq + sq / (1.0 + k11) + sq / (1.0 + k22))


def _gelu_dvt(k11, k12, k22):
    k11, k12, k22, det, p, dp = _gelu_terms(k11, k12, k22)
    return p + k12 * dp * (1.0 / (1.0 + k11) + 1.0 / (1.0 + k22) + 1.0 / det)


def _gelu_deriv(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / SQRT_2PI


GELU = register(
    Elementwise(
        name="gelu",
        fn=F.gelu,
        vt=_gelu_vt,
        dvt=_gelu_dvt,
        mean=lambda k: f64(k) / (SQRT_2PI * (1.0 + f64(k)).sqrt()),  # E z Phi(z) = k E p(z)
        dmean=lambda k: torch.full_like(f64(k), 0.5),
        deriv=_gelu_deriv,
    )
)
GELU_TANH = register(from_callable(lambda x: F.gelu(x, approximate="tanh"), "gelu(tanh)"))


def _gelu(approximate="none") -> Elementwise:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU if approximate == "none" else GELU_TANH


activation(build=_gelu, params=(("approximate", "none"),), modules={nn.GELU: lambda m: (m.approximate,)},
           functions=(F.gelu,))


# The normal cdf Phi itself (torch.special.ndtr): its moments are P and Dp above,
# E Phi(z) = 1/2 and E p(z) = 1 / sqrt(2 pi (1 + k)). All are smooth at a zero
# variance (z = 0: Phi(0) = 1/2, p(0) = 1 / sqrt(2 pi)).


def _ndtr_vt(k11, k12, k22):
    return _gelu_terms(k11, k12, k22)[4]


def _ndtr_dvt(k11, k12, k22):
    return _gelu_terms(k11, k12, k22)[5]


activation(
    Elementwise(
        name="ndtr",
        fn=torch.special.ndtr,
        vt=_ndtr_vt,
        dvt=_ndtr_dvt,
        mean=lambda k: torch.full_like(f64(k), 0.5),
        dmean=lambda k: (2.0 * PI * (1.0 + f64(k))).rsqrt(),
        deriv=lambda x: torch.exp(-0.5 * x * x) / SQRT_2PI,
    ),
    functions=(torch.special.ndtr,),
)


# sin, cos from cos(z1 -+ z2): E cos(z1 - z2) = exp(-(k11 + k22 - 2 k12) / 2), so
# E sin sin = exp(-(k11 + k22)/2) sinh k12 and E cos cos = exp(-(k11 + k22)/2) cosh k12.


def _damp(k11, k22):
    return torch.exp(-0.5 * (f64(k11) + f64(k22)))


def _sin_sin(k11, k12, k22):
    return _damp(k11, k22) * torch.sinh(f64(k12))


def _cos_cos(k11, k12, k22):
    return _damp(k11, k22) * torch.cosh(f64(k12))


activation(
    Elementwise(
        name="sin",
        fn=torch.sin,
        vt=_sin_sin,
        dvt=_cos_cos,
        mean=lambda k: torch.zeros_like(f64(k)),
        dmean=lambda k: torch.exp(-0.5 * f64(k)),
        deriv=torch.cos,
    ),
    functions=(torch.sin,), methods=("sin", "sin_"),
)
activation(
    Elementwise(
        name="cos",
        fn=torch.cos,
        vt=_cos_cos,
        dvt=_sin_sin,
        mean=lambda k: torch.exp(-0.5 * f64(k)),
        dmean=lambda k: torch.zeros_like(f64(k)),
        deriv=lambda x: -torch.sin(x),
    ),
    functions=(torch.cos,), methods=("cos", "cos_"),
)


def _exp_vt(k11, k12, k22):
    """``E exp(z1 + z2) = exp(Var(z1 + z2) / 2)``; ``exp' = exp``."""
    return torch.exp(0.5 * (f64(k11) + 2.0 * f64(k12) + f64(k22)))


activation(
    Elementwise(
        name="exp",
        fn=torch.exp,
        vt=_exp_vt,
        dvt=_exp_vt,
        mean=lambda k: torch.exp(0.5 * f64(k)),
        dmean=lambda k: torch.exp(0.5 * f64(k)),
        deriv=torch.exp,
    ),
    functions=(torch.exp,), methods=("exp", "exp_"),
)


# --------------------------------------------------------------- quadrature only

def _tanh_deriv(x):
    t = torch.tanh(x)
    return 1.0 - t * t


def _sigmoid_deriv(x):
    s = torch.sigmoid(x)
    return s * (1.0 - s)


# Derivatives in closed form: phi' is evaluated on every quadrature node of the
# backward expectations, where autograd costs a graph per call.
activation(dataclasses.replace(from_callable(torch.tanh, "tanh"), deriv=_tanh_deriv), modules=(nn.Tanh,),
           functions=(torch.tanh, F.tanh), methods=("tanh", "tanh_"))
activation(dataclasses.replace(from_callable(torch.sigmoid, "sigmoid"), deriv=_sigmoid_deriv),
           modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid, torch.special.expit),
           methods=("sigmoid", "sigmoid_"))
activation(dataclasses.replace(from_callable(torch.atan, "atan"), deriv=lambda x: 1.0 / (1.0 + x * x)),
           functions=(torch.atan, torch.arctan), methods=("atan", "atan_", "arctan", "arctan_"))
activation(from_callable(F.silu, "silu"), modules=(nn.SiLU,), functions=(F.silu,))
activation(from_callable(F.mish, "mish"), modules=(nn.Mish,), functions=(F.mish,))
activation(from_callable(torch.selu, "selu"), modules=(nn.SELU,),
           functions=(F.selu, getattr(F, "selu_", None), torch.selu, torch.selu_))
activation(from_callable(F.softsign, "softsign"), modules=(nn.Softsign,), functions=(F.softsign,))
activation(from_callable(F.logsigmoid, "logsigmoid"), modules=(nn.LogSigmoid,), functions=(F.logsigmoid,))


def _elu(alpha=1.0) -> Elementwise:
    alpha = number("elu", "alpha", alpha)
    return intern(f"elu({alpha!r})", lambda name: from_callable(lambda x: F.elu(x, alpha), name))


def _celu(alpha=1.0) -> Elementwise:
    alpha = number("celu", "alpha", alpha)
    return intern(f"celu({alpha!r})", lambda name: from_callable(lambda x: F.celu(x, alpha), name))


def _softplus(beta=1.0, threshold=20.0) -> Elementwise:
    beta, threshold = number("softplus", "beta", beta), number("softplus", "threshold", threshold)
    return intern(
        f"softplus({beta!r}, {threshold!r})",
        lambda name: from_callable(lambda x: F.softplus(x, beta, threshold), name),
    )


def _hardtanh(min_val=-1.0, max_val=1.0) -> Elementwise:
    lo, hi = number("hardtanh", "min_val", min_val), number("hardtanh", "max_val", max_val)
    if not lo < hi:
        raise ValueError(f"hardtanh: need min_val < max_val, got {lo!r}, {hi!r}")
    return intern(f"hardtanh({lo!r}, {hi!r})",
                  lambda name: _piecewise(name, lambda x: F.hardtanh(x, lo, hi), pw.hardtanh(lo, hi)))


def _relu6() -> Elementwise:
    return _hardtanh(0.0, 6.0)


activation(build=_elu, params=(("alpha", 1.0),), modules={nn.ELU: lambda m: (m.alpha,)},
           functions=(F.elu, F.elu_))
activation(build=_celu, params=(("alpha", 1.0),), modules={nn.CELU: lambda m: (m.alpha,)},
           functions=(F.celu, F.celu_, torch.celu, torch.celu_))
activation(build=_softplus, params=(("beta", 1.0), ("threshold", 20.0)),
           modules={nn.Softplus: lambda m: (m.beta, m.threshold)}, functions=(F.softplus,))
activation(build=_hardtanh, params=(("min_val", -1.0), ("max_val", 1.0)),
           modules={nn.Hardtanh: lambda m: (m.min_val, m.max_val)}, functions=(F.hardtanh, F.hardtanh_))
activation(build=_relu6, modules=(nn.ReLU6,), functions=(F.relu6,))


# ------------------------------------------------ piecewise polynomials: exact moments
#
# hardtanh, relu6, clamp, hardsigmoid, hardswish are polynomials between breakpoints;
# kernels.piecewise evaluates their Gaussian moments exactly (truncated bivariate
# normal moments), where quadrature across the kinks was 2-10 % off.


def _piecewise(name, fn, p) -> Elementwise:
    return Elementwise(name=name, fn=fn, smooth=False, breaks=p.breaks, piecewise=p, **pw.moments(p))


activation(_piecewise("hardsigmoid", F.hardsigmoid, pw.hardsigmoid()), modules=(nn.Hardsigmoid,),
           functions=(F.hardsigmoid,))
activation(_piecewise("hardswish", F.hardswish, pw.hardswish()), modules=(nn.Hardswish,),
           functions=(F.hardswish,))


def _clamp(min=None, max=None) -> Elementwise:
    """``torch.clamp(x, min, max)`` of a width vector against constant bounds."""
    lo = None if min is None else number("clamp", "min", min)
    hi = None if max is None else number("clamp", "max", max)
    if lo is None and hi is None:
        raise ValueError("clamp: needs min or max")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"clamp: need min < max, got {lo!r}, {hi!r}")
    return intern(f"clamp({lo!r}, {hi!r})",
                  lambda name: _piecewise(name, lambda x: torch.clamp(x, lo, hi), pw.clamp(lo, hi)))


def _clamp_min(min=None) -> Elementwise:
    return _clamp(min, None)


def _clamp_max(max=None) -> Elementwise:
    return _clamp(None, max)


activation(build=_clamp, params=(("min", None), ("max", None)), functions=(torch.clamp, torch.clip),
           methods=("clamp", "clamp_", "clip", "clip_"))
activation(build=_clamp_min, params=(("min", None),), functions=(torch.clamp_min,), methods=("clamp_min", "clamp_min_"))
activation(build=_clamp_max, params=(("max", None),), functions=(torch.clamp_max,), methods=("clamp_max", "clamp_max_"))
for _default in (_elu, _celu, _softplus, _hardtanh):
    _default()
del _default
