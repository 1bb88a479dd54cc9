"""Finite-width harness: do real networks follow the infinite-width dynamics?

TP IIb (Theorem 5.3, docs Sec. 6) says that a network in NTK parametrization
trained by SGD has, at every fixed step ``t`` and as width ``n -> infinity``,
outputs ``f_t`` that converge to the kernel recursion :func:`dynamics.simulate`
run with the frozen infinite-width NTK. Started from the network's *own*
initial outputs ``f_0``, the remaining gap comes from the finite-width NTK's
fluctuation around its limit and from its drift during training, both of order
``n^(-1/2)``, so

    gap(n) = max_{t <= T, points, outputs} |f_t(x) - f_t^inf(x)|  ~  C n^(-1/2)

and the least-squares slope of ``log gap`` against ``log n`` is about ``-0.5``
(docs Sec. 7 quotes 0.16, 0.064, 0.030, 0.018 at widths 256 ... 16384 for a
1-hidden-layer ReLU net).

* :func:`train_finite` trains one ``ntk_parametrize``-d copy of ``factory(width)``
  in float64 with ``torch.optim.SGD`` on given batches and records its outputs
  on the train and test points at every step.
* :func:`compare_widths` does that for several widths and seeds, replays the
  *same* batches through :func:`dynamics.simulate` from each network's own
  ``f_0``, and fits the slope.

Batches and losses come from :mod:`ntkcompile.dynamics` itself (its batch
schedule and loss table), so the finite and the infinite run cannot disagree on
what a step is.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .compiled import compile as compile_kernel
from .dynamics import Trajectory, kernel_blocks, simulate
from .errors import DivergenceError, NonFiniteLossError
from .stability import mse_stability
from .training import as_input, as_targets, batch_schedule, loss_value, resolve_loss
from .parametrize import ntk_parametrize

__all__ = ["WidthReport", "compare_widths", "fit_loglog_slope", "train_finite"]

_DTYPE = torch.float64


def fit_loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(widths)``."""
    x = np.log(np.asarray(widths, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64)
    if x.shape != v.shape or x.size < 2:
        raise ValueError(f"need >= 2 (width, value) pairs of equal length, got {x.size} and {v.size}")
    if not np.all((v > 0) & np.isfinite(v)):
        raise ValueError(f"values must be positive and finite, got {list(values)}")
    slope, _ = np.polyfit(x, np.log(v), 1)
    return float(slope)


# ---------------------------------------------------------------------------
# One finite network.
# ---------------------------------------------------------------------------


# Rows per forward pass.  Every step records the outputs on all train and test points; in one
# pass a width-1024 CNN's activations for 300 digits are 160 MB, freshly mapped from the OS at
# every step, which took as long as the arithmetic (system time); in 32-row chunks the memory
# is reused (the demo's CNN sweep ran 2x faster).
_ROWS = 32


def _outputs(net: nn.Module, x: torch.Tensor, whole: bool = False) -> torch.Tensor:
    # One row per example, outputs of any shape flattened (as empirical_ntk does); ``whole``:
    # one pass, for models that couple the examples of a batch.
    if x.shape[0] <= _ROWS or whole:
        return net(x).reshape(x.shape[0], -1)
    return torch.cat([net(x[i:i + _ROWS]).reshape(len(x[i:i + _ROWS]), -1) for i in range(0, x.shape[0], _ROWS)])


def train_finite(
    factory: Callable[[int], nn.Module],
    width: int,
    x_train,
    y_train,
    x_test=None,
    *,
    W_std: float,
    b_std: float,
    loss: Union[str, Callable] = "mse",
    lr: float,
    steps: int,
    batches: Optional[Sequence] = None,
    seed: int = 0,
    std: Optional[Mapping[str, tuple[float, float]]] = None,
    batch_coupled: Optional[bool] = None,
) -> Trajectory:
    """Train ``ntk_parametrize(factory(width))`` with ``torch.optim.SGD(lr=lr)``.

    The copy is float64, with its N(0, 1) parameters drawn from
    ``torch.Generator().manual_seed(seed)``. Step ``t`` minimizes the loss on
    ``x_train[batches[t]]`` exactly as :func:`dynamics.simulate` defines it
    (``"mse"``: ``F.mse_loss``, floating targets, ``(N,)`` read as ``(N, 1)``;
    ``"cross_entropy"``: ``F.cross_entropy`` with int64 class indices; or a
    callable ``loss(f_batch, y_batch)``). ``batches=None`` is full batch.

    Returns a :class:`dynamics.Trajectory` shaped like ``simulate``'s: outputs
    ``(steps + 1, N, out)`` on the train points and ``(steps + 1, M, out)`` on
    the test points, recorded before every step and after the last, and the
    full-train loss at each of them. Index 0 is the network's own ``f_0``.

    Every step checks the recorded outputs and the batch loss (and, for a
    callable loss, the parameter gradients): a NaN or inf raises
    :class:`~ntkcompile.errors.DivergenceError` naming the width, seed, step
    (outputs "at step t" are those after ``t`` steps), lr and batch size, or
    :class:`~ntkcompile.errors.NonFiniteLossError` when a callable loss fails
    at finite outputs.

    ``batch_coupled``: the model couples the examples of a batch (BatchNorm in training
    mode): the train points and the test points are then each evaluated as one batch, as
    ``kfn(x_train)`` and ``kfn(x_test, x_train)`` define them (default: True when a module
    is a BatchNorm that uses batch statistics).
    """
    name, loss_rule = resolve_loss(loss)
    x_train = as_input(x_train, "x_train").to(_DTYPE)
    n = x_train.shape[0]
    y = as_targets(y_train, n, name)
    x_all = x_train if x_test is None else torch.cat([x_train, as_input(x_test, "x_test").to(_DTYPE)])
    if batches is None:
        batches = [torch.arange(n)] * steps
    schedule = batch_schedule(n, steps, None, batches, seed)

    net = ntk_parametrize(
        factory(width).to(_DTYPE), W_std, b_std, std=std, generator=torch.Generator().manual_seed(seed)
    )
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    watch = _FiniteWatch(width=width, seed=seed, lr=lr, n=n, steps=steps, loss_name=name)
    # floating targets (N, *P, out): a readout at every position, outputs kept in that shape
    shape = tuple(y.shape[1:]) if y.is_floating_point() and y.ndim > 2 else None
    if batch_coupled is None:
        batch_coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
                            for m in net.modules())
    whole = bool(batch_coupled)
    outputs = lambda x: _outputs(net, x, whole) if shape is None else _outputs(net, x, whole).reshape(  # noqa: E731
        x.shape[0], *shape)
    # batch-coupled: train and test points each as one batch (else x_all's rows are independent)
    sets = ([x_train, x_all[n:]] if x_all.shape[0] > n else [x_train]) if whole else [x_all]
    every = lambda: torch.cat([outputs(x) for x in sets])  # noqa: E731
    fs = []
    for t, idx in enumerate(schedule):
        with torch.no_grad():
            fs.append(every())
        watch.outputs(t, fs[-1], schedule[t - 1] if t else None)
        opt.zero_grad(set_to_none=True)
        f_batch = outputs(x_train[idx])
        batch_loss = loss_rule.value(f_batch, y[idx])
        watch.batch_loss(t + 1, batch_loss, f_batch.detach(), idx)
        batch_loss.backward()
        if name == "callable":
            watch.gradients(t + 1, net, f_batch.detach(), idx)
        opt.step()
    with torch.no_grad():
        fs.append(every())
    watch.outputs(len(schedule), fs[-1], schedule[-1] if schedule else None)
    traj = torch.stack(fs)
    losses = torch.stack([loss_value(loss_rule.value, f[:n], y) for f in traj])
    watch.losses(losses, traj)
    return Trajectory(
        train=traj[:, :n],
        test=None if x_test is None else traj[:, n:],
        loss=losses,
    )


