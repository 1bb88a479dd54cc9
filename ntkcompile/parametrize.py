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
        W_std: weight standard deviation multiplier.
        b_std: bias multiplier (unused when the module has no bias).
        fan_in: ``in_features``, or ``in_channels / groups * prod(kernel_size)``.
        has_bias: whether the module has a bias.
    """

    W_std: float
    b_std: float
    fan_in: int
    has_bias: bool

    @property
    def weight_scale(self) -> float:
        """The factor ``W_std / sqrt(fan_in)`` applied to the stored N(0, 1) weight."""
        return self.W_std / math.sqrt(self.fan_in)

    @property
    def bias_scale(self) -> float:
        """The factor ``b_std`` applied to the stored N(0, 1) bias."""
        return self.b_std


class _Scale(nn.Module):
    """Parametrization ``t -> scale * t`` with a constant Python-float scale."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale * t

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


def _fan_in(module: nn.Module) -> int:
    # weight is (out_features, in_features) or (out, in/groups, *kernel_size).
    return math.prod(module.weight.shape[1:])


def _check_std(name: str, pair) -> tuple[float, float]:
    try:
        W_std, b_std = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(
            f"std[{name!r}] must be a pair (W_std, b_std) of numbers, got {pair!r}"
        ) from None
    if not (math.isfinite(W_std) and W_std > 0):
        raise ValueError(f"W_std must be positive and finite, got {W_std} for {name!r}")
    if not (math.isfinite(b_std) and b_std >= 0):
        raise ValueError(f"b_std must be non-negative and finite, got {b_std} for {name!r}")
    return W_std, b_std


def _label(name: str) -> str:
    return repr(name) if name else "<root module>"


def _check_module(name: str, module: nn.Module) -> bool:
    """Return whether ``module`` gets reparametrized; raise if it cannot be handled."""
    if _P.is_parametrized(module) or isinstance(module, _P.ParametrizationList):
        raise ValueError(
            f"module {_label(name)} ({type(module).__name__}) is already parametrized "
            "with torch.nn.utils.parametrize; pass the plain model to ntk_parametrize"
        )
    if isinstance(module, _PARAMETRIZED):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"module {_label(name)} ({type(module).__name__}) is lazy and not yet "
                "initialized; run one forward pass before ntk_parametrize"
            )
        return True
    if isinstance(module, _NORMS):
        return False
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:
        raise UnsupportedOpError(
            f"ntk_parametrize does not support module {_label(name)} of type "
            f"{type(module).__name__} (it owns parameters {own}); supported are "
            "nn.Linear, nn.Conv1d/2d/3d and normalization layers"
        )
    return False


def ntk_parametrize(
    model: nn.Module,
    W_std: float = 1.0,
    b_std: float = 0.0,
    *,
    std: Mapping[str, tuple[float, float]] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Return a deep copy of ``model`` in NTK parametrization (TP II Sec. 1).

    Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets a fresh N(0, 1) weight ``w``
    used as ``(W_std / sqrt(fan_in)) * w`` and, if it has a bias, a fresh N(0, 1)
    ``beta`` used as ``b_std * beta``. Normalization layers keep PyTorch's init.
    ``model`` itself is not modified.

    Args:
        model: the network. Modules that own parameters other than the above
            (``nn.Embedding``, ``nn.RNN``, ``nn.MultiheadAttention``, ...) raise
            ``NotImplementedError``.
        W_std, b_std: the default constants; ``W_std > 0``, ``b_std >= 0``.
        std: overrides ``{qualified module name: (W_std, b_std)}``, names as in
            ``model.named_modules()`` (``""`` is the root module).
        generator: source of the N(0, 1) draws; the global RNG if ``None``.
            Draws are taken module by module in ``named_modules()`` order,
            weight before bias.

    Returns:
        The parametrized copy. ``ntk_scales(result)`` (also the attribute
        ``result.ntk_scales``) maps each reparametrized module's name to its
        ``NTKScale``.
    """
    default = _check_std("<default>", (W_std, b_std))
    overrides = {name: _check_std(name, pair) for name, pair in (std or {}).items()}

    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    targets = {name: m for name, m in modules.items() if _check_module(name, m)}
    for name in overrides:
        if name not in modules:
            raise ValueError(
                f"std key {name!r} names no module of the model; "
                f"valid keys: {sorted(targets)}"
            )
        if name not in targets:
            raise ValueError(
                f"std key {name!r} names a {type(modules[name]).__name__}, which has "
                f"no NTK-parametrized weight; valid keys: {sorted(targets)}"
            )

    scales: dict[str, NTKScale] = {}
    for name, m in targets.items():
        w_std, bias_std = overrides.get(name, default)
        s = NTKScale(w_std, bias_std, _fan_in(m), m.bias is not None)
        for pname, factor in (("weight", s.weight_scale), ("bias", s.bias_scale)):
            p = getattr(m, pname)
            if p is None:
                continue
            with torch.no_grad():
                dev = p.device if generator is None else generator.device
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=dev))
            _P.register_parametrization(m, pname, _Scale(factor))
        scales[name] = s
    net.ntk_scales = scales
    return net


def ntk_scales(model: nn.Module) -> dict[str, NTKScale]:
    """The ``NTKScale`` of every module reparametrized by ``ntk_parametrize``."""
    scales = getattr(model, "ntk_scales", None)
    if not isinstance(scales, dict):
        raise ValueError("model was not produced by ntk_parametrize")
    return dict(scales)
