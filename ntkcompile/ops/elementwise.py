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
from .stack import through_placements

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

# atom kind -> rule(lw, node, fn, x, atom): ``fn`` of a width vector that is one such
# (non-Gaussian) atom, where the kind has its own way (a max pooling absorbs a monotone fn)
OF_ATOM: dict = {}


def apply(lw, node, fn: Elementwise, x):
    """The lowering of ``fn(x)``: fixed tensors stay fixed, width vectors get an H-atom."""
    if isinstance(x, Fixed):
        return Fixed(node)
    if not isinstance(x, Width):
        raise lw.unsupported(node, f"elementwise {fn.name} of a per-input scalar")
    if len(x.vec.pieces) == 1 and len(x.vec.pieces[0][1].terms) == 1:
        coef, atom = x.vec.pieces[0][1].terms[0]
        if type(atom) in OF_ATOM and getattr(coef, "value", None) == 1.0:
            return OF_ATOM[type(atom)](lw, node, fn, x, atom)
    of = lambda v: lw.b.apply(lambda es: lw.b.ecall(fn, es[0]), [v])  # noqa: E731
    vec = through_placements(lw, x.vec, of) if x.positions else None     # phi(stack(h)) = stack(phi(h))
    return lw.width(node, of(x.vec) if vec is None else vec, x.size, x.positions)


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

    @lowering_rule(target, batch_safe=True)
    def _lower(lw, node, x, *args, **kwargs):
        return apply(lw, node, _resolved(lw, node, lambda: resolver(args, kwargs)), x)


def _register_method(name, resolver):
    _add(_METHODS, name, resolver)

    @lowering_rule(name, batch_safe=True)
    def _lower(lw, node, x, *args, **kwargs):
        return apply(lw, node, _resolved(lw, node, lambda: resolver(args, kwargs)), x)


def _register_module(cls, resolver):
    _add(_MODULES, cls, resolver)

    @lowering_rule(cls, batch_safe=True)
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
    fn: Callable[[Tensor], Tensor], name: str, *, jumps: Optional[Sequence] = None,
    smooth: Optional[bool] = None, **closed_forms
) -> Elementwise:
    """Register a user nonlinearity ``fn`` (called as ``fn(x)`` in the model).

    ``fn`` must map a float64 tensor to a float64 tensor of the same shape,
    elementwise, finite everywhere.  The model may call it by name in its
    ``forward`` (a global, an import, a closure variable or a module attribute):
    tracing keeps it as one op (no ``torch.fx.wrap`` needed).

    ``jumps`` declares where ``phi`` jumps: locations ``t`` (the sizes
    ``phi(t+) - phi(t-)`` are measured from ``fn``), ``(t, size)`` pairs (checked
    against ``fn``), or ``()`` for none.  Undeclared, jumps and kinks are found
    numerically on [-12, 12] (``_breaks``); declared, they are still checked there.
    Known jumps make Stein's lemma exact (delta terms, ``kernels.nonlinear``) and
    known jumps and kinks split quadrature there.  ``smooth`` defaults to whether
    any were found; ``smooth=True`` for a function with jumps or kinks is an error.

    ``closed_forms`` may give any of ``vt``, ``dvt``, ``mean``, ``dmean``, ``deriv``
    (see ``ir.Elementwise``: for a function with jumps ``dvt``, ``dmean`` and
    ``deriv`` are of the a.e. derivative); missing moments are evaluated by
    quadrature.
    """
    allowed = {"vt", "dvt", "mean", "dmean", "deriv"}
    unknown = set(closed_forms) - allowed
    if unknown:
        raise ValueError(f"register_elementwise: unknown closed forms {sorted(unknown)}; valid: {sorted(allowed)}")
    if not callable(fn):
        raise TypeError(f"register_elementwise: fn must be a callable elementwise function, got {fn!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_elementwise: name must be a non-empty string, got {name!r}")
    if fn in _FUNCTIONS:
        raise ValueError(f"register_elementwise: {fn!r} already resolves to a nonlinearity")
    if name in ELEMENTWISE:
        raise ValueError(f"an elementwise nonlinearity named {name!r} is already registered")
    where = f"register_elementwise({name!r})"
    _check_elementwise(fn, where)
    entry = Elementwise(name=name, fn=fn, **closed_forms)
    found = _breaks(fn, where, "fn")
    kinks = [t for t, _ in _breaks(entry.derivative, where, "its derivative (autograd, or deriv=)")]
    found_at = [t for t, _ in found]
    at = found if jumps is None else _declared(fn, where, jumps, found_at)
    breaks = tuple(sorted({t for t, _ in at} | set(kinks)))
    if smooth and breaks:
        what = [f"a jump at {t:g} (by {size:g})" for t, size in at] + \
            [f"a kink at {t:g}" for t in kinks if t not in found_at]
        raise ValueError(f"{where}: smooth=True, but fn has {', '.join(what)}; "
                         "leave smooth= out (it is then found) or pass smooth=False")
    entry = dataclasses.replace(entry, smooth=not breaks if smooth is None else bool(smooth),
                                jumps=bool(at), breaks=breaks)
    activation(entry, functions=(fn,))
    leaf_function(fn)
    return entry