@dataclasses.dataclass(frozen=True)
class _FiniteWatch:
    """Checks one finite training run; raises :class:`DivergenceError` (or
    :class:`NonFiniteLossError` for a callable loss at finite outputs) naming
    the width, seed, step and lr. Steps count from 1; outputs "at step t" are
    those after ``t`` SGD steps."""

    width: int
    seed: int
    lr: float
    n: int
    steps: int
    loss_name: str

    def _head(self) -> str:
        return f"train_finite: width {self.width}, seed {self.seed}:"

    def _tail(self, idx=None) -> str:
        batch = "" if idx is None else f", batch size {len(idx)} of N = {self.n}"
        loss = "a callable loss" if self.loss_name == "callable" else f"loss {self.loss_name!r}"
        return f"(lr = {self.lr:g}{batch}, {loss})"

    def _diverged(self, t: int, what: str, idx=None) -> DivergenceError:
        if t == 0:
            return DivergenceError(
                f"{self._head()} {what} at initialization, before any step {self._tail()}: check the model "
                f"(factory({self.width})) and its parametrization (W_std, b_std, std)",
                step=0, lr=self.lr,
            )
        bound = ""
        if self.loss_name == "mse":
            bound = (" For the mean MSE the infinite-width dynamics are stable when lr <= |B| * out / "
                     "lambda_max(NTK_BB) for every batch B (dynamics.simulate warns above it); a finite "
                     "network needs some margin below that.")
        return DivergenceError(
            f"{self._head()} {what} at step {t} of {self.steps}: SGD on the finite network diverged "
            f"{self._tail(idx)}. Lower lr.{bound}",
            step=t, lr=self.lr,
        )

    def _bad_loss(self, t: int, what: str, f: torch.Tensor, idx) -> NonFiniteLossError:
        where = f"on the batch of step {t} of {self.steps}" if idx is not None else (
            "on the training set " + ("at initialization" if t == 0 else f"at step {t} of {self.steps}"))
        return NonFiniteLossError(
            f"{self._head()} the loss callable {what} {where}, although the network's outputs are finite "
            f"(max |f| = {float(f.abs().max()):.4g}) {self._tail(idx)}. Check the loss for log(0), 0/0, "
            f"sqrt at 0 and the like",
            step=t, lr=self.lr,
        )

    def outputs(self, t: int, f: torch.Tensor, idx) -> None:
        """``f``: the outputs after ``t`` steps; ``idx``: the batch of step ``t``."""
        if not bool(torch.isfinite(f).all()):
            kind = "nan" if bool(torch.isnan(f).any()) else "inf"
            raise self._diverged(t, f"the network's outputs are non-finite ({kind})", idx)

    def batch_loss(self, t: int, value: torch.Tensor, f_batch: torch.Tensor, idx) -> None:
        value = value.detach()
        if math.isfinite(float(value)):
            return
        if not bool(torch.isfinite(f_batch).all()):  # outputs on the batch only (the recorded ones were finite)
            raise self._diverged(t, "the network's outputs on the batch are non-finite", idx)
        if self.loss_name == "callable":
            raise self._bad_loss(t, f"returned {float(value)}", f_batch, idx)
        raise self._diverged(t, f"the batch loss overflowed to {float(value)} (max |f| = "
                                f"{float(f_batch.abs().max()):.4g})", idx)

    def gradients(self, t: int, net: nn.Module, f_batch: torch.Tensor, idx) -> None:
        # A finite callable loss can still have a non-finite gradient (sqrt at 0).
        for p in net.parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise self._bad_loss(t, "has a non-finite gradient", f_batch, idx)

    def losses(self, losses: torch.Tensor, traj: torch.Tensor) -> None:
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            t = int(bad[0])
            if self.loss_name == "callable":
                raise self._bad_loss(t, f"returned {float(losses[t])}", traj[t, : self.n], None)
            raise self._diverged(t, f"the training loss overflowed to {float(losses[t])}")


