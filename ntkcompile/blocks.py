"""Kernel blocks: the NTK and NNGP blocks on train and test points that the dynamics
(``ntkcompile.dynamics``) evaluate, computed once and reused.

For a model with a readout at every position (``kfn.output_positions``, e.g. a
per-step readout of a sequence) the kernels are ``(N1, N2, *P, *P)``; the blocks
flatten them to rows and columns ``(input, position)``, input-major:
``(N |P|, N |P|)``, the layout in which every output of every input is one row of
the recursion.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import torch

from .training import as_input, check_finite, check_shape, psd_eigh

__all__ = ["KernelBlocks", "kernel_blocks"]

_DTYPE = torch.float64


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """The kernel blocks the dynamics need (per-output factors, float64).

    Fields (``N`` train points, ``M`` test points; ``None`` when not computed):

    * ``ntk_train``: NTK(train, train), ``(N, N)``.
    * ``ntk_test_train``: NTK(test, train), ``(M, N)``; ``None`` without test points.
    * ``nngp_train``, ``nngp_test_train``, ``nngp_test``: NNGP(train, train),
      NNGP(test, train), NNGP(test, test); needed only for the prior over
      ``f_0`` (``simulate(f0="prior")`` and :func:`mse_ensemble`).

    Build it with :func:`kernel_blocks` or directly from tensors. The
    eigendecomposition of ``ntk_train`` is computed on first use and cached.
    """

    ntk_train: torch.Tensor
    ntk_test_train: Optional[torch.Tensor] = None
    nngp_train: Optional[torch.Tensor] = None
    nngp_test_train: Optional[torch.Tensor] = None
    nngp_test: Optional[torch.Tensor] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            value = torch.as_tensor(value).to(_DTYPE)
            check_finite(value, field.name)
            object.__setattr__(self, field.name, value)
        n = self.n_train
        check_shape(self.ntk_train, (n, n), "ntk_train")
        m = None if self.ntk_test_train is None else self.ntk_test_train.shape[0]
        if self.ntk_test_train is not None:
            check_shape(self.ntk_test_train, (m, n), "ntk_test_train")
        if self.nngp_train is not None:
            check_shape(self.nngp_train, (n, n), "nngp_train")
        if m is not None and self.nngp_train is not None:
            for name, shape in (("nngp_test_train", (m, n)), ("nngp_test", (m, m))):
                if getattr(self, name) is None:
                    raise ValueError(f"KernelBlocks: nngp_train is given with test points, so {name} is needed too")
                check_shape(getattr(self, name), shape, name)

    @property
    def n_train(self) -> int:
        return self.ntk_train.shape[0]

    @property
    def n_test(self) -> Optional[int]:
        return None if self.ntk_test_train is None else self.ntk_test_train.shape[0]

    @functools.cached_property
    def ntk_train_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lam, V)`` with ``ntk_train = V diag(lam) V^T``, ``lam >= 0`` (clamped)."""
        return psd_eigh(self.ntk_train, "NTK(train, train)")


def kernel_blocks(kfn, x_train, x_test=None, *, get: Sequence[str] = ("ntk",)) -> KernelBlocks:
    """Evaluate ``kfn`` on the blocks the dynamics need, one call per block.

    ``get`` is ``("ntk",)`` or ``("nngp", "ntk")``. Calls
    ``kfn(x_train, get=get)``, ``kfn(x_test, x_train, get=get)`` and, when
    ``"nngp"`` is asked for, ``kfn(x_test, get=("nngp",))``; a kernel sampled jointly
    (``kfn._joint``: gated recurrent layers) is one call on train and test points
    together.  A readout at every position gives blocks over rows ``(input,
    position)``, input-major (``N |P|`` rows): the closed forms then take targets
    flattened the same way, ``y.reshape(N * |P|, out)``.
    """
    get = tuple(get)
    unknown = set(get) - {"nngp", "ntk"}
    if "ntk" not in get or unknown:
        raise ValueError(f"kernel_blocks: get must be ('ntk',) or ('nngp', 'ntk'), got {get}")
    x_train = as_input(x_train, "x_train")
    x_test = None if x_test is None else as_input(x_test, "x_test")
    fields = _blocks(kfn, x_train, x_test, get)
    h = len(_output_positions(kfn))
    if h:      # a readout at every position: blocks over (input, position) rows, input-major
        fields = {name: _rows(k, h) for name, k in fields.items()}
    return KernelBlocks(**fields)


def _output_positions(kfn) -> tuple:
    """The positions of a readout at every position (``kfn.output_positions``), or ()."""
    return tuple(getattr(kfn, "output_positions", None) or ())


def _rows(k: torch.Tensor, h: int) -> torch.Tensor:
    """``(N1, N2, *P, *P)`` (``h`` position axes each) -> ``(N1 |P|, N2 |P|)``, rows and
    columns ``(input, position)`` input-major."""
    k = k.permute(0, *range(2, 2 + h), 1, *range(2 + h, 2 + 2 * h))
    return k.reshape(k.shape[0] * math.prod(k.shape[1:1 + h]), -1)


def _blocks(kfn, x_train, x_test, get) -> dict:
    want_nngp = "nngp" in get
    if x_test is not None and getattr(kfn, "_joint", False):
        return _joint_blocks(kfn, x_train, x_test, get)
    train = kfn(x_train, None, get=get)
    fields = {"ntk_train": train.ntk}
    if want_nngp:
        fields["nngp_train"] = train.nngp
    if x_test is not None:
        cross = kfn(x_test, x_train, get=get)
        fields["ntk_test_train"] = cross.ntk
        if want_nngp:
            fields["nngp_test_train"] = cross.nngp
            fields["nngp_test"] = kfn(x_test, None, get=("nngp",)).nngp
    return fields


def _joint_blocks(kfn, x_train, x_test, get) -> dict:
    """A kernel sampled jointly over its inputs (gated recurrent layers): one kernel of
    train and test points together, cut into blocks, so that all blocks come from the
    same samples (jointly PSD) and no pair is sampled twice."""
    n = x_train.shape[0]
    joint = getattr(kfn, "joint_inputs", None)      # harness: the same tensor for every run of a sweep
    both = kfn(joint(x_train, x_test) if joint else torch.cat([x_train, x_test.to(x_train.dtype)]), None, get=get)
    fields = {"ntk_train": both.ntk[:n, :n], "ntk_test_train": both.ntk[n:, :n]}
    if "nngp" in get:
        fields.update(nngp_train=both.nngp[:n, :n], nngp_test_train=both.nngp[n:, :n], nngp_test=both.nngp[n:, n:])
    return fields