# A user nonlinearity is checked on a grid of cells of 1e-3 on [-12, 12].  A jump of
# size s makes a cell's change differ by about s from its neighbours' (a smooth
# function's by h^2 |f''| ~ 1e-6 |f''|, whatever its slope); the _CANDIDATES cells
# that differ most are bisected 64 times towards where fn changes most.  A jump
# keeps its size as a cell shrinks to adjacent floats; a continuous function's
# change vanishes there (below 1e-9 of its range unless its slope exceeds ~1e5 of it).
_SCAN, _CELLS, _CANDIDATES, _BISECTIONS, _MAX_BREAKS = 12.0, 24000, 256, 64, 64


def _grid() -> Tensor:
    return torch.linspace(-_SCAN, _SCAN, _CELLS + 1, dtype=_F64)


def _check_elementwise(fn, where):
    """``fn`` maps float64 tensors to float64 tensors of the same shape, elementwise and finite."""
    x = _grid()
    try:
        y = fn(x)
        y2 = fn(x[:-1].reshape(2, -1))
    except Exception as e:
        raise ValueError(f"{where}: fn(x) failed for a float64 tensor x: {type(e).__name__}: {e}") from e
    for xi, yi in ((x, y), (x[:-1].reshape(2, -1), y2)):
        if not isinstance(yi, Tensor) or yi.shape != xi.shape or yi.dtype != _F64:
            got = (f"{yi.dtype} tensor of shape {tuple(yi.shape)}" if isinstance(yi, Tensor)
                   else type(yi).__name__)
            raise ValueError(f"{where}: fn must map a float64 tensor to a float64 tensor of the same shape "
                             f"(for x of shape {tuple(xi.shape)} it returned a {got}); "
                             "write comparisons as e.g. (x > 0).to(x.dtype)")
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where}: fn returns {float(y[i])} at x = {float(x[i]):g}; a nonlinearity must be "
                         "finite on the whole real line (the Gaussian expectations integrate over all of it)")
    if not torch.allclose(y2.reshape(-1), y[:-1], rtol=1e-12, atol=1e-12):
        raise ValueError(f"{where}: fn is not elementwise (fn(x.reshape(2, -1)) differs from fn(x) reshaped)")


def _breaks(f, where, what):
    """``[(t, f(t+) - f(t-))]``: where ``f`` jumps on [-12, 12] (see ``_SCAN``)."""
    x = _grid()
    try:
        y = f(x)
        d = y[1:] - y[:-1]
        before, after = torch.cat([d[:1], d[:-1]]), torch.cat([d[1:], d[-1:]])
        cells = (d - 0.5 * (before + after)).abs().topk(_CANDIDATES).indices.sort().values
        lo, hi, ylo, yhi = x[cells], x[cells + 1], y[cells], y[cells + 1]
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            ym = f(mid)
            first = (ym - ylo).abs() >= (yhi - ym).abs()       # the first half changes more
            lo, ylo = torch.where(first, lo, mid), torch.where(first, ylo, ym)
            hi, yhi = torch.where(first, mid, hi), torch.where(first, ym, yhi)
    except Exception as e:
        raise ValueError(f"{where}: evaluating {what} failed: {type(e).__name__}: {e}") from e
    size = yhi - ylo
    found = (size.abs() > 1e-9 * (1.0 + float(y.abs().max()))).nonzero().flatten().tolist()
    if len(found) > _MAX_BREAKS:
        raise ValueError(f"{where}: {what} is discontinuous at more than {_MAX_BREAKS} points of [-12, 12] (e.g. it "
                         "rounds, or computes in float32): compute in float64, or register a smooth function")
    groups: list = []          # a break at a grid point shows in both cells beside it: merge
    for i in found:
        a, b, sz = float(lo[i]), float(hi[i]), float(size[i])
        if groups and a - groups[-1][1] <= 1e-9 * max(1.0, abs(a)):
            groups[-1] = (groups[-1][0], b, groups[-1][2] + sz)
        else:
            groups.append((a, b, sz))
    return [(_round(a, b), sz) for a, b, sz in groups if abs(sz) > 1e-9 * (1.0 + float(y.abs().max()))]