# ---------------------------------------------------------------------------
# A sweep over widths against the infinite-width recursion.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WidthReport:
    """Gaps between finite networks and the infinite-width recursion.

    Fields (``W`` widths, ``S`` seeds):

    * ``widths``, ``seeds``: as given.
    * ``gaps``: ``(W, S)`` array; ``gaps[i, j]`` is the max over steps, points
      (train and test) and outputs of ``|f_t - f_t^inf|`` for width
      ``widths[i]`` and seed ``seeds[j]``, ``f^inf`` started at that network's
      own ``f_0``.
    * ``mean_gaps``: ``(W,)`` geometric mean of ``gaps`` over seeds (the mean of
      ``log gap``, which is what the log-log fit sees).
    * ``slope``: least-squares slope of ``log mean_gaps`` against
      ``log widths`` (NaN for a single width); theory: ``-0.5``.
    * ``finite``, ``infinite``: ``{(width, seed): Trajectory}`` of each run.
    * ``seconds``: ``(W, S)`` wall time of each finite training run.
    * ``batches``: ``{seed: [index tensors]}``, the batches both runs used.
    """

    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    gaps: np.ndarray
    mean_gaps: np.ndarray
    slope: float
    finite: dict
    infinite: dict
    seconds: np.ndarray
    batches: dict

    def table(self) -> str:
        """The gaps as aligned text: one row per width."""
        head = f"{'width':>7} {'mean gap':>10}  " + " ".join(f"{'seed ' + str(s):>10}" for s in self.seeds)
        rows = [head]
        for i, w in enumerate(self.widths):
            rows.append(f"{w:>7} {self.mean_gaps[i]:>10.4g}  " + " ".join(f"{g:>10.4g}" for g in self.gaps[i]))
        rows.append(f"fitted log-log slope: {self.slope:.3f} (theory -0.5)")
        return "\n".join(rows)


