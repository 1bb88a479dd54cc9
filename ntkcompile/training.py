"""What the infinite-width simulation and the finite-width harness share.

Losses (value and gradient as PyTorch computes them on a batch), the minibatch
schedule, the checks on inputs and targets, and the mean-MSE stability bound of
a schedule: ``dynamics.simulate`` and ``harness.train_finite`` must see the same
batches and the same loss for the gap between them to measure width alone, and
both say the same thing when a learning rate is too large.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import NonFiniteInputError

_DTYPE = torch.float64


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


# ---------------------------------------------------------------------------
# Mean-MSE stability of a batch schedule
# ---------------------------------------------------------------------------

# Per-batch eigenvalue work, in units of |B|^3: a quarter of the full N x N
# eigendecomposition simulate already does, or 2^27 (tens of milliseconds),
# whichever is larger; and at most _BOUND_MAX_BATCHES distinct batches. Batches
# are taken in order of first use, so a cut-off checks a prefix of the schedule.
_BOUND_WORK_FLOOR = 2**27
_BOUND_MAX_BATCHES = 4096
# Batches of one size are stacked for eigvalsh in chunks of this many entries.
_BOUND_CHUNK = 2**22


@dataclasses.dataclass(frozen=True)
class MSEStability:
    """Learning-rate bounds for SGD on the mean MSE with a frozen kernel (docs Sec. 6).

    A step on batch ``B`` (``|B|`` counts repeats) maps the train residual
    ``r = f - y`` to ``r - a K E E^T r`` with ``a = lr * 2 / (|B| out)`` and
    ``E`` the ``|B|`` columns of the identity that ``B`` picks. In
    ``u = K^{-1/2} r`` (the kernel norm of the residual, on the range of ``K``)
    this is the symmetric map ``I - a K^{1/2} E E^T K^{1/2}``, whose eigenvalues
    other than 1 are ``1 - a * eig(K_BB)``, ``K_BB = E^T K E``. So every step is
    non-expansive in that norm iff ``lr <= |B| out / lambda_max(K_BB)`` for each
    batch: sufficient for a bounded trajectory in any order of batches, and
    necessary for a batch repeated on its own (full batch:
    ``lr <= N out / lambda_max(K)``, the classic limit).

    Fields: ``full`` the full-batch limit; ``batch`` the smallest per-batch
    bound over the checked batches, attained by a batch of ``batch_size``
    entries with ``lambda_max(K_BB) = batch_lam``, first used at step
    ``batch_step`` (1-based); ``checked`` of ``distinct`` distinct batches were
    checked (see ``_BOUND_WORK_FLOOR``); ``full_batch``: every step uses the
    whole training set once, so ``batch == full``.
    """

    n: int
    out: int
    lam_max: float
    full: float
    batch: float
    batch_size: int
    batch_lam: float
    batch_step: int
    checked: int
    distinct: int
    full_batch: bool

    @property
    def limit(self) -> float:
        """The bound that applies to this schedule."""
        return self.full if self.full_batch else self.batch

    def full_text(self) -> str:
        return (f"full-batch mean-MSE stability limit lr_max = N * out / lambda_max(NTK_train) = "
                f"{self.n} * {self.out} / {self.lam_max:.6g} = {self.full:.6g}")

    def batch_text(self) -> str:
        """The per-batch bound, with where it comes from."""
        if self.checked == self.distinct:
            over = f"the smallest over the {self.distinct} distinct batches of the schedule"
        else:
            over = (f"the smallest over the first {self.checked} of {self.distinct} distinct batches; "
                    f"the rest were not checked, to bound the cost")
        return (f"minibatch mean-MSE stability bound lr <= |B| * out / lambda_max(NTK_BB) = "
                f"{self.batch_size} * {self.out} / {self.batch_lam:.6g} = {self.batch:.6g} "
                f"({over}; that batch is first used at step {self.batch_step})")

    def text(self) -> str:
        """Both bounds as a user reads them (the full-batch one alone for full batch)."""
        if self.full_batch:
            return self.full_text()
        return f"{self.batch_text()}; the {self.full_text()} is for full-batch steps"


def mse_stability(ntk_train: torch.Tensor, lam_max: float, schedule: Sequence[torch.Tensor], out: int) -> MSEStability:
    """:class:`MSEStability` of ``schedule`` (index tensors into the train points).

    ``lam_max`` is ``lambda_max(ntk_train)``, already known to the caller. One
    ``eigvalsh`` per distinct batch (as a multiset of indices), within the
    work cap above; a batch that is the whole training set reuses ``lam_max``.
    """
    n = ntk_train.shape[0]
    whole = tuple(range(n))
    first_use: dict[tuple, tuple[int, torch.Tensor]] = {}
    keys_by_id: dict[int, tuple] = {}  # the schedule repeats tensor objects (full batch)
    for step, idx in enumerate(schedule, 1):
        key = keys_by_id.get(id(idx))
        if key is None:
            key = keys_by_id[id(idx)] = tuple(sorted(idx.tolist()))
        first_use.setdefault(key, (step, idx))
    full = math.inf if lam_max <= 0 else n * out / lam_max
    if not first_use:  # no steps
        return MSEStability(n=n, out=out, lam_max=lam_max, full=full, batch=full, batch_size=n, batch_lam=lam_max,
                            batch_step=0, checked=0, distinct=0, full_batch=True)

    budget = max(n**3 // 4, _BOUND_WORK_FLOOR)
    chosen: list[tuple[int, torch.Tensor, bool]] = []
    for key, (step, idx) in first_use.items():
        cost = 0 if key == whole else len(key) ** 3
        if chosen and (len(chosen) >= _BOUND_MAX_BATCHES or cost > budget):
            break
        budget -= cost
        chosen.append((step, idx, key == whole))

    lams: dict[int, float] = {}
    by_size: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for step, idx, is_whole in chosen:
        if is_whole:
            lams[step] = lam_max
        else:
            by_size.setdefault(len(idx), []).append((step, idx))
    for size, group in by_size.items():
        per_chunk = max(1, _BOUND_CHUNK // size**2)
        for start in range(0, len(group), per_chunk):
            part = group[start : start + per_chunk]
            idx = torch.stack([i for _, i in part])  # (k, |B|)
            kbb = ntk_train[idx[:, :, None], idx[:, None, :]]
            top = torch.linalg.eigvalsh(0.5 * (kbb + kbb.transpose(1, 2)))[:, -1]
            lams.update((step, float(lam)) for (step, _), lam in zip(part, top))

    def bound(size, lam):
        return math.inf if lam <= 0 else size * out / lam

    sizes = {step: len(idx) for step, idx, _ in chosen}
    step = min(lams, key=lambda s: (bound(sizes[s], lams[s]), s))
    return MSEStability(
        n=n, out=out, lam_max=lam_max, full=full, batch=bound(sizes[step], lams[step]),
        batch_size=sizes[step], batch_lam=lams[step], batch_step=step, checked=len(chosen),
        distinct=len(first_use), full_batch=list(first_use) == [whole],
    )
