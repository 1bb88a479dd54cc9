"""The table of elementwise nonlinearities and their Gaussian moments.

A one-argument H-var ``phi(g)`` (TP II, Sec. 3) needs, for the forward pass, the
V-transform ``E phi(z1) phi(z2)`` of the 2x2 covariance ``[[k11, k12], [k12, k22]]``
and, for the backward pass (Sec. 4), ``E phi'(z1) phi'(z2)``; a LayerNorm or a
residual cross term may also need the first moments ``E phi(z)``, ``E phi'(z)``.
Each nonlinearity is one ``Elementwise`` record: the torch function plus
whichever of these four moments has a closed form. A missing moment (``None``)
means "evaluate by quadrature" (``kernels.quadrature``), which is
accurate only for ``smooth`` functions.

Conventions every closed form follows:

* Inputs are broadcastable float64 tensors; ``c = k12 / sqrt(k11 k22)`` is
  clamped into ``[-1, 1]`` and taken as 0 where ``k11 k22 = 0``.
* A variance of exactly 0 means ``z = 0`` exactly. For kinked functions the
  value at 0 is then torch's own convention (``relu'(0) = 0``,
  ``leaky_relu'(0) = slope``, ``sign(0) = 0``), which is what a finite network
  computes; ``_pin_zero_variance`` enforces this once for every kinked entry.

Resolution from torch.fx nodes (``from_module``, ``from_function``,
``from_method``) goes through three tables filled right beside the entries below;
a known op with arguments we cannot honour raises ``ValueError``, an unknown op
returns ``None`` (the lowering then raises ``UnsupportedOpError``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quadrature import angle, compiling, correlation

__all__ = [
    "Elementwise",
    "ELEMENTWISE",
    "register",
    "register_elementwise",
    "from_callable",
    "from_module",
    "from_function",
    "from_method",
]

_F64 = torch.float64
_PI = math.pi
_SQRT_2PI = math.sqrt(2.0 * math.pi)

Moment2 = Callable[[Tensor, Tensor, Tensor], Tensor]
Moment1 = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Elementwise:
    """One elementwise nonlinearity ``phi`` and its Gaussian moments.

    Attributes:
        name: unique, human readable, includes parameters (``"leaky_relu(0.1)"``).
        fn: ``phi`` as an elementwise, broadcasting torch function.
        vt: ``(k11, k12, k22) -> E[phi(z1) phi(z2)]`` (the V-transform), or None.
        dvt: ``(k11, k12, k22) -> E[phi'(z1) phi'(z2)]``, or None.
        mean: ``k -> E[phi(z)]``, ``z ~ N(0, k)``, or None.
        dmean: ``k -> E[phi'(z)]``, or None.
        deriv: ``phi'`` as a torch function; None means autograd of ``fn``.
        smooth: False for kinks and jumps, where quadrature converges slowly.
        vt_angle: ``(k11, k12, k22, theta) -> E[phi(z1) phi(z2)]`` given
            ``theta = arccos(c)`` (``kernels.quadrature.angle``), for the arc-cosine
            family; the planner computes ``theta`` once per pair of inputs and shares
            it between ``phi`` and ``phi'`` (relu and step), or None.
        dvt_angle: ``dvt`` in the same form, or None.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    vt: Optional[Moment2] = None
    dvt: Optional[Moment2] = None
    mean: Optional[Moment1] = None
    dmean: Optional[Moment1] = None
    deriv: Optional[Callable[[Tensor], Tensor]] = None
    smooth: bool = True
    vt_angle: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None
    dvt_angle: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None

    def derivative(self, x: Tensor) -> Tensor:
        """``phi'(x)`` for a tensor of any shape; the result carries no graph."""
        if self.deriv is not None:
            return self.deriv(x.detach())
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            y = self.fn(xg)
            if not y.requires_grad:  # piecewise constant (comparisons): phi' = 0 a.e.
                return torch.zeros_like(x)
            (grad,) = torch.autograd.grad(y, xg, torch.ones_like(y), allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad.detach()


# ----------------------------------------------------------------------- registry

ELEMENTWISE: Dict[str, Elementwise] = {}

Rule = Callable[[Sequence[Any], Dict[str, Any]], Elementwise]
_FUNCTION_RULES: Dict[Callable, Rule] = {}
_METHOD_RULES: Dict[str, Rule] = {}
_MODULE_RULES: Dict[type, Callable[[nn.Module], Elementwise]] = {}


def register(e: Elementwise) -> Elementwise:
    """Add ``e`` to ``ELEMENTWISE``; a name may be registered only once."""
    if e.name in ELEMENTWISE:
        raise ValueError(f"an elementwise nonlinearity named {e.name!r} is already registered")
    ELEMENTWISE[e.name] = e
    return e


def _intern(name: str, build: Callable[[str], Elementwise]) -> Elementwise:
    """The registered entry ``name``, building and registering it on first use."""
    return ELEMENTWISE[name] if name in ELEMENTWISE else register(build(name))


def _add_rule(table: dict, key, rule) -> None:
    if key in table:
        raise ValueError(f"a resolution rule for {key!r} is already registered")
    table[key] = rule


def from_callable(fn: Callable[[Tensor], Tensor], name: str, *, smooth: bool = True) -> Elementwise:
    """An entry for any elementwise torch function: moments by quadrature, phi' by autograd."""
    return Elementwise(name=name, fn=fn, smooth=smooth)


def register_elementwise(
    fn: Callable[[Tensor], Tensor], name: str, *, smooth: bool = True, **closed_forms
) -> Elementwise:
    """Register a user nonlinearity; ``from_function(fn, (), {})`` then finds it.

    ``closed_forms`` may give any of ``vt``, ``dvt``, ``mean``, ``dmean``, ``deriv``
    (see ``Elementwise``). ``fn`` must take the tensor as its only argument.
    """
    allowed = {"vt", "dvt", "mean", "dmean", "deriv"}
    unknown = set(closed_forms) - allowed
    if unknown:
        raise ValueError(f"register_elementwise: unknown closed forms {sorted(unknown)}; valid: {sorted(allowed)}")
    if fn in _FUNCTION_RULES:
        raise ValueError(f"register_elementwise: {fn!r} already resolves to a nonlinearity")
    e = register(Elementwise(name=name, fn=fn, smooth=smooth, **closed_forms))
    _add_rule(_FUNCTION_RULES, fn, _fixed_rule(name, ()))
    return e


# ------------------------------------------------------------ closed-form helpers


def _f64(k: Tensor) -> Tensor:
    return torch.as_tensor(k, dtype=_F64)


def _shape_of(*ks) -> Tensor:
    """A float64 zero tensor of the broadcast shape of ``ks``."""
    ts = [_f64(k) for k in ks]
    return torch.zeros(torch.broadcast_shapes(*(t.shape for t in ts)), dtype=_F64, device=ts[0].device)


def _pin_zero_variance(e: Elementwise) -> Elementwise:
    """Make a kinked entry's closed forms exact where a variance is exactly 0.

    With ``k11 = 0``, ``z1 = 0`` and ``E phi(z1) phi(z2) = phi(0) E phi(z2)``;
    the ``c``-formulas instead assume ``c = 0``, i.e. a value at the kink averaged
    over both sides. We substitute torch's own ``phi(0)`` and ``phi'(0)``.
    """
    zero = torch.zeros((), dtype=_F64)
    phi0, dphi0 = float(e.fn(zero)), float(e.derivative(zero))

    def pin1(moment, at0):
        if moment is None:
            return None
        return lambda k: torch.where(_f64(k) == 0, at0, moment(k))

    def pin2(moment, pinned_mean, at0):
        if moment is None or pinned_mean is None:
            return moment

        def pinned(k11, k12, k22, *rest):
            k11, k22 = _f64(k11), _f64(k22)
            out = moment(k11, k12, k22, *rest)
            # the checks run on the (small) variance arrays; full-size work only if needed
            # (always, branch-free, under torch.compile)
            if compiling() or bool((k11 == 0).any()):
                out = torch.where(k11 == 0, at0 * pinned_mean(k22), out)
            if compiling() or bool((k22 == 0).any()):
                out = torch.where(k22 == 0, at0 * pinned_mean(k11), out)
            return out

        return pinned

    mean, dmean = pin1(e.mean, phi0), pin1(e.dmean, dphi0)
    return dataclasses.replace(
        e, vt=pin2(e.vt, mean, phi0), dvt=pin2(e.dvt, dmean, dphi0), mean=mean, dmean=dmean,
        vt_angle=pin2(e.vt_angle, mean, phi0), dvt_angle=pin2(e.dvt_angle, dmean, dphi0),
    )


# ------------------------------------------- the a*relu(x) + b*relu(-x) family
#
# With R(c) = E relu(z1) relu(z2) (the arc-cosine kernel) and S(c) = E step(z1)
# step(z2), and the symmetry (z1, z2) -> (-z1, -z2):
#   E[phi phi]   = (a^2 + b^2) R(c) + 2ab R(-c)
#   E[phi' phi'] = (a^2 + b^2) S(c) - 2ab S(-c)      (phi' = a step(x) - b step(-x))
# and the same algebra gives the a*step(x) + b*step(-x) family (step, sign).


def _relu_kernel(scale: Tensor, c: Tensor, theta: Tensor) -> Tensor:
    """``E relu(z1) relu(z2) = sqrt(k11 k22) (sqrt(1-c^2) + (pi - theta) c) / (2 pi)``,
    ``theta = arccos c`` (not modified: it is shared with the derivative's kernel)."""
    # in place on fresh temporaries (each op rounds exactly as the out-of-place form)
    out = (c * c).neg_().add_(1.0).clamp_min_(0.0).sqrt_()
    out.add_(theta.neg().add_(_PI).mul_(c))
    return out.mul_(scale).div_(2.0 * _PI)


def _step_kernel(theta: Tensor) -> Tensor:
    """``E step(z1) step(z2) = (pi - theta) / (2 pi)`` (orthant probability)."""
    return theta.neg().add_(_PI).div_(2.0 * _PI)


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
        return out + 2.0 * a * b * kernel(*rest, None if c is None else -c, _PI - theta)

    return combined


def _step_family_vt(a: float, b: float):
    comb = _combine(lambda c, theta: _step_kernel(theta), a, b)

    def vt_angle(k11, k12, k22, theta):
        return comb(None, theta)      # c itself is not needed: only the angle

    def vt(k11, k12, k22):
        return vt_angle(k11, k12, k22, angle(k11, k12, k22))

    return vt, vt_angle


def _relu_family(name: str, fn, a: float, b: float) -> Elementwise:
    comb = _combine(_relu_kernel, a, b)
    dvt, dvt_angle = _step_family_vt(a, -b)

    def vt_angle(k11, k12, k22, theta):
        scale, c = correlation(k11, k12, k22)
        return comb(scale, c, theta)

    def vt(k11, k12, k22):
        return vt_angle(k11, k12, k22, angle(k11, k12, k22))

    return _pin_zero_variance(
        Elementwise(
            name=name,
            fn=fn,
            vt=vt,
            dvt=dvt,
            mean=lambda k: (a + b) * (_f64(k).clamp_min(0.0) / (2.0 * _PI)).sqrt(),
            dmean=lambda k: torch.full_like(_f64(k), (a - b) / 2.0),
            smooth=False,
            vt_angle=vt_angle,
            dvt_angle=dvt_angle,
        )
    )


def _step_family(name: str, fn, a: float, b: float) -> Elementwise:
    zero2 = lambda k11, k12, k22: _shape_of(k11, k12, k22)  # noqa: E731
    zero1 = lambda k: torch.zeros_like(_f64(k))  # noqa: E731
    vt, vt_angle = _step_family_vt(a, b)
    return _pin_zero_variance(
        Elementwise(
            name=name,
            fn=fn,
            vt=vt,
            dvt=zero2,
            mean=lambda k: torch.full_like(_f64(k), (a + b) / 2.0),
            dmean=zero1,
            deriv=torch.zeros_like,
            smooth=False,
            vt_angle=vt_angle,
        )
    )


register(_relu_family("relu", torch.relu, 1.0, 0.0))
register(_relu_family("abs", torch.abs, 1.0, 1.0))


def _leaky_relu(slope: float = 0.01) -> Elementwise:
    slope = float(slope)
    fn = lambda x: F.leaky_relu(x, slope)  # noqa: E731
    return _intern(f"leaky_relu({slope!r})", lambda name: _relu_family(name, fn, 1.0, -slope))


def _heaviside(value: float = 0.0) -> Elementwise:
    """``x > 0``, with ``value`` at 0 (which matters only for zero variance)."""
    value = float(value)
    if value == 0.0:
        return ELEMENTWISE["step"]

    def fn(x):
        return torch.where(x > 0, 1.0, torch.where(x == 0, value, 0.0)).to(x.dtype)

    return _intern(f"heaviside({value!r})", lambda name: _step_family(name, fn, 1.0, 0.0))


register(_step_family("step", lambda x: (x > 0).to(x.dtype), 1.0, 0.0))
register(_step_family("sign", torch.sign, 1.0, -1.0))
_leaky_relu()


# ------------------------------------------------------- smooth closed forms


def _erf_vt(k11, k12, k22):
    """``(2/pi) arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22)))`` (Williams 1997)."""
    k11, k12, k22 = _f64(k11), _f64(k12), _f64(k22)
    arg = 2.0 * k12 / ((1.0 + 2.0 * k11) * (1.0 + 2.0 * k22)).sqrt()
    return (2.0 / _PI) * torch.arcsin(arg.clamp(-1.0, 1.0))


def _erf_dvt(k11, k12, k22):
    """``(4/pi) det(I + 2K)^(-1/2)``, with ``erf'(x) = (2/sqrt(pi)) exp(-x^2)``."""
    k11, k12, k22 = _f64(k11), _f64(k12), _f64(k22)
    det = ((1.0 + 2.0 * k11) * (1.0 + 2.0 * k22) - 4.0 * k12 * k12).clamp_min(1.0)
    return (4.0 / _PI) * det.rsqrt()


register(
    Elementwise(
        name="erf",
        fn=torch.erf,
        vt=_erf_vt,
        dvt=_erf_dvt,
        mean=lambda k: torch.zeros_like(_f64(k)),
        dmean=lambda k: (2.0 / math.sqrt(_PI)) * (1.0 + 2.0 * _f64(k)).rsqrt(),
        deriv=lambda x: (2.0 / math.sqrt(_PI)) * torch.exp(-x * x),
    )
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
    k11, k12, k22 = _f64(k11), _f64(k12), _f64(k22)
    a = (1.0 + k11) * (1.0 + k22)
    det = (a - k12 * k12).clamp_min(1.0)
    p = 0.25 + torch.arcsin((k12 / a.sqrt()).clamp(-1.0, 1.0)) / (2.0 * _PI)
    dp = 1.0 / (2.0 * _PI * det.sqrt())
    return k11, k12, k22, det, p, dp


def _gelu_vt(k11, k12, k22):
    k11, k12, k22, _, p, dp = _gelu_terms(k11, k12, k22)
    sq = k12 * k12
    return k12 * p + dp * (k11 * k22 - sq + sq / (1.0 + k11) + sq / (1.0 + k22))


def _gelu_dvt(k11, k12, k22):
    k11, k12, k22, det, p, dp = _gelu_terms(k11, k12, k22)
    return p + k12 * dp * (1.0 / (1.0 + k11) + 1.0 / (1.0 + k22) + 1.0 / det)


def _gelu_deriv(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / _SQRT_2PI


register(
    Elementwise(
        name="gelu",
        fn=F.gelu,
        vt=_gelu_vt,
        dvt=_gelu_dvt,
        mean=lambda k: _f64(k) / (_SQRT_2PI * (1.0 + _f64(k)).sqrt()),  # E z Phi(z) = k E p(z)
        dmean=lambda k: torch.full_like(_f64(k), 0.5),
        deriv=_gelu_deriv,
    )
)


# sin, cos from cos(z1 -+ z2): E cos(z1 - z2) = exp(-(k11 + k22 - 2 k12) / 2), so
# E sin sin = exp(-(k11 + k22)/2) sinh k12 and E cos cos = exp(-(k11 + k22)/2) cosh k12.


def _damp(k11, k22):
    return torch.exp(-0.5 * (_f64(k11) + _f64(k22)))


def _sin_sin(k11, k12, k22):
    return _damp(k11, k22) * torch.sinh(_f64(k12))


def _cos_cos(k11, k12, k22):
    return _damp(k11, k22) * torch.cosh(_f64(k12))


register(
    Elementwise(
        name="sin",
        fn=torch.sin,
        vt=_sin_sin,
        dvt=_cos_cos,
        mean=lambda k: torch.zeros_like(_f64(k)),
        dmean=lambda k: torch.exp(-0.5 * _f64(k)),
        deriv=torch.cos,
    )
)
register(
    Elementwise(
        name="cos",
        fn=torch.cos,
        vt=_cos_cos,
        dvt=_sin_sin,
        mean=lambda k: torch.exp(-0.5 * _f64(k)),
        dmean=lambda k: torch.zeros_like(_f64(k)),
        deriv=lambda x: -torch.sin(x),
    )
)


def _exp_vt(k11, k12, k22):
    """``E exp(z1 + z2) = exp(Var(z1 + z2) / 2)``; ``exp' = exp``."""
    return torch.exp(0.5 * (_f64(k11) + 2.0 * _f64(k12) + _f64(k22)))


register(
    Elementwise(
        name="exp",
        fn=torch.exp,
        vt=_exp_vt,
        dvt=_exp_vt,
        mean=lambda k: torch.exp(0.5 * _f64(k)),
        dmean=lambda k: torch.exp(0.5 * _f64(k)),
        deriv=torch.exp,
    )
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
for _name, _fn, _d in [
    ("tanh", torch.tanh, _tanh_deriv),
    ("sigmoid", torch.sigmoid, _sigmoid_deriv),
    ("atan", torch.atan, lambda x: 1.0 / (1.0 + x * x)),
]:
    register(dataclasses.replace(from_callable(_fn, _name), deriv=_d))

for _name, _fn in [
    ("silu", F.silu),
    ("mish", F.mish),
    ("selu", torch.selu),
    ("softsign", F.softsign),
    ("logsigmoid", F.logsigmoid),
    ("gelu(tanh)", lambda x: F.gelu(x, approximate="tanh")),
]:
    register(from_callable(_fn, _name))
for _name, _fn in [("hardsigmoid", F.hardsigmoid), ("hardswish", F.hardswish)]:
    register(from_callable(_fn, _name, smooth=False))


def _elu(alpha: float = 1.0) -> Elementwise:
    alpha = float(alpha)
    return _intern(f"elu({alpha!r})", lambda name: from_callable(lambda x: F.elu(x, alpha), name))


def _celu(alpha: float = 1.0) -> Elementwise:
    alpha = float(alpha)
    return _intern(f"celu({alpha!r})", lambda name: from_callable(lambda x: F.celu(x, alpha), name))


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Elementwise:
    beta, threshold = float(beta), float(threshold)
    return _intern(
        f"softplus({beta!r}, {threshold!r})",
        lambda name: from_callable(lambda x: F.softplus(x, beta, threshold), name),
    )


def _hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Elementwise:
    lo, hi = float(min_val), float(max_val)
    if not lo < hi:
        raise ValueError(f"hardtanh: need min_val < max_val, got {lo!r}, {hi!r}")
    return _intern(
        f"hardtanh({lo!r}, {hi!r})",
        lambda name: from_callable(lambda x: F.hardtanh(x, lo, hi), name, smooth=False),
    )


for _default in (_elu, _celu, _softplus, _hardtanh):
    _default()


# ----------------------------------------------------------- resolution tables


def _number(op: str, name: str, value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: argument {name}={value!r} must be a constant Python number")
    return float(value)


def _bind(op: str, args: Sequence[Any], kwargs: Dict[str, Any], params: Tuple[Tuple[str, Any], ...]):
    """Match an op's trailing arguments to ``params`` (name, default) pairs."""
    if len(args) > len(params):
        raise ValueError(f"{op}: unexpected positional arguments {tuple(args)!r}")
    bound = dict(params)
    bound.update(zip((p for p, _ in params), args))
    for key, value in kwargs.items():
        if key not in bound:
            raise ValueError(f"{op}: unsupported argument {key!r}; accepted: {[p for p, _ in params]}")
        bound[key] = value
    return bound


_INPLACE = (("inplace", False),)


def _fixed_rule(name: str, params: Tuple[Tuple[str, Any], ...]) -> Rule:
    def rule(args, kwargs):
        _bind(name, args, kwargs, params)  # validates; ``inplace`` does not change values
        return ELEMENTWISE[name]

    return rule


def _param_rule(op: str, build: Callable[..., Elementwise], params, numeric: Sequence[str]) -> Rule:
    def rule(args, kwargs):
        bound = _bind(op, args, kwargs, params)
        return build(*(_number(op, p, bound[p]) for p in numeric))

    return rule


def _gelu_rule(args, kwargs) -> Elementwise:
    approximate = _bind("gelu", args, kwargs, (("approximate", "none"),))["approximate"]
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return ELEMENTWISE["gelu" if approximate == "none" else "gelu(tanh)"]


def _heaviside_rule(args, kwargs) -> Elementwise:
    bound = _bind("heaviside", args, kwargs, (("values", None),))
    return _heaviside(_number("heaviside", "values", bound["values"]))


_LEAKY = _param_rule("leaky_relu", _leaky_relu, (("negative_slope", 0.01),) + _INPLACE, ["negative_slope"])
_ELU = _param_rule("elu", _elu, (("alpha", 1.0),) + _INPLACE, ["alpha"])
_CELU = _param_rule("celu", _celu, (("alpha", 1.0),) + _INPLACE, ["alpha"])
_SOFTPLUS = _param_rule("softplus", _softplus, (("beta", 1.0), ("threshold", 20.0)), ["beta", "threshold"])
_HARDTANH = _param_rule(
    "hardtanh", _hardtanh, (("min_val", -1.0), ("max_val", 1.0)) + _INPLACE, ["min_val", "max_val"]
)


def _relu6_rule(args, kwargs) -> Elementwise:
    _bind("relu6", args, kwargs, _INPLACE)
    return _hardtanh(0.0, 6.0)


# Tensor methods (``x.relu()``): name -> rule. Each is also a function target as
# ``torch.Tensor.<name>``.
for _names, _rule in [
    (("relu", "relu_"), _fixed_rule("relu", ())),
    (("tanh", "tanh_"), _fixed_rule("tanh", ())),
    (("sigmoid", "sigmoid_"), _fixed_rule("sigmoid", ())),
    (("erf", "erf_"), _fixed_rule("erf", ())),
    (("sin", "sin_"), _fixed_rule("sin", ())),
    (("cos", "cos_"), _fixed_rule("cos", ())),
    (("exp", "exp_"), _fixed_rule("exp", ())),
    (("abs", "abs_", "absolute", "absolute_"), _fixed_rule("abs", ())),
    (("sign", "sign_", "sgn", "sgn_"), _fixed_rule("sign", ())),
    (("atan", "atan_", "arctan", "arctan_"), _fixed_rule("atan", ())),
    (("heaviside", "heaviside_"), _heaviside_rule),
]:
    for _n in _names:
        _add_rule(_METHOD_RULES, _n, _rule)
        if hasattr(torch.Tensor, _n):
            _add_rule(_FUNCTION_RULES, getattr(torch.Tensor, _n), _rule)

# Functions (``torch.relu``, ``F.relu``): target -> rule. Targets that do not
# exist in this torch version are skipped; aliases of one object appear once.
for _targets, _rule in [
    (("relu", "relu_", "F.relu_"), _fixed_rule("relu", ())),
    (("F.relu",), _fixed_rule("relu", _INPLACE)),
    (("tanh", "F.tanh"), _fixed_rule("tanh", ())),
    (("sigmoid", "F.sigmoid", "special.expit"), _fixed_rule("sigmoid", ())),
    (("erf", "special.erf"), _fixed_rule("erf", ())),
    (("sin",), _fixed_rule("sin", ())),
    (("cos",), _fixed_rule("cos", ())),
    (("exp",), _fixed_rule("exp", ())),
    (("abs", "absolute", "abs_"), _fixed_rule("abs", ())),
    (("sign", "sgn"), _fixed_rule("sign", ())),
    (("atan", "arctan"), _fixed_rule("atan", ())),
    (("heaviside",), _heaviside_rule),
    (("F.softsign",), _fixed_rule("softsign", ())),
    (("F.logsigmoid",), _fixed_rule("logsigmoid", ())),
    (("F.silu",), _fixed_rule("silu", _INPLACE)),
    (("F.mish",), _fixed_rule("mish", _INPLACE)),
    (("F.selu", "F.selu_"), _fixed_rule("selu", _INPLACE)),
    (("selu", "selu_"), _fixed_rule("selu", ())),
    (("F.hardsigmoid",), _fixed_rule("hardsigmoid", _INPLACE)),
    (("F.hardswish",), _fixed_rule("hardswish", _INPLACE)),
    (("F.gelu",), _gelu_rule),
    (("F.leaky_relu", "F.leaky_relu_"), _LEAKY),
    (("F.elu", "F.elu_"), _ELU),
    (("F.celu", "F.celu_", "celu", "celu_"), _CELU),
    (("F.softplus",), _SOFTPLUS),
    (("F.hardtanh", "F.hardtanh_"), _HARDTANH),
    (("F.relu6",), _relu6_rule),
]:
    _seen = set()
    for _path in _targets:
        _owner, _, _attr = _path.rpartition(".")
        _obj = getattr({"": torch, "F": F, "special": torch.special}[_owner], _attr, None)
        if _obj is not None and id(_obj) not in _seen and _obj not in _FUNCTION_RULES:
            _seen.add(id(_obj))
            _add_rule(_FUNCTION_RULES, _obj, _rule)


def _gelu_module(m: nn.GELU) -> Elementwise:
    return _gelu_rule((), {"approximate": m.approximate})


for _type, _mrule in [
    (nn.ReLU, lambda m: ELEMENTWISE["relu"]),
    (nn.Tanh, lambda m: ELEMENTWISE["tanh"]),
    (nn.Sigmoid, lambda m: ELEMENTWISE["sigmoid"]),
    (nn.SiLU, lambda m: ELEMENTWISE["silu"]),
    (nn.Mish, lambda m: ELEMENTWISE["mish"]),
    (nn.SELU, lambda m: ELEMENTWISE["selu"]),
    (nn.Softsign, lambda m: ELEMENTWISE["softsign"]),
    (nn.LogSigmoid, lambda m: ELEMENTWISE["logsigmoid"]),
    (nn.Hardsigmoid, lambda m: ELEMENTWISE["hardsigmoid"]),
    (nn.Hardswish, lambda m: ELEMENTWISE["hardswish"]),
    (nn.GELU, _gelu_module),
    (nn.LeakyReLU, lambda m: _leaky_relu(m.negative_slope)),
    (nn.ELU, lambda m: _elu(m.alpha)),
    (nn.CELU, lambda m: _celu(m.alpha)),
    (nn.Softplus, lambda m: _softplus(m.beta, m.threshold)),
    (nn.Hardtanh, lambda m: _hardtanh(m.min_val, m.max_val)),
    (nn.ReLU6, lambda m: _hardtanh(0.0, 6.0)),
]:
    _add_rule(_MODULE_RULES, _type, _mrule)


def from_module(m: nn.Module) -> Optional[Elementwise]:
    """The entry for an activation module (exact type match), or None."""
    rule = _MODULE_RULES.get(type(m))
    return None if rule is None else rule(m)


def from_function(target: Callable, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None):
    """The entry for a ``call_function`` target, given the arguments after the input.

    Returns None for an unknown target; raises ValueError for a known one with
    arguments we cannot honour (e.g. ``F.gelu(approximate="foo")``).
    """
    try:
        rule = _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
    return None if rule is None else rule(tuple(args), dict(kwargs or {}))


def from_method(name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None):
    """The entry for a ``call_method`` node ``x.<name>(*args, **kwargs)``, or None."""
    rule = _METHOD_RULES.get(name)
    return None if rule is None else rule(tuple(args), dict(kwargs or {}))


del _name, _fn, _default, _names, _rule, _n, _targets, _seen, _path, _owner, _attr, _obj, _type, _mrule
