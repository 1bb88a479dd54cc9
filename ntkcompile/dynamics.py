"""Training dynamics of infinitely wide networks (TP IIb, Theorem 5.3).

In NTK parametrization, SGD with any batches ``B_t``, learning rate ``lr`` and a
loss ``L`` with continuous derivative has, at every fixed step and as width ->
infinity, the network outputs

    f_{t+1}(xi) = f_t(xi) - lr * sum_{i in B_t} NTK(xi, x_i) dL_t/df(x_i)

with the NTK frozen at initialization (times the identity on outputs) and
``f_0 ~ GP(0, NNGP)`` jointly on train and test points (docs, Sec. 6).
``dL_t/df`` is the gradient of the loss *as PyTorch computes it on the batch*,
so ``torch.optim.SGD(lr=lr)`` on the finite network is the matching experiment.

Two ways to evaluate it live here:

* :func:`simulate` runs the recursion step by step for any loss and batches.
* The mean-MSE closed forms :func:`mse_continuous`, :func:`mse_discrete`,
  :func:`mse_infinite` and :func:`mse_ensemble` diagonalize the train NTK once
  (``K = V diag(lam) V^T``) and evaluate any number of times from it.

Mean-MSE normalization. ``F.mse_loss`` (mean over ``N`` rows and ``out``
outputs) has ``dL/df = 2 (f - y) / (N * out)``. Write ``a = lr * 2 / (N * out)``
and ``r = f_train - y``. Full-batch steps give ``r_t = (I - a K)^t r_0``; the
gradient flow ``df/dt = -lr * K dL/df`` gives ``r(t) = exp(-a K t) r_0`` (``t`` is
measured in units where one step of size ``lr`` advances it by 1). Every point
``x`` (train or test) then moves as

    f(x, t) = f_0(x) - K(x, X) Phi_t r_0,    Phi_t = V diag(phi_t(lam)) V^T,

    continuous: phi_t(lam) = (1 - exp(-a lam t)) / lam     (-> a t at lam = 0)
    discrete:   phi_t(lam) = (1 - (1 - a lam)^t) / lam     (-> a t at lam = 0)
    t = inf:    phi(lam)   = 1 / lam                        (kernel regression)

``ridge`` replaces ``lam`` by ``lam + ridge`` inside ``phi`` (``K + ridge I`` in the
residual's evolution, as neural-tangents' ``diag_reg``); at ``t = inf`` this is
kernel ridge regression ``f_0(x) + K(x, X) (K + ridge I)^-1 (y - f_0(X))``.

Stability. Full-batch discrete MSE is stable iff ``|1 - a lam| <= 1`` for every
eigenvalue, i.e. ``lr <= N * out / lam_max(K)`` (``= 2 / (2 lam_max / (N out))``).
A minibatch step on ``B`` is non-expansive in the kernel norm of the residual
iff ``lr <= |B| * out / lam_max(K_BB)`` (``ntkcompile.stability.MSEStability``);
that per-batch bound, the smallest over the schedule, is what :func:`simulate`
checks for minibatches. Above the bound a ``RuntimeWarning`` states it. Runs
that still overflow raise :class:`~ntkcompile.errors.DivergenceError` (the step,
``lr``, the batch size and the bound) instead of returning inf or NaN;
``simulate`` also warns once when the loss grows a million-fold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch

from .blocks import KernelBlocks, _output_positions, kernel_blocks
from .errors import KernelNotPSDError
from .stability import StepWatch, mse_stability, raise_if_overflow, warn_if_unstable
from .training import (as_input, as_targets, batch_schedule, check_finite, check_lr, check_ridge, check_shape,
                       check_trajectory_size, loss_value, psd_eigh, resolve_loss)

__all__ = [
    "Ensemble",
    "KernelBlocks",
    "Trajectory",
    "kernel_blocks",
    "mse_continuous",
    "mse_discrete",
    "mse_ensemble",
    "mse_infinite",
    "simulate",
]

_DTYPE = torch.float64


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Network outputs over time.

    ``train``: ``(T, N, out)``; ``test``: ``(T, M, out)`` or ``None`` without
    test points; ``loss``: ``(T,)`` loss on the full training set as PyTorch
    computes it. For :func:`simulate` ``T = steps + 1`` and index 0 is ``f_0``;
    for the closed forms ``T = len(t)``, and the time axis is absent for a
    scalar ``t``.
    """

    train: torch.Tensor
    test: Optional[torch.Tensor]
    loss: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Mean and covariance of outputs over initializations ``f_0 ~ GP(0, NNGP)``.

    ``mean_*``: ``(T, N, out)``; ``cov_*``: ``(T, N, N)``, the per-output factor
    (outputs are independent and identically distributed, so the full
    covariance is ``cov (x) I_out``). Time axis absent for a scalar ``t``;
    ``*_test`` are ``None`` without test points.
    """

    mean_train: torch.Tensor
    cov_train: torch.Tensor
    mean_test: Optional[torch.Tensor]
    cov_test: Optional[torch.Tensor]


# ---------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------


def simulate(
    kfn,
    x_train,
    y_train,
    x_test=None,
    *,
    loss: Union[str, Callable] = "mse",
    lr: float = 1.0,
    steps: int = 100,
    batch_size: Optional[int] = None,
    batches: Optional[Sequence] = None,
    f0=None,
    seed: int = 0,
) -> Trajectory:
    """Run the infinite-width SGD recursion (TP IIb, Thm. 5.3) for ``steps`` steps.

    Each step is ``f <- f - lr * NTK(., X[B_t]) dL_t/df(X[B_t])``, ``L_t`` the loss
    on batch ``B_t`` exactly as PyTorch computes it:

    * ``"mse"``: ``F.mse_loss`` (mean; gradient ``2 (f - y) / (B * out)``).
      Floating ``y_train`` of shape ``(N,)`` is treated as ``(N, 1)``.
    * ``"cross_entropy"``: ``F.cross_entropy`` with int64 class indices
      ``y_train`` of shape ``(N,)`` (mean over the batch).
    * a callable ``loss(f_batch, y_batch) -> scalar``, differentiated by autograd.

    ``out`` is ``f0.shape[1]`` for a tensor ``f0``; otherwise, for integer
    targets, the model's number of outputs ``kfn.out_features`` when the kernel
    has that attribute, else ``max(y) + 1``; else ``y.shape[1]``. Class indices
    must be below ``kfn.out_features`` (when known) and below ``out``; without
    ``out_features`` or ``f0``, more than ``10_000`` classes and more than
    ``10 N`` of them is refused as a likely mislabel (pass ``f0`` to mean it).
    A trajectory larger than the machine's memory is refused before anything
    is allocated.

    Batches (index ``i`` into a duplicate-containing batch counts each time):

    * ``batches``: an explicit list of ``steps`` 1-D integer index tensors.
    * ``batch_size``: shuffled epochs. ``g = torch.Generator().manual_seed(seed)``;
      each epoch is ``torch.randperm(N, generator=g)`` cut into consecutive chunks
      of ``batch_size``; the last, shorter chunk is kept (like a DataLoader with
      ``drop_last=False``); epochs are drawn until there are ``steps`` batches.
    * neither: full batch.

    ``f0``: ``None`` is the zero function; ``"prior"`` draws ``f_0`` jointly on
    train and test points from ``GP(0, NNGP)``, independently per output, as
    ``f_0 = V diag(sqrt(lam)) z`` from the eigendecomposition of the joint NNGP
    and ``z = torch.randn(N + M, out, generator=torch.Generator().manual_seed(seed))``
    (a generator separate from the batch one); a tensor of shape ``(N + M, out)``
    (train rows first) is used as given.

    Divergence. For ``"mse"`` the learning rate is compared, before the first
    step, with the stability bound of the schedule
    (:class:`ntkcompile.stability.MSEStability`): full batch
    ``lr <= N out / lambda_max(K)``; minibatches ``lr <= |B| out /
    lambda_max(K_BB)`` for every batch ``B`` (then every step is non-expansive
    in the kernel norm of the residual; a sufficient condition). The bound is
    computed for the distinct batches in order of first use, up to 4096 of them
    and an eigenvalue work of ``max(N^3 / 4, 2^27)``; the messages say when
    that cut-off left batches unchecked. Above the bound a ``RuntimeWarning``
    gives it. After every step the outputs and the full-train loss are checked:
    NaN or inf raises :class:`~ntkcompile.errors.DivergenceError` naming the
    step, ``lr``, the batch size and the bound (there is none in closed form
    for cross-entropy or a callable loss), or
    :class:`~ntkcompile.errors.NonFiniteLossError` when a callable loss returns
    NaN or inf (value or gradient) at finite outputs; a loss that grows above
    ``1e6`` times its value at ``f_0`` (or above ``1e300``) warns once.

    A readout at every position (``kfn.output_positions``, e.g. an output per step of
    a sequence) makes every (input, position) a row of the recursion: ``y_train`` is
    ``(N, *P, out)`` (class indices ``(N, *P)``, the cross-entropy's mean over every
    position), a batch holds every position of its inputs, ``f0`` is
    ``(N + M, *P, out)``, a callable loss sees ``(B, *P, out)`` as the network gives it,
    and the trajectory is ``(steps + 1, N, *P, out)``.

    Returns a :class:`Trajectory` with ``steps + 1`` entries, index 0 being ``f_0``.
    """
    name, loss_rule = resolve_loss(loss)
    x_train = as_input(x_train, "x_train")
    if x_test is not None:
        x_test = as_input(x_test, "x_test")
    n = x_train.shape[0]
    if getattr(kfn, "_batched", False) and ((batch_size is not None and batch_size < n) or (
            batches is not None and any(torch.unique(torch.as_tensor(b)).numel() != n for b in batches))):
        raise ValueError(
            "simulate: the model couples the examples of a batch (BatchNorm in training mode, or batch "
            "statistics), so its NTK depends on which examples form a minibatch and minibatch steps are not "
            "blocks of the full-batch kernel. Simulate full-batch training (no batch_size/batches): x_train is "
            "one batch, x_test another, each normalized by its own statistics")
    positions = _positions_for(kfn, x_train)
    if positions:
        return _simulate_positions(kfn, positions, x_train, y_train, x_test, name, loss_rule, lr=lr, steps=steps,
                                   batch_size=batch_size, batches=batches, f0=f0, seed=seed)
    return _simulate(kfn, x_train, y_train, x_test, name, loss_rule, lr=lr, steps=steps, batch_size=batch_size,
                     batches=batches, f0=f0, seed=seed)


def _positions_for(kfn, x) -> tuple:
    """``kfn.output_positions`` for inputs like ``x`` (a model compiled without its input
    shape learns it from one input)."""
    if getattr(kfn, "output_positions", ()) is None and len(x):
        kfn(x[:1], get=("nngp",))
    return _output_positions(kfn)


def _simulate_positions(kfn, positions, x_train, y_train, x_test, name, loss_rule, *, lr, steps, batch_size,
                        batches, f0, seed) -> Trajectory:
    """``simulate`` for a readout at every position: every (input, position) is a row of
    the recursion (the kernel blocks' ``(N |P|, N |P|)`` layout), a batch of inputs the
    rows of all their positions; the loss sees the outputs as the network gives them,
    ``(B, *P, out)``, and the trajectory has that shape too."""
    R, n = math.prod(positions), x_train.shape[0]
    y = torch.as_tensor(y_train)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"y_train has {y.shape[0] if y.ndim else 0} rows but x_train has {n}")
    if tuple(y.shape[1:1 + len(positions)]) != positions:
        raise ValueError(f"simulate: the model has an output at every position {positions} (kfn.output_positions), "
                         f"so y_train must have shape (N, {', '.join(map(str, positions))}, ...), got {tuple(y.shape)}")
    y_rows = y.reshape(n * R, *y.shape[1 + len(positions):])
    if name == "callable":           # the user's loss sees (B, *P, out) as the finite network gives them
        user = loss_rule.value
        shaped = lambda f, t: user(f.reshape(-1, *positions, *f.shape[1:]),  # noqa: E731
                                   t.reshape(-1, *positions, *t.shape[1:]))
        loss_rule = resolve_loss(shaped)[1]
    if isinstance(f0, torch.Tensor):
        if tuple(f0.shape[1:1 + len(positions)]) != positions:
            raise ValueError(f"simulate: f0 must have shape (N_train + N_test, {', '.join(map(str, positions))}, out), "
                             f"got {tuple(f0.shape)}")
        f0 = f0.reshape(f0.shape[0] * R, *f0.shape[1 + len(positions):])
    schedule = batch_schedule(n, steps, batch_size, batches, seed)
    offsets = torch.arange(R)
    rows = [(idx[:, None] * R + offsets).reshape(-1) for idx in schedule]
    traj = _simulate(kfn, x_train, y_rows, x_test, name, loss_rule, lr=lr, steps=steps, batch_size=None,
                     batches=rows, f0=f0, seed=seed, rows=R)
    shape = lambda t: None if t is None else t.reshape(t.shape[0], -1, *positions, t.shape[-1])  # noqa: E731
    return Trajectory(train=shape(traj.train), test=shape(traj.test), loss=traj.loss)


def _simulate(kfn, x_train, y_train, x_test, name, loss_rule, *, lr, steps, batch_size, batches, f0, seed,
              rows: int = 1) -> Trajectory:
    """``simulate`` on rows: ``rows`` per input (a readout at every position), 1 otherwise."""
    n = x_train.shape[0] * rows
    y = as_targets(y_train, n, name)
    m = 0 if x_test is None else x_test.shape[0] * rows
    lr = check_lr(lr)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"simulate: steps must be a non-negative int, got {steps!r}")
    is_prior = isinstance(f0, str)
    if is_prior and f0 != "prior":
        raise ValueError(f"simulate: f0 must be None, 'prior' or a tensor, got {f0!r}")
    # Everything about sizes is settled before the kernel is evaluated or
    # anything of size out is allocated.
    out = _infer_out(y, f0, name, getattr(kfn, "out_features", None))
    if name == "mse" and out != y.shape[1]:
        raise ValueError(f"simulate: f0 has {out} outputs but y_train has {y.shape[1]} columns")
    check_trajectory_size(steps, n + m, out)

    kernels = kernel_blocks(kfn, x_train, x_test, get=("nngp", "ntk") if is_prior else ("ntk",))
    f0 = _initial_outputs(f0, kernels, n, m, out, seed)
    schedule = batch_schedule(n, steps, batch_size, batches, seed)

    lam_max = float(kernels.ntk_train_eigh[0].max()) if n else 0.0
    stability = None
    if name == "mse" and n:
        stability = mse_stability(kernels.ntk_train, lam_max, schedule, out)
        warn_if_unstable(lr, stability, "simulate")
    watch = StepWatch(loss_name=name, lr=lr, n=n, steps=steps, stability=stability)

    # Rows: train points then test points; columns: train points.
    ntk_rows = kernels.ntk_train if m == 0 else torch.cat([kernels.ntk_train, kernels.ntk_test_train])
    traj = torch.empty(steps + 1, n + m, out, dtype=_DTYPE)
    traj[0] = f0
    losses = [float(loss_value(loss_rule.value, f0[:n], y))]
    watch.check(0, traj, losses, None, None)
    for t, idx in enumerate(schedule, 1):
        g = loss_rule.grad(traj[t - 1, idx], y[idx])
        f = torch.addmm(traj[t - 1], ntk_rows[:, idx], g, alpha=-lr, out=traj[t])
        losses.append(float(loss_value(loss_rule.value, f[:n], y)))
        watch.check(t, traj, losses, idx, g)
    return Trajectory(
        train=traj[:, :n],
        test=None if x_test is None else traj[:, n:],
        loss=torch.tensor(losses, dtype=_DTYPE),
    )


# A class count is "implausible" above both of these (a label like 1e9 would
# otherwise allocate (N + M) * 1e9 floats).
_MAX_CLASSES = 10_000
_MAX_CLASSES_PER_POINT = 10


def _infer_out(y, f0, loss_name, out_features) -> int:
    if isinstance(f0, torch.Tensor):
        if f0.ndim != 2:
            raise ValueError(f"simulate: f0 must have shape (N_train + N_test, out), got {tuple(f0.shape)}")
        out, source = f0.shape[1], "f0 has"
    elif y.is_floating_point():
        return y.shape[1]
    elif loss_name == "mse":
        raise ValueError("simulate: loss 'mse' needs floating targets y_train")
    elif out_features is not None:
        out, source = int(out_features), "the model has (kfn.out_features)"
    else:
        out, source = (int(y.max()) + 1 if len(y) else 1), None
        if out > _MAX_CLASSES and out > _MAX_CLASSES_PER_POINT * len(y):
            raise ValueError(
                f"simulate: the largest class index in y_train is {out - 1}, so the outputs would need "
                f"{out} classes for {len(y)} training points; class indices must be 0 .. C-1. Check the "
                f"labels, or pass f0 of shape (N_train + N_test, C) to fix the number of classes C"
            )
    if loss_name == "cross_entropy" and len(y):
        top = int(y.max())
        if out_features is not None and top >= out_features:
            raise ValueError(
                f"simulate: y_train has class index {top} but the model has only {int(out_features)} outputs "
                f"(kfn.out_features); cross-entropy needs class indices 0 .. {int(out_features) - 1}"
            )
        if top >= out:
            raise ValueError(f"simulate: y_train has class index {top} but {source} only {out} classes")
    return out


def _initial_outputs(f0, kernels: KernelBlocks, n: int, m: int, out: int, seed: int) -> torch.Tensor:
    if f0 is None:
        return torch.zeros(n + m, out, dtype=_DTYPE)
    if isinstance(f0, str):
        joint = kernels.nngp_train
        if m:
            joint = torch.cat(
                [torch.cat([kernels.nngp_train, kernels.nngp_test_train.T], 1),
                 torch.cat([kernels.nngp_test_train, kernels.nngp_test], 1)]
            )
        lam, vecs = psd_eigh(joint, "NNGP(train + test, train + test)")
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n + m, out, generator=gen, dtype=_DTYPE)
        return (vecs * lam.sqrt()) @ z
    f0 = torch.as_tensor(f0).to(_DTYPE)
    check_shape(f0, (n + m, out), "f0 (train rows first, then test rows)")
    check_finite(f0, "f0")
    return f0.clone()


# ---------------------------------------------------------------------------
# Mean-MSE closed forms: spectral functions phi_t(lam), one per flow.
# ---------------------------------------------------------------------------


def _phi_continuous(lam: torch.Tensor, a: float, t: float) -> torch.Tensor:
    # (1 - exp(-a lam t)) / lam = a t * (-expm1(-x) / x), x = a lam t; -> a t at x = 0.
    x = a * lam * t
    safe = torch.where(x > 0, x, torch.ones_like(x))
    return a * t * torch.where(x > 0, -torch.expm1(-safe) / safe, torch.ones_like(x))


def _phi_discrete(lam: torch.Tensor, a: float, t: float) -> torch.Tensor:
    # (1 - (1 - x)^t) / lam with x = a lam, i.e. a * sum_{s < t} (1 - x)^s.
    # For 0 < x < 1 use expm1/log1p so tiny x keeps its digits.
    x = a * lam
    inside = (x > 0) & (x < 1)
    safe = torch.where(inside, x, torch.full_like(x, 0.5))
    geometric_small = -torch.expm1(t * torch.log1p(-safe)) / safe
    big = torch.where(x > 0, x, torch.ones_like(x))
    geometric_big = (1 - (1 - big) ** t) / big
    geometric = torch.where(inside, geometric_small, torch.where(x > 0, geometric_big, torch.full_like(x, float(t))))
    return a * geometric


_FLOWS = {"continuous": _phi_continuous, "discrete": _phi_discrete}


def _phi_infinite(lam: torch.Tensor, ridge: float, what: str) -> torch.Tensor:
    lam_max = float(lam.max()) if lam.numel() else 0.0
    tol = max(lam.numel(), 1) * torch.finfo(_DTYPE).eps * max(lam_max, 0.0)
    if lam.numel() and float(lam.min()) <= tol:
        hint = "pass ridge > 0" if ridge == 0 else "increase ridge"
        raise KernelNotPSDError(
            f"{what}: NTK(train, train) + ridge*I is singular at t = inf (smallest eigenvalue "
            f"{float(lam.min()):.3g}, largest {lam_max:.3g}, ridge {ridge:g}); kernel regression "
            f"needs an invertible kernel: {hint} (e.g. ridge = {max(1e-6 * lam_max, 1e-12):.1g})"
        )
    return 1.0 / lam


def _spectral_weights(kernels: KernelBlocks, times, flow: str, a: float, ridge: float, what: str):
    """``phi_t(lam + ridge)`` for each time, stacked ``(T, N)``."""
    lam, _ = kernels.ntk_train_eigh
    lam_r = lam + ridge
    if flow not in _FLOWS:
        raise ValueError(f"{what}: unknown flow {flow!r}; valid flows are {sorted(_FLOWS)}")
    rows = []
    for t in times:
        rows.append(_phi_infinite(lam_r, ridge, what) if math.isinf(t) else _FLOWS[flow](lam_r, a, t))
    return torch.stack(rows) if rows else torch.zeros(0, lam.numel(), dtype=_DTYPE)


def _times(t, flow: str, what: str) -> tuple[list[float], bool]:
    tt = torch.as_tensor(t, dtype=_DTYPE)
    if tt.ndim > 1:
        raise ValueError(f"{what}: t must be a scalar or a 1-D sequence of times, got shape {tuple(tt.shape)}")
    scalar = tt.ndim == 0
    values = [float(v) for v in tt.reshape(-1)]
    for v in values:
        if math.isnan(v) or v < 0:
            raise ValueError(f"{what}: times must be >= 0 (inf allowed), got {v}")
        if flow == "discrete" and not math.isinf(v) and v != int(v):
            raise ValueError(f"{what}: discrete time counts steps and must be an integer, got {v}")
    return values, scalar


def _mse_propagators(kernels, times, flow, lr, ridge, out, what):
    """Maps ``P_train (T, N, N)``, ``P_test (T, M, N)`` with ``f(t) = f_0 - P r_0``."""
    n = kernels.n_train
    a = lr * 2.0 / (n * out)
    lam, vecs = kernels.ntk_train_eigh
    phi = _spectral_weights(kernels, times, flow, a, ridge, what)  # (T, N)
    # K Phi_t = V diag(lam phi) V^T exactly, without re-multiplying by K.
    p_train = torch.einsum("ik,tk,jk->tij", vecs, lam * phi, vecs)
    p_test = None
    if kernels.ntk_test_train is not None:
        p_test = torch.einsum("mi,ik,tk,jk->tmj", kernels.ntk_test_train, vecs, phi, vecs)
    return p_train, p_test


def _mse_predict(kernels, y_train, t, *, flow, lr, f0, ridge, what) -> Trajectory:
    if not isinstance(kernels, KernelBlocks):
        raise TypeError(f"{what}: expected KernelBlocks (build it with kernel_blocks(kfn, x_train, x_test)), got {type(kernels).__name__}")
    n, m = kernels.n_train, kernels.n_test or 0
    y = as_targets(y_train, n, "mse")
    out = y.shape[1]
    lr = check_lr(lr)
    ridge = check_ridge(ridge, what)
    times, scalar = _times(t, flow, what)
    stability = mse_stability(kernels.ntk_train, float(kernels.ntk_train_eigh[0].max()), [], out)
    if flow == "discrete" and any(not math.isinf(v) for v in times):
        warn_if_unstable(lr, stability, what, stacklevel=4)
    if f0 is None:
        f0 = torch.zeros(n + m, out, dtype=_DTYPE)
    else:
        f0 = torch.as_tensor(f0).to(_DTYPE)
        check_shape(f0, (n + m, out), "f0 (train rows first, then test rows)")
        check_finite(f0, "f0")
    r0 = f0[:n] - y
    p_train, p_test = _mse_propagators(kernels, times, flow, lr, ridge, out, what)
    train = f0[:n] - p_train @ r0
    test = None if p_test is None else f0[n:] - p_test @ r0
    raise_if_overflow(what, times, (train, test), lr, stability)
    loss = ((train - y) ** 2).mean(dim=(1, 2))
    if scalar:
        train, loss = train[0], loss[0]
        test = None if test is None else test[0]
    return Trajectory(train=train, test=test, loss=loss)


def mse_continuous(kernels: KernelBlocks, y_train, t, *, lr: float = 1.0, f0=None, ridge: float = 0.0) -> Trajectory:
    """Gradient flow ``df/dt = -lr * NTK dL/df`` on the full-batch mean MSE.

    ``L = F.mse_loss(f_train, y)``, so ``r(t) = exp(-lr (2 / (N out)) K t) r_0``;
    ``t`` (scalar or 1-D sequence, ``inf`` allowed) counts steps of size ``lr``.
    ``f0``: ``None`` (zero) or ``(N + M, out)``, train rows first. One
    eigendecomposition of ``K`` (cached on ``kernels``) serves every ``t``.
    """
    return _mse_predict(kernels, y_train, t, flow="continuous", lr=lr, f0=f0, ridge=ridge, what="mse_continuous")


def mse_discrete(kernels: KernelBlocks, y_train, t, *, lr: float = 1.0, f0=None, ridge: float = 0.0) -> Trajectory:
    """``t`` full-batch SGD steps on the mean MSE in closed form.

    ``r_t = (I - lr (2 / (N out)) K)^t r_0``; test points move by
    ``-lr (2 / (N out)) K(test, X) sum_{s < t} r_s``. ``t``: int(s) >= 0.
    Warns above the stability limit ``lr = N out / lam_max(K)``.
    """
    return _mse_predict(kernels, y_train, t, flow="discrete", lr=lr, f0=f0, ridge=ridge, what="mse_discrete")


def mse_infinite(kernels: KernelBlocks, y_train, *, f0=None, ridge: float = 0.0) -> Trajectory:
    """The ``t = inf`` limit: kernel (ridge) regression with the NTK.

    ``f(x) = f_0(x) + K(x, X) (K + ridge I)^-1 (y - f_0(X))`` at train and test
    points. Raises :class:`KernelNotPSDError` when ``K + ridge I`` is singular.
    """
    return _mse_predict(kernels, y_train, math.inf, flow="continuous", lr=1.0, f0=f0, ridge=ridge, what="mse_infinite")


def mse_ensemble(kernels: KernelBlocks, y_train, t, *, lr: float = 1.0, flow: str = "continuous", ridge: float = 0.0) -> Ensemble:
    """Mean and covariance over initializations ``f_0 ~ GP(0, NNGP)`` (jointly
    on train and test points, independent per output) of the MSE-trained outputs.

    With ``f(t) = f_0 - P_t (f_0(X) - y)`` (``P_t = K(., X) Phi_t``, NTK only):

        mean(t) = P_t y
        cov(t)  = S(., .) - P_t S(X, .) - S(., X) P_t^T + P_t S(X, X) P_t^T

    where ``S`` is the NNGP. ``flow`` is ``"continuous"`` (gradient flow) or
    ``"discrete"`` (full-batch steps); ``t = inf`` gives kernel regression.
    ``kernels`` must carry the NNGP blocks (``kernel_blocks(..., get=("nngp", "ntk"))``).
    """
    what = "mse_ensemble"
    if not isinstance(kernels, KernelBlocks):
        raise TypeError(f"{what}: expected KernelBlocks, got {type(kernels).__name__}")
    if kernels.nngp_train is None:
        raise ValueError(f"{what}: kernels have no NNGP blocks; build them with kernel_blocks(kfn, x_train, x_test, get=('nngp', 'ntk'))")
    n = kernels.n_train
    y = as_targets(y_train, n, "mse")
    lr = check_lr(lr)
    ridge = check_ridge(ridge, what)
    if flow not in _FLOWS:
        raise ValueError(f"{what}: unknown flow {flow!r}; valid flows are {sorted(_FLOWS)}")
    times, scalar = _times(t, flow, what)
    stability = mse_stability(kernels.ntk_train, float(kernels.ntk_train_eigh[0].max()), [], y.shape[1])
    if flow == "discrete" and any(not math.isinf(v) for v in times):
        warn_if_unstable(lr, stability, what, stacklevel=3)
    p_train, p_test = _mse_propagators(kernels, times, flow, lr, ridge, y.shape[1], what)

    def moments(p, s_self, s_cross):
        # s_self = S(rows, rows), s_cross = S(rows, X).
        ps = p @ s_cross.T  # P S(X, rows)
        cov = s_self - ps - ps.transpose(1, 2) + p @ kernels.nngp_train @ p.transpose(1, 2)
        return p @ y, 0.5 * (cov + cov.transpose(1, 2))

    mean_train, cov_train = moments(p_train, kernels.nngp_train, kernels.nngp_train)
    mean_test = cov_test = None
    if p_test is not None:
        mean_test, cov_test = moments(p_test, kernels.nngp_test, kernels.nngp_test_train)
    raise_if_overflow(what, times, (mean_train, cov_train, mean_test, cov_test), lr, stability)
    if scalar:
        mean_train, cov_train = mean_train[0], cov_train[0]
        if p_test is not None:
            mean_test, cov_test = mean_test[0], cov_test[0]
    return Ensemble(mean_train, cov_train, mean_test, cov_test)
