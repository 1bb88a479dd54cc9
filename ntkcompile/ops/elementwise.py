"""Elementwise nonlinearities: the registry, how torch code finds them, and lowering.

Each nonlinearity is declared once, in ``ops/activations.py``, by one call::

    activation(entry,                      # an ir.Elementwise: phi and its closed forms
               modules=(nn.ReLU,),         # module types (their arguments: ``module_args``)
               functions=(torch.relu, F.relu),
               methods=("relu",))          # x.relu(); also the function torch.Tensor.relu

A family with parameters (``leaky_relu(negative_slope)``) passes a ``build``
function and the torch names of its parameters instead of an entry.  The call
registers the entry by name and a lowering rule for every torch name
(``passes.lower.rule``), which applies the nonlinearity to a width vector: an
H-atom ``phi(g)`` composed into the existing expression (``ir.Builder.apply``).
A known op with arguments it cannot honour raises ``ValueError`` (reported with
the node and source line); an unknown op has no rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ir import Elementwise
from ..kernels.compat import compiling
from ..passes.lower import Fixed, Width, rule as lowering_rule
from ..trace import leaf_function

__all__ = ["ELEMENTWISE", "activation", "apply", "from_callable", "from_function", "from_method",
           "from_module", "intern", "register", "register_elementwise"]

_F64 = torch.float64
ELEMENTWISE: Dict[str, Elementwise] = {}

# torch name -> resolver(args, kwargs) or (for modules) resolver(module) -> Elementwise
_FUNCTIONS: Dict[Callable, Callable] = {}
_METHODS: Dict[str, Callable] = {}
_MODULES: Dict[type, Callable] = {}
_INPLACE = (("inplace", False),)


def register(e: Elementwise) -> Elementwise:
    """Add ``e`` to ``ELEMENTWISE``; a name may be registered only once."""
    if e.name in ELEMENTWISE:
        raise ValueError(f"an elementwise nonlinearity named {e.name!r} is already registered")
    ELEMENTWISE[e.name] = e
    return e


def intern(name: str, build: Callable[[str], Elementwise]) -> Elementwise:
    """The registered entry ``name``, building and registering it on first use."""
    return ELEMENTWISE[name] if name in ELEMENTWISE else register(build(name))


def from_callable(fn: Callable[[Tensor], Tensor], name: str, *, smooth: bool = True) -> Elementwise:
    """An entry for any elementwise torch function: moments by quadrature, phi' by autograd."""
    return Elementwise(name=name, fn=fn, smooth=smooth)


# ------------------------------------------------------------------ lowering

def apply(lw, node, fn: Elementwise, x):
    """The lowering of ``fn(x)``: fixed tensors stay fixed, width vectors get an H-atom."""
    if isinstance(x, Fixed):
        return Fixed(node)
    if not isinstance(x, Width):
        raise lw.unsupported(node, f"elementwise {fn.name} of a per-input scalar")
    return lw.width(node, lw.b.apply(lambda es: lw.b.ecall(fn, es[0]), [x.vec]), x.size, x.positions)


def _resolved(lw, node, resolve):
    try:
        return resolve()
    except ValueError as e:
        raise lw.error(node, f"unsupported arguments: {e}") from e


def _add(table: dict, key, resolver):
    if key in table:
        raise ValueError(f"a nonlinearity is already registered for {key!r}")
    table[key] = resolver


def _register_function(target, resolver):
    _add(_FUNCTIONS, target, resolver)

    @lowering_rule(target)
    def _lower(lw, node, x, *args, **kwargs):
        return apply(lw, node, _resolved(lw, node, lambda: resolver(args, kwargs)), x)


def _register_method(name, resolver):
    _add(_METHODS, name, resolver)

    @lowering_rule(name)
    def _lower(lw, node, x, *args, **kwargs):
        return apply(lw, node, _resolved(lw, node, lambda: resolver(args, kwargs)), x)


def _register_module(cls, resolver):
    _add(_MODULES, cls, resolver)

    @lowering_rule(cls)
    def _lower(lw, node, m, x):
        return apply(lw, node, _resolved(lw, node, lambda: resolver(m)), x)