class _MemoKernel:
    """``kfn`` evaluated once per distinct (x1, x2, get): every ``simulate`` call
    of a sweep asks for the same blocks on the same tensors.  Other attributes are
    ``kfn``'s (``output_positions``, ``out_features``, ``_joint``)."""

    def __init__(self, kfn):
        self.kfn = kfn
        self._cache: dict = {}
        self._cat: dict = {}

    def __getattr__(self, name):
        kfn = self.__dict__.get("kfn")
        if kfn is None:
            raise AttributeError(name)
        return getattr(kfn, name)

    def joint_inputs(self, x1, x2):
        """``torch.cat([x1, x2])``, the same tensor for the same pair (so a kernel sampled
        jointly over train and test points is computed once per sweep, not per run)."""
        key = (id(x1), id(x2))
        hit = self._cat.get(key)
        if hit is None or hit[0] is not x1 or hit[1] is not x2:
            hit = (x1, x2, torch.cat([x1, x2.to(x1.dtype)]))
            self._cat[key] = hit
        return hit[2]

    def __call__(self, x1, x2=None, get=("nngp", "ntk")):
        key = (id(x1), id(x2), tuple(get))
        hit = self._cache.get(key)
        # Keep the inputs alive in the cache, so their ids cannot be reused.
        if hit is None or hit[0] is not x1 or hit[1] is not x2:
            hit = (x1, x2, self.kfn(x1, x2, get=get))
            self._cache[key] = hit
        return hit[2]


def _mse_bound_hint(kfn, x_train, y_train, schedule) -> str:
    """The infinite-width mean-MSE bound of ``schedule``, for a finite run's
    divergence message (the kernel is memoized: simulate needs it anyway)."""
    try:
        kernels = kernel_blocks(kfn, x_train)
        out = as_targets(y_train, x_train.shape[0], "mse").shape[1]
        stability = mse_stability(kernels.ntk_train, float(kernels.ntk_train_eigh[0].max()), schedule, out)
    except Exception as err:  # only a hint: never hide the divergence behind another error
        return f" (The infinite-width stability bound could not be computed: {type(err).__name__}: {err})"
    return f" Infinite-width bound for this schedule: the {stability.text()}."


def _gap(finite: Trajectory, infinite: Trajectory) -> float:
    gap = (finite.train - infinite.train).abs().max()
    if finite.test is not None:
        gap = torch.maximum(gap, (finite.test - infinite.test).abs().max())
    return float(gap)


