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
from .dynamics import Trajectory, simulate
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


def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # One row per example, outputs of any shape flattened (as empirical_ntk does).
    return net(x).reshape(x.shape[0], -1)


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
    fs = []
    for idx in schedule:
        with torch.no_grad():
            fs.append(_outputs(net, x_all))
        opt.zero_grad(set_to_none=True)
        loss_rule.value(_outputs(net, x_train[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        fs.append(_outputs(net, x_all))
    traj = torch.stack(fs)
    return Trajectory(
        train=traj[:, :n],
        test=None if x_test is None else traj[:, n:],
        loss=torch.stack([loss_value(loss_rule.value, f[:n], y) for f in traj]),
    )


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
    of a sweep asks for the same blocks on the same tensors."""

    def __init__(self, kfn):
        self.kfn = kfn
        self._cache: dict = {}

    def __call__(self, x1, x2=None, get=("nngp", "ntk")):
        key = (id(x1), id(x2), tuple(get))
        hit = self._cache.get(key)
        # Keep the inputs alive in the cache, so their ids cannot be reused.
        if hit is None or hit[0] is not x1 or hit[1] is not x2:
            hit = (x1, x2, self.kfn(x1, x2, get=get))
            self._cache[key] = hit
        return hit[2]


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
            fin = train_finite(
                factory, width, x_train, y_train, x_test, W_std=W_std, b_std=b_std,
                loss=loss, lr=lr, steps=steps, batches=schedules[seed], seed=seed, std=std,
            )
            seconds[i, j] = time.perf_counter() - start
            f0 = fin.train[0] if fin.test is None else torch.cat([fin.train[0], fin.test[0]])
            inf = simulate(
                kfn, x_train, y_train, x_test, loss=loss, lr=lr, steps=steps,
                batches=schedules[seed], f0=f0, seed=seed,
            )
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
