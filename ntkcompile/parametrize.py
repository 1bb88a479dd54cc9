"""NTK parametrization of an ordinary PyTorch module.

In the NTK parametrization (TP II Sec. 1, as in TP IIb and neural-tangents) every
trainable weight is stored as a standard-normal tensor ``w`` and used as

    W = (W_std / sqrt(fan_in)) * w,          w_ij ~ N(0, 1),

and every bias as ``b = b_std * beta`` with ``beta_i ~ N(0, 1)``. Gradients are
taken with respect to ``w`` and ``beta``, so a weight contributes
``W_std^2 * (...)`` and a bias ``b_std^2 * (...)`` to the NTK, and plain SGD on the
stored parameters is the training whose infinite-width limit TP IIb describes.

``ntk_parametrize`` realizes this with ``torch.nn.utils.parametrize``: the stored
parameter (``<module>.parametrizations.weight.original``) is the N(0, 1) draw and
a constant-scale parametrization multiplies it on every access. The result is an
ordinary ``nn.Module``: ``torch.func.functional_call``, ``torch.optim`` and
``state_dict`` all see the N(0, 1) tensors.

Recurrent modules (``nn.RNN/GRU/LSTM`` and their ``*Cell``s) keep torch's own
module and fused kernels. Each ``weight_ih_l{k}[_reverse]`` / ``weight_hh_l{k}[...]``
(``weight_ih`` / ``weight_hh`` for a cell) is its own weight: ``fan_in`` is its
number of columns (the layer's input size, or ``hidden_size``), and its gate blocks
(rows, in torch's order) may have their own ``W_std``. ``nn.RNNBase`` keeps
references to its weights in ``_flat_weights``; since torch 2.1 its ``forward``
refreshes them when ``getattr`` returns a different tensor
(``_update_flat_weights``), which a parametrization always does, so the forward,
``functional_call`` and ``jacrev`` all go through the scaled weights. (On CPU
``flatten_parameters`` does nothing; cuDNN's flattened buffer is untested here.)

``nn.Embedding`` rows are ``W_std * w`` (no fan-in factor: one row is read per
token), as ``ops/embedding.py`` takes them; a ``padding_idx`` row is zero, as
PyTorch initializes it, and its gradient is zero, so it stays zero.
``torch.func.vmap`` has no batching rule for torch's fused RNN ops when the
module creates its own zero initial state: differentiate whole batches
(``empirical_ntk(..., per_example=False)``) or pass a batched ``hx``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize as _P

from .errors import UnsupportedOpError

__all__ = ["NTKScale", "ntk_parametrize", "ntk_scales"]

# Modules whose weight is reparametrized: one fan-in rule covers all of them,
# because PyTorch stores their weight as (out, in/groups, *kernel_size).
_PARAMETRIZED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Embedding tables: rows W_std * w, fan-in 1 (ops/embedding.py).
_EMBEDDINGS = (nn.Embedding,)

# Recurrent modules: several weights each, named ``weight_<entry>`` / ``bias_<entry>``.
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)

# Normalization layers keep PyTorch's init (gain 1, shift 0) and train as they
# are (TP II Sec. 5: elementwise affine parameters contribute like biases).
_NORMS = tuple(
    t
    for t in (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
        nn.LocalResponseNorm,
    )
    if t is not None
)


@dataclass(frozen=True)
class NTKScale:
    """The NTK-parametrization constants of one module.

    Attributes:
        W_std: weight standard deviation multiplier; for a recurrent weight a
            tuple with one value per gate (torch's gate order) when they differ.
        b_std: bias multiplier (unused when the module has no bias); per gate
            like ``W_std``.
        fan_in: ``in_features``, ``in_channels / groups * prod(kernel_size)``,
            a recurrent weight's number of columns, or 1 for an embedding table.
        has_bias: whether the module has a bias.
    """

    W_std: float | tuple[float, ...]
    b_std: float | tuple[float, ...]
    fan_in: int
    has_bias: bool

    @property
    def weight_scale(self) -> float | tuple[float, ...]:
        """The factor ``W_std / sqrt(fan_in)`` applied to the stored N(0, 1) weight."""
        if isinstance(self.W_std, tuple):
            return tuple(w / math.sqrt(self.fan_in) for w in self.W_std)
        return self.W_std / math.sqrt(self.fan_in)

    @property
    def bias_scale(self) -> float | tuple[float, ...]:
        """The factor ``b_std`` applied to the stored N(0, 1) bias."""
        return self.b_std


class _Scale(nn.Module):
    """Parametrization ``t -> scale * t`` with a constant Python-float scale, or one
    scale per equal block of rows (the gates of a recurrent weight)."""

    def __init__(self, scale: float | tuple[float, ...]):
        super().__init__()
        self.scale = tuple(map(float, scale)) if isinstance(scale, tuple) else float(scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(self.scale, float):
            return self.scale * t
        rows = torch.tensor(self.scale, dtype=t.dtype, device=t.device)
        rows = rows.repeat_interleave(t.shape[0] // len(self.scale))
        return rows.reshape(-1, *(1,) * (t.ndim - 1)) * t

    def extra_repr(self) -> str:
        if isinstance(self.scale, float):
            return f"scale={self.scale:.6g}"
        return "scale=(" + ", ".join(f"{v:.6g}" for v in self.scale) + ")"


def _number(v) -> float:
    if isinstance(v, (str, bytes)):
        raise TypeError
    return float(v)


def _values(v, gates: int | None) -> float | tuple[float, ...]:
    """A number, or (for a recurrent weight, ``gates`` given) a tuple or list with one
    number per gate."""
    if gates is None or not isinstance(v, (tuple, list)):
        return _number(v)
    vals = tuple(_number(x) for x in v)
    if len(vals) != gates:
        raise TypeError
    return vals if len(set(vals)) > 1 else vals[0]


def _check_std(name: str, pair, gates: int | None = None):
    try:
        W_std, b_std = pair
        W_std, b_std = _values(W_std, gates), _values(b_std, gates)
    except (TypeError, ValueError):
        what = "numbers" if gates is None else f"numbers or sequences of {gates} numbers (one per gate)"
        raise ValueError(
            f"std[{name!r}] must be a pair (W_std, b_std) of {what}, got {pair!r}"
        ) from None
    flat = lambda v: v if isinstance(v, tuple) else (v,)
    if not all(math.isfinite(w) and w > 0 for w in flat(W_std)):
        raise ValueError(f"W_std must be positive and finite, got {W_std} for {name!r}")
    if not all(math.isfinite(b) and b >= 0 for b in flat(b_std)):
        raise ValueError(f"b_std must be non-negative and finite, got {b_std} for {name!r}")
    return W_std, b_std


def _label(name: str) -> str:
    return repr(name) if name else "<root module>"


def _check_module(name: str, module: nn.Module, biases=frozenset()) -> bool:
    """Return whether ``module`` gets reparametrized; raise if it cannot be handled
    (parameters named in ``biases`` are drawn and scaled by ``ntk_parametrize`` itself)."""
    if _P.is_parametrized(module) or isinstance(module, _P.ParametrizationList):
        raise ValueError(
            f"module {_label(name)} ({type(module).__name__}) is already parametrized "
            "with torch.nn.utils.parametrize; pass the plain model to ntk_parametrize"
        )
    if isinstance(module, _RECURRENT):
        if getattr(module, "proj_size", 0):
            raise UnsupportedOpError(
                f"ntk_parametrize does not support module {_label(name)} ({type(module).__name__}) "
                f"with proj_size={module.proj_size}: its projected state has no NTK-parametrized "
                "rule here; use proj_size=0"
            )
        if isinstance(module, nn.RNNBase) and not hasattr(module, "_update_flat_weights"):
            raise UnsupportedOpError(
                f"module {_label(name)} ({type(module).__name__}): this torch ({torch.__version__}) "
                "does not refresh an RNN's flat weights from parametrizations; use torch >= 2.1"
            )
        return True
    if isinstance(module, _PARAMETRIZED):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"module {_label(name)} ({type(module).__name__}) is lazy and not yet "
                "initialized; run one forward pass before ntk_parametrize"
            )
        return True
    if isinstance(module, _EMBEDDINGS):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedOpError(
                f"ntk_parametrize does not support module {_label(name)} (Embedding) with max_norm, "
                "scale_grad_by_freq or sparse: renormalized rows and count-scaled gradients have no "
                "NTK-parametrized rule here"
            )
        return True
    if isinstance(module, _NORMS):
        return False
    own = [n for n, _ in module.named_parameters(recurse=False) if (f"{name}.{n}" if name else n) not in biases]
    if own:
        raise UnsupportedOpError(
            f"ntk_parametrize does not support module {_label(name)} of type "
            f"{type(module).__name__} (it owns parameters {own}); supported are "
            "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.RNN/GRU/LSTM and their cells, and normalization layers"
        )
    return False


def ntk_parametrize(
    model: nn.Module,
    W_std: float = 1.0,
    b_std: float = 0.0,
    *,
    std: Mapping[str, tuple[float, float]] | None = None,
    generator: torch.Generator | None = None,
    biases=(),
) -> nn.Module:
    """Return a deep copy of ``model`` in NTK parametrization (TP II Sec. 1).

    Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets a fresh N(0, 1) weight ``w``
    used as ``(W_std / sqrt(fan_in)) * w`` and, if it has a bias, a fresh N(0, 1)
    ``beta`` used as ``b_std * beta``. So does every weight of ``nn.RNN``,
    ``nn.GRU``, ``nn.LSTM`` (any ``num_layers``, ``bias``, ``bidirectional``,
    ``batch_first``; ``proj_size > 0`` raises) and ``nn.RNNCell/GRUCell/LSTMCell``:
    ``weight_ih_l{k}[_reverse]`` with ``fan_in`` the layer's input size,
    ``weight_hh_l{k}[_reverse]`` with ``fan_in = hidden_size``, each bias with its
    weight's ``b_std``. ``nn.Embedding`` rows are ``W_std * w`` (fan-in 1; a
    ``padding_idx`` row stays zero). Normalization layers keep PyTorch's init.
    ``model`` itself is not modified.

    Args:
        model: the network. Modules that own parameters other than the above
            (``nn.MultiheadAttention``, ...) raise
            ``NotImplementedError``.
        W_std, b_std: the default constants; ``W_std > 0``, ``b_std >= 0``.
        std: overrides ``{name: (W_std, b_std)}``. A name is a module's, as in
            ``model.named_modules()`` (``""`` is the root module), or one weight of
            a recurrent module, ``"<module>.ih_l0"``, ``"<module>.hh_l1_reverse"``,
            ``"<cell>.hh"`` (its bias goes with it), which wins over its module's
            entry. For recurrent weights ``W_std`` and ``b_std`` may also be
            sequences with one value per gate, in torch's gate order (GRU r, z, n;
            LSTM i, f, g, o).
        biases: qualified names of parameters used directly as biases (``h + self.offset``,
            a positional embedding ``h + self.pos``), as ``compile`` takes them: each
            redrawn N(0, 1) and used as ``b_std * beta``, ``b_std`` from ``std[name]``, else
            ``std[its module]``, else the default (drawn after the modules).
        generator: source of the N(0, 1) draws; the global RNG if ``None``.
            Draws are taken module by module in ``named_modules()`` order,
            weight before bias (a recurrent module's in its own parameter order).

    Returns:
        The parametrized copy. ``ntk_scales(result)`` (also the attribute
        ``result.ntk_scales``) maps each reparametrized module's name, and each
        recurrent weight's name (as in ``std``), to its ``NTKScale``.
    """
    default = _check_std("<default>", (W_std, b_std))

    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    biases = tuple(biases)
    for b in biases:
        try:
            net.get_parameter(b)
        except AttributeError:
            raise ValueError(f"biases: {b!r} names no parameter of the model") from None
    targets = {name: m for name, m in modules.items() if _check_module(name, m, frozenset(biases))}
    entries = {key: e for name, m in targets.items() for key, e in _entries(name, m).items()}
    valid = sorted(set(targets) | set(entries))
    for name in std or {}:
        owners = {b.rpartition(".")[0] for b in biases}
        if name in entries or name in targets or name in biases or name in owners:
            continue
        if name not in modules:
            raise ValueError(f"std key {name!r} names no module of the model; valid keys: {valid}")
        raise ValueError(
            f"std key {name!r} names a {type(modules[name]).__name__}, which has "
            f"no NTK-parametrized weight; valid keys: {valid}"
        )

    for m in targets.values():
        if isinstance(m, nn.RNNBase):
            m.__class__ = _copyable(type(m))
    scales: dict[str, NTKScale] = {}
    for key, (module, name, wname, bname, gates) in entries.items():
        pair = (std or {}).get(key, (std or {}).get(name))
        w_std, bias_std = default if pair is None else _check_std(key, pair, gates)
        weight, bias = getattr(module, wname), getattr(module, bname, None)
        fan_in = 1 if isinstance(module, _EMBEDDINGS) else math.prod(weight.shape[1:])
        scales[key] = s = NTKScale(w_std, bias_std, fan_in, bias is not None)
        for pname, factor in ((wname, s.weight_scale), (bname, s.bias_scale)):
            p = getattr(module, pname, None)
            if p is None:
                continue
            with torch.no_grad():
                dev = p.device if generator is None else generator.device
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=dev))
                if isinstance(module, _EMBEDDINGS) and module.padding_idx is not None:
                    p[module.padding_idx].zero_()
    for key, (module, name, wname, bname, gates) in entries.items():
        s = scales[key]
        _P.register_parametrization(module, wname, _Scale(s.weight_scale))
        if s.has_bias:
            _P.register_parametrization(module, bname, _Scale(s.bias_scale))
    for m in targets.values():
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()      # its forward refreshes them too (module docstring)
    for qual in biases:
        owner, _, pname = qual.rpartition(".")
        pair = (std or {}).get(qual, (std or {}).get(owner))
        _, bias_std = default if pair is None else _check_std(qual, pair)
        p = net.get_parameter(qual)
        with torch.no_grad():
            dev = p.device if generator is None else generator.device
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=dev))
        _P.register_parametrization(net.get_submodule(owner), pname, _Scale(bias_std))
    net.ntk_scales = scales
    return net


def _deepcopy_rnn(self, memo):
    """``copy.deepcopy`` of a parametrized ``nn.RNNBase``: its ``_flat_weights`` hold
    the parametrizations' outputs, which are not graph leaves and cannot be
    deep-copied; the copy rebuilds them from its own parameters."""
    if id(self) in memo:
        return memo[id(self)]
    replica = self.__new__(type(self))
    memo[id(self)] = replica
    state = dict(self.__dict__)
    state["_flat_weights"] = [None] * len(state["_flat_weights"])
    state.pop("_flat_weight_refs", None)
    replica.__dict__ = copy.deepcopy(state, memo)
    replica._init_flat_weights()
    return replica


_COPYABLE: dict[type, type] = {}


def _copyable(cls: type) -> type:
    """``cls`` with ``_deepcopy_rnn``. Set before the parametrizations, so that
    torch's parametrized subclass keeps it (it adds a plain ``__deepcopy__`` only
    where the class has none) and ``remove_parametrizations`` returns to it."""
    if cls not in _COPYABLE:
        _COPYABLE[cls] = type(cls.__name__, (cls,), {"__deepcopy__": _deepcopy_rnn,
                                                    "__module__": cls.__module__})
    return _COPYABLE[cls]


def _entries(name: str, m: nn.Module) -> dict:
    """``{key: (module, module name, weight name, bias name, gates)}`` of one target,
    in the order its parameters are drawn."""
    if not isinstance(m, _RECURRENT):
        return {name: (m, name, "weight", "bias", None)}
    out = {}
    for pname in dict(m.named_parameters(recurse=False)):
        entry = pname.split("_", 1)[1]                     # weight_ih_l0 -> ih_l0
        key = f"{name}.{entry}" if name else entry
        gates = getattr(m, "weight_" + entry).shape[0] // m.hidden_size
        out.setdefault(key, (m, name, "weight_" + entry, "bias_" + entry, gates))
    return out


def ntk_scales(model: nn.Module) -> dict[str, NTKScale]:
    """The ``NTKScale`` of every module reparametrized by ``ntk_parametrize``."""
    scales = getattr(model, "ntk_scales", None)
    if not isinstance(scales, dict):
        raise ValueError("model was not produced by ntk_parametrize")
    return dict(scales)
