"""What the infinite-width simulation and the finite-width harness share.

Losses (value and gradient as PyTorch computes them on a batch), the minibatch
schedule, and the checks on inputs, targets, learning rates, kernels and memory:
``dynamics.simulate`` and ``harness.train_finite`` must see the same batches and
the same loss for the gap between them to measure width alone.  (The stability
bounds they share are in ``stability``.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import KernelNotPSDError, NonFiniteInputError
from .resources import physical_memory

_DTYPE = torch.float64

# Eigenvalues below -_PSD_RTOL * lam_max mean the kernel is not PSD; smaller
# negative ones are rounding and are clamped to zero.
_PSD_RTOL = 1e-8


# ---------------------------------------------------------------------------
# Losses: one entry per name, value and gradient side by side.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss:
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # dL/df for the loss on a batch, (B, out) -> (B, out); None: use autograd.
    grad: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def _mse_grad(f, y):
    # F.mse_loss averages over every entry: d/df mean((f - y)^2) = 2 (f - y) / (B * out).
    return 2.0 * (f - y) / f.numel()


def _cross_entropy_grad(f, y):
    # Mean over the batch of -log softmax(f)[y]: (softmax(f) - onehot(y)) / B.
    p = torch.softmax(f, dim=1)
    p[torch.arange(f.shape[0]), y] -= 1.0
    return p / f.shape[0]


_LOSSES = {
    "mse": Loss(F.mse_loss, _mse_grad),
    "cross_entropy": Loss(F.cross_entropy, _cross_entropy_grad),
}


def _autograd_loss(fn) -> Loss:
    def grad(f, y):
        f = f.detach().clone().requires_grad_(True)
        value = fn(f, y)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise ValueError(f"simulate: the loss callable must return a scalar tensor, got {value!r}")
        (g,) = torch.autograd.grad(value.reshape(()), f, allow_unused=True)
        return torch.zeros_like(f) if g is None else g.detach()

    return Loss(fn, grad)


def resolve_loss(loss) -> tuple[str, Loss]:
    if callable(loss):
        return "callable", _autograd_loss(loss)
    if isinstance(loss, str) and loss in _LOSSES:
        return loss, _LOSSES[loss]
    raise ValueError(f"simulate: unknown loss {loss!r}; valid names are {sorted(_LOSSES)}, or pass a callable loss(f_batch, y_batch)")


# ---------------------------------------------------------------------------
# Batches, inputs and targets
# ---------------------------------------------------------------------------


def loss_value(fn, f, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.as_tensor(fn(f, y), dtype=_DTYPE).reshape(())

def batch_schedule(n, steps, batch_size, batches, seed) -> list[torch.Tensor]:
    if batches is not None and batch_size is not None:
        raise ValueError("simulate: pass batches or batch_size, not both")
    if batches is not None:
        batches = list(batches)
        if len(batches) != steps:
            raise ValueError(f"simulate: len(batches) = {len(batches)} but steps = {steps}; give one index tensor per step")
        schedule = []
        for t, idx in enumerate(batches):
            idx = torch.as_tensor(idx)
            if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.numel() == 0:
                raise ValueError(f"simulate: batches[{t}] must be a non-empty 1-D integer index tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"simulate: batches[{t}] has indices outside [0, {n}) (min {int(idx.min())}, max {int(idx.max())})")
            schedule.append(idx.long())
        return schedule
    full = torch.arange(n)
    if batch_size is None:
        return [full] * steps
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"simulate: batch_size must be a positive int, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    schedule = []
    while len(schedule) < steps:
        perm = torch.randperm(n, generator=gen)
        schedule.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return schedule[:steps]

def check_finite(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() or x.is_complex():
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError(f"{name} contains non-finite values (NaN or inf)")

def check_shape(x: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")

def as_input(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a leading batch axis, got a scalar")
    check_finite(x, name)
    return x

def as_targets(y, n: int, loss_name: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"y_train has {y.shape[0] if y.ndim else 0} rows but x_train has {n}")
    check_finite(y, "y_train")
    if loss_name == "cross_entropy":
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y_train for 'cross_entropy' must be int64 class indices of shape (N,), got shape {tuple(y.shape)} dtype {y.dtype}")
        if len(y) and int(y.min()) < 0:
            raise ValueError("y_train for 'cross_entropy' has negative class indices")
        return y.long()
    if y.is_floating_point():
        y = y.to(_DTYPE)
        return y.unsqueeze(1) if y.ndim == 1 else y
    if loss_name == "mse":
        raise ValueError(f"y_train for 'mse' must be floating point, got {y.dtype}")
    return y


def check_trajectory_size(steps: int, rows: int, out: int) -> None:
    need = (steps + 1) * rows * out * torch.finfo(_DTYPE).bits // 8
    have = physical_memory()
    if have is not None and need > have:
        raise ValueError(
            f"simulate: the trajectory would take {need / 2**30:.4g} GiB ((steps + 1) x (N_train + N_test) x out = "
            f"{steps + 1} x {rows} x {out} float64) but this machine has {have / 2**30:.4g} GiB of memory; "
            f"use fewer steps, test points or outputs (check the class indices of y_train)"
        )


# ---------------------------------------------------------------------------
# Checks shared by the entry points of the dynamics.
# ---------------------------------------------------------------------------


def psd_eigh(k: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix; tiny negative eigenvalues clamped."""
    scale = float(k.abs().max()) if k.numel() else 0.0
    asym = float((k - k.T).abs().max()) if k.numel() else 0.0
    if asym > _PSD_RTOL * max(scale, 1e-300):
        raise KernelNotPSDError(f"{what} is not symmetric (max |K - K^T| = {asym:.3g}, max |K| = {scale:.3g}); the kernel function is inconsistent")
    lam, vecs = torch.linalg.eigh(0.5 * (k + k.T))
    if lam.numel():
        lam_max = max(float(lam.max()), 0.0)
        lam_min = float(lam.min())
        if lam_min < -_PSD_RTOL * max(lam_max, 1e-300):
            raise KernelNotPSDError(
                f"{what} is not positive semidefinite: smallest eigenvalue {lam_min:.3g} "
                f"(largest {lam_max:.3g}, tolerance {_PSD_RTOL:g} * largest); check the kernel "
                f"rules (a quadrature or Monte Carlo rule may be too coarse)"
            )
    return lam.clamp_min(0.0), vecs


def check_lr(lr) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite positive number, got {lr}")
    return lr


def check_ridge(ridge, what: str) -> float:
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{what}: ridge must be finite and >= 0, got {ridge}")
    return ridge