def _round(a: float, b: float) -> float:
    """The shortest decimal in ``[a, b]`` (``0.7`` rather than ``0.7000000000000001``)."""
    mid = 0.5 * (a + b)
    for digits in range(17):
        t = round(mid, digits)
        if a <= t <= b:
            return t + 0.0      # no -0.0
    return mid


def _jump_at(fn, t: float) -> float:
    """``fn(t+) - fn(t-)``, read at ``t +- 1e-12 max(1, |t|)`` (as ``kernels.nonlinear.jump_mass``)."""
    d = 1e-12 * max(1.0, abs(t))
    y = fn(torch.tensor([t + d, t - d], dtype=_F64))
    return float(y[0] - y[1])


def _declared(fn, where, jumps, found_at):
    """The declared jumps as ``[(t, size)]``, checked against ``fn`` and against those found."""
    if isinstance(jumps, (bool, str)) or not isinstance(jumps, Sequence):
        raise TypeError(f"{where}: jumps must be a sequence of locations t or of (t, size) pairs, "
                        f"or () for none; got {jumps!r}")
    out = []
    for item in jumps:
        pair = isinstance(item, Sequence) and not isinstance(item, str)
        try:
            t, size = (float(item[0]), float(item[1])) if pair and len(item) == 2 else (float(item), None)
        except (TypeError, ValueError):
            t = size = math.nan
        if not math.isfinite(t) or (size is not None and not math.isfinite(size)):
            raise TypeError(f"{where}: a jump must be a location t or a (t, size) pair of numbers, got {item!r}")
        measured = _jump_at(fn, t)
        if abs(measured) <= 1e-9 * max(1.0, abs(measured)):
            raise ValueError(f"{where}: jumps declares a jump at {t:g}, but fn does not jump there "
                             f"(fn(t+) - fn(t-) = {measured:g})")
        if size is not None and abs(measured - size) > 1e-6 * max(1.0, abs(size)):
            raise ValueError(f"{where}: jumps declares a jump of {size:g} at {t:g}, but fn jumps by {measured:g}")
        out.append((t, measured if size is None else size))
    missing = [t for t in found_at if all(abs(t - d) > 1e-6 * max(1.0, abs(t)) for d, _ in out)]
    if missing:
        raise ValueError(f"{where}: fn also jumps at {', '.join(f'{t:g}' for t in missing)}: declare every "
                         "jump in jumps= (or leave jumps= out to have them found)")
    return sorted(out)


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


def _may_be_zero(k) -> bool:
    """Whether a variance array has a 0: one reduction, no boolean temporary (a self
    kernel's variance arrays are as large as its pair arrays)."""
    return k.numel() > 0 and not bool(k.amin() > 0)


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
            if getattr(out, "variances_positive", False):
                return out          # a fused rule saw every variance positive (kernels/fused.py)
            # one reduction per variance array decides; full-size work only if needed
            # (always, branch-free, under torch.compile)
            if compiling() or _may_be_zero(k11):
                out = torch.where(k11 == 0, at0 * pinned_mean(k22), out)
            if compiling() or _may_be_zero(k22):
                out = torch.where(k22 == 0, at0 * pinned_mean(k11), out)
            return out

        if getattr(moment, "fused_rule", None):    # a fused program computes it (kernels/program.py),
            pinned.fused_rule = moment.fused_rule   # falling back to this function where a variance is 0
        return pinned

    mean, dmean = pin1(e.mean, phi0), pin1(e.dmean, dphi0)
    return dataclasses.replace(
        e, vt=pin2(e.vt, mean, phi0), dvt=pin2(e.dvt, dmean, dphi0), mean=mean, dmean=dmean,
        vt_angle=pin2(e.vt_angle, mean, phi0), dvt_angle=pin2(e.dvt_angle, dmean, dphi0),
    )


PI = math.pi
INV_2PI = 1.0 / (2.0 * math.pi)   # the arc-cosine rules multiply by it (a division costs more)
SQRT_2PI = math.sqrt(2.0 * math.pi)