def activation(entry: Optional[Elementwise] = None, *, build: Optional[Callable[..., Elementwise]] = None,
               params: Tuple[Tuple[str, Any], ...] = (), modules: Any = (), functions: Sequence = (),
               methods: Sequence[str] = ()):
    """Declare a nonlinearity and every torch name it is found under (see the module docstring).

    ``entry``: a fixed nonlinearity (registered now).  Or ``build(*values)``: a
    family; ``params`` are its ``(name, default)`` arguments after the input, as
    the functional form takes them, and ``modules`` maps each module type to a
    function of the module giving those values.  ``inplace``, which
    ``torch.nn.functional``'s forms take, is accepted there and ignored (it does
    not change values).
    """
    if entry is not None:
        register(entry)
        build = lambda *values: entry  # noqa: E731
    op = entry.name if entry is not None else build.__name__.strip("_")

    def resolver(accepted):
        def from_args(args, kwargs):
            bound = _bind(op, args, kwargs, accepted)
            return build(*(bound[p] for p, _ in params))
        return from_args

    plain, functional = resolver(tuple(params)), resolver(tuple(params) + _INPLACE)

    if not isinstance(modules, dict):
        modules = {cls: (lambda m: ()) for cls in modules}
    for cls, module_args in modules.items():
        _register_module(cls, lambda m, module_args=module_args: build(*module_args(m)))
    seen = set()
    for target in functions:
        if target is not None and id(target) not in seen:
            seen.add(id(target))
            nnf = getattr(target, "__module__", None) == "torch.nn.functional"
            _register_function(target, functional if nnf else plain)
    for name in methods:
        _register_method(name, plain)
        tensor_fn = getattr(torch.Tensor, name, None)
        if tensor_fn is not None and tensor_fn not in _FUNCTIONS:
            _register_function(tensor_fn, plain)
    return entry


def register_elementwise(
    fn: Callable[[Tensor], Tensor], name: str, *, smooth: bool = True, **closed_forms
) -> Elementwise:
    """Register a user nonlinearity ``fn`` (called as ``fn(x)`` in the model).

    The model may call it by name in its ``forward`` (a global, an import, a
    closure variable or a module attribute): tracing keeps it as one op (no
    ``torch.fx.wrap`` needed).

    ``closed_forms`` may give any of ``vt``, ``dvt``, ``mean``, ``dmean``, ``deriv``
    (see ``ir.Elementwise``); missing moments are evaluated by quadrature.
    """
    allowed = {"vt", "dvt", "mean", "dmean", "deriv"}
    unknown = set(closed_forms) - allowed
    if unknown:
        raise ValueError(f"register_elementwise: unknown closed forms {sorted(unknown)}; valid: {sorted(allowed)}")
    if fn in _FUNCTIONS:
        raise ValueError(f"register_elementwise: {fn!r} already resolves to a nonlinearity")
    if name in ELEMENTWISE:
        raise ValueError(f"an elementwise nonlinearity named {name!r} is already registered")
    entry = activation(Elementwise(name=name, fn=fn, smooth=smooth, **closed_forms), functions=(fn,))
    leaf_function(fn)
    return entry


# ------------------------------------------------------------------ resolution

def from_module(m: nn.Module) -> Optional[Elementwise]:
    """The entry for an activation module (exact type match), or None."""
    resolver = _MODULES.get(type(m))
    return None if resolver is None else resolver(m)


def from_function(target: Callable, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None):
    """The entry for a ``call_function`` target, given the arguments after the input.

    Returns None for an unknown target; raises ValueError for a known one with
    arguments we cannot honour (e.g. ``F.gelu(approximate="foo")``).
    """
    try:
        resolver = _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None
    return None if resolver is None else resolver(tuple(args), dict(kwargs or {}))


def from_method(name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None):
    """The entry for a ``call_method`` node ``x.<name>(*args, **kwargs)``, or None."""
    resolver = _METHODS.get(name)
    return None if resolver is None else resolver(tuple(args), dict(kwargs or {}))


def number(op: str, name: str, value) -> float:
    """``value`` as a float, or a ValueError naming the argument."""
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


# ------------------------------------------------------------ closed-form helpers

def f64(k) -> Tensor:
    return torch.as_tensor(k, dtype=_F64)


def zeros_like_pairs(*ks) -> Tensor:
    """A float64 zero tensor of the broadcast shape of ``ks``."""
    ts = [f64(k) for k in ks]
    return torch.zeros(torch.broadcast_shapes(*(t.shape for t in ts)), dtype=_F64, device=ts[0].device)


def pin_zero_variance(e: Elementwise) -> Elementwise:
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
        return lambda k: torch.where(f64(k) == 0, at0, moment(k))

    def pin2(moment, pinned_mean, at0):
        if moment is None or pinned_mean is None:
            return moment

        def pinned(k11, k12, k22, *rest):
            k11, k22 = f64(k11), f64(k22)
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


PI = math.pi
SQRT_2PI = math.sqrt(2.0 * math.pi)