def compare_widths(
    factory: Callable[[int], nn.Module],
    widths: Sequence[int],
    x_train,
    y_train,
    x_test=None,
    *,
    W_std: float,
    b_std: float,
    loss: Union[str, Callable] = "mse",
    lr: float,
    steps: int,
    batch_size: Optional[int] = None,
    batches: Optional[Sequence] = None,
    seeds: Sequence[int] = (0,),
    kfn=None,
    std: Optional[Mapping[str, tuple[float, float]]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> WidthReport:
    """Train finite networks at every width and seed; measure their gap to
    :func:`dynamics.simulate` run on the same batches from their own ``f_0``.

    Args:
        factory: ``factory(width) -> nn.Module``, the user's model at that width.
        widths, seeds: the grid; seed ``s`` draws the network's parameters
            (see :func:`train_finite`) and, with ``batch_size``, its batches.
        x_train, y_train, x_test, loss, lr, steps: as in ``simulate``.
        W_std, b_std, std: the NTK parametrization, for the networks and for
            the compiled kernel alike.
        batch_size: shuffled epochs drawn exactly as ``simulate(batch_size=...,
            seed=s)`` draws them, once per seed, and replayed in both runs.
        batches: an explicit list of ``steps`` index tensors, used for every
            seed. Neither: full batch.
        kfn: the compiled kernel; default ``compile(factory(widths[0]), ...)``
            (the limit does not depend on the width it is traced at).
        progress: called with one line of text after each run.

    A finite network that diverges raises its :class:`~ntkcompile.errors.DivergenceError`
    (width and seed named) with, for ``"mse"``, the infinite-width stability
    bound of that seed's schedule appended; a diverging infinite-width run
    raises with the seed and the width whose ``f_0`` it started from.
    """
    widths, seeds = tuple(int(w) for w in widths), tuple(int(s) for s in seeds)
    if not widths or not seeds:
        raise ValueError("compare_widths: need at least one width and one seed")
    x_train = as_input(x_train, "x_train").to(_DTYPE)
    x_test = None if x_test is None else as_input(x_test, "x_test").to(_DTYPE)
    n = x_train.shape[0]
    if kfn is None:
        kfn = compile_kernel(
            factory(widths[0]), W_std=W_std, b_std=b_std, std=std, input_shape=tuple(x_train.shape[1:])
        )
    kfn = _MemoKernel(kfn)
    schedules = {s: batch_schedule(n, steps, batch_size, batches, s) for s in seeds}

    gaps = np.zeros((len(widths), len(seeds)))
    seconds = np.zeros_like(gaps)
    finite, infinite = {}, {}
    for i, width in enumerate(widths):
        for j, seed in enumerate(seeds):
            start = time.perf_counter()
            try:
                fin = train_finite(
                    factory, width, x_train, y_train, x_test, W_std=W_std, b_std=b_std,
                    loss=loss, lr=lr, steps=steps, batches=schedules[seed], seed=seed, std=std,
                    batch_coupled=getattr(kfn, "_batched", None),
                )
            except DivergenceError as err:
                hint = _mse_bound_hint(kfn, x_train, y_train, schedules[seed]) if loss == "mse" else ""
                raise type(err)(f"compare_widths: {err}{hint}", step=err.step, lr=err.lr) from err
            seconds[i, j] = time.perf_counter() - start
            f0 = fin.train[0] if fin.test is None else torch.cat([fin.train[0], fin.test[0]])
            try:
                inf = simulate(
                    kfn, x_train, y_train, x_test, loss=loss, lr=lr, steps=steps,
                    batches=schedules[seed], f0=f0, seed=seed,
                )
            except DivergenceError as err:
                raise type(err)(
                    f"compare_widths: the infinite-width run for seed {seed}, started from the f_0 of the "
                    f"width-{width} network: {err}", step=err.step, lr=err.lr,
                ) from err
            gaps[i, j] = _gap(fin, inf)
            finite[width, seed], infinite[width, seed] = fin, inf
            if progress is not None:
                progress(f"width {width:>6} seed {seed}: gap {gaps[i, j]:.4g} ({seconds[i, j]:.1f} s)")
    mean_gaps = np.exp(np.log(gaps).mean(axis=1))
    slope = fit_loglog_slope(widths, mean_gaps) if len(widths) > 1 else math.nan
    return WidthReport(
        widths=widths, seeds=seeds, gaps=gaps, mean_gaps=mean_gaps, slope=slope,
        finite=finite, infinite=infinite, seconds=seconds, batches=schedules,
    )
