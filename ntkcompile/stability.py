"""Stability of training dynamics: bounds on the learning rate, and runs that diverge say so.

* ``MSEStability`` / ``mse_stability``: for SGD on the mean MSE with a frozen
  kernel, the per-batch bound ``lr <= |B| out / lambda_max(K_BB)`` of a batch
  schedule (and the full-batch one ``N out / lambda_max(K)``), shared by
  ``dynamics.simulate`` and ``harness.compare_widths``;
* ``StepWatch``: checks each step of ``simulate`` (non-finite outputs, loss or
  gradient raise ``DivergenceError``; a loss that grows a millionfold warns),
  and words the message with the step, the learning rate, the batch and the bound;
* ``warn_if_unstable``, ``raise_if_overflow``: the same for the closed forms.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional, Sequence

import torch

from .errors import DivergenceError, NonFiniteLossError

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


# ---------------------------------------------------------------------------
# Dynamics that diverge say so.
# ---------------------------------------------------------------------------

# The loss "explodes" above this many times its value at f_0, or above _LOSS_HUGE.
_LOSS_GROWTH = 1e6
_LOSS_HUGE = 1e300


def warn_if_unstable(lr: float, stability: MSEStability, what: str, stacklevel: int = 3) -> None:
    if lr <= stability.limit:
        return
    if stability.full_batch:
        msg = f"{what}: lr = {lr:g} is above the {stability.full_text()}; the residual grows geometrically"
    else:
        msg = (f"{what}: lr = {lr:g} is above the {stability.batch_text()}: a step on that batch amplifies "
               f"part of the residual, so training may diverge (at or below the bound every step is "
               f"non-expansive in the kernel norm of the residual). (The {stability.full_text()} is for "
               f"full-batch steps.)")
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def raise_if_overflow(what: str, times, parts, lr: float, stability: MSEStability) -> None:
    """The discrete closed forms overflow above the stability limit: say so
    instead of returning inf/NaN (``parts``: tensors with time as axis 0)."""
    parts = [p for p in parts if p is not None]
    if all(bool(torch.isfinite(p).all()) for p in parts):
        return
    first = next(i for i in range(len(times)) if not all(bool(torch.isfinite(p[i]).all()) for p in parts))
    s = stability
    rate = abs(1 - lr * 2 * s.lam_max / (s.n * s.out))
    raise DivergenceError(
        f"{what}: the outputs overflow (inf or NaN) at t = {times[first]:g} with lr = {lr:g}: the residual "
        f"grows like |1 - lr * 2 * lambda_max / (N * out)|^t = {rate:.6g}^t. The {s.full_text()}; lower lr "
        f"to at most {s.full:.4g}",
        step=int(times[first]), lr=lr,
    )


def _nonfinite(x) -> str:
    x = torch.as_tensor(x)
    return "nan" if bool(torch.isnan(x).any()) else "inf"


def _max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


@dataclasses.dataclass
class StepWatch:
    """Checks each step of :func:`simulate` and words what went wrong.

    ``check`` costs one sum over the outputs and one scalar test;
    everything else runs only when something is wrong.
    """

    loss_name: str
    lr: float
    n: int
    steps: int
    stability: Optional[MSEStability]
    warned: bool = False

    def check(self, t: int, traj: torch.Tensor, losses: list[float], idx, g) -> None:
        loss, f = losses[t], traj[t]
        # A finite sum means every entry is finite; only a sum that overflows
        # needs the entrywise test.
        if math.isfinite(loss) and (math.isfinite(float(f.sum())) or bool(torch.isfinite(f).all())):
            self._watch_growth(t, loss, losses[0], idx)
            return
        raise self._error(t, traj, loss, idx, g)

    def _watch_growth(self, t: int, loss: float, loss0: float, idx) -> None:
        if self.warned or t == 0:
            return
        if abs(loss) > _LOSS_HUGE or (loss0 != 0 and abs(loss) > _LOSS_GROWTH * abs(loss0)):
            self.warned = True
            warnings.warn(
                f"simulate: the training loss grew from {loss0:.4g} at f_0 to {loss:.4g} at step {t} of "
                f"{self.steps} (more than {_LOSS_GROWTH:.0e} times): the run is diverging. {self._context(idx)}",
                RuntimeWarning,
                stacklevel=4,
            )

    def _where(self, t: int) -> str:
        return "at f_0 (before the first step)" if t == 0 else f"at step {t} of {self.steps}"

    def _batch(self, idx) -> str:
        if idx is None:
            return f"N = {self.n} training points"
        return f"batch size {len(idx)}" + (" (full batch)" if len(idx) == self.n else f" of N = {self.n}")

    def _context(self, idx) -> str:
        """lr, batch size, the stability bound and what to do."""
        head = f"(lr = {self.lr:g}, {self._batch(idx)})"
        s = self.stability
        if s is None:
            what = "a callable loss" if self.loss_name == "callable" else f"loss {self.loss_name!r}"
            return (f"{head} There is no closed-form stability bound for {what}: lower lr (e.g. by 10x) "
                    f"until the loss stops growing")
        bound = s.full_text() if s.full_batch else s.batch_text()
        note = "" if s.full_batch else f" (The {s.full_text()} is for full-batch steps.)"
        if self.lr > s.limit:
            return f"{head} lr is above the {bound}: lower lr to at most {s.limit:.4g}.{note}"
        return (f"{head} lr is within the {bound}, so the outputs were already huge: check the scale of "
                f"y_train and f0 (or lower lr if the kernel is badly conditioned).{note}")

    def _error(self, t: int, traj: torch.Tensor, loss: float, idx, g) -> DivergenceError:
        f = traj[t]
        g_bad = g is not None and not bool(torch.isfinite(g).all())
        rows = traj[t - 1] if g_bad else f  # the outputs the failing value was computed from
        scale0 = _max_abs(traj[0])
        if self.loss_name == "callable" and bool(torch.isfinite(rows).all()):
            # A callable loss that fails at finite outputs is the loss's fault, not lr's,
            # unless the run was visibly diverging already.
            exploded = self.warned or _max_abs(rows) > _LOSS_GROWTH * max(scale0, 1.0)
            if not exploded:
                what = (f"its gradient on the batch of step {t} has {_nonfinite(g)}" if g_bad
                        else f"its value on the training set {self._where(t)} is {loss}")
                at_f0 = "" if t == 0 else f"; at f_0 {scale0:.4g}"
                return NonFiniteLossError(
                    f"simulate: the loss callable returned a non-finite result: {what}, although the outputs "
                    f"are finite (max |f| = {_max_abs(rows):.4g}{at_f0}). Check the loss for log(0), 0/0, "
                    f"sqrt at 0 and the like (lr = {self.lr:g}, {self._batch(idx)})",
                    step=t, lr=self.lr,
                )
        if g_bad:
            what = f"dL/df on the batch overflowed to {_nonfinite(g)} (max |f| = {_max_abs(rows):.4g} before the step)"
        elif not bool(torch.isfinite(f).all()):
            what = f"the outputs became non-finite ({_nonfinite(f)})"
        else:
            what = f"the training loss overflowed to {loss} (the outputs are finite but reach max |f| = {_max_abs(f):.4g})"
        verdict = "the initial outputs are too large" if t == 0 else "the run diverged"
        return DivergenceError(f"simulate: {what} {self._where(t)}: {verdict}. {self._context(idx)}",
                               step=t, lr=self.lr)
