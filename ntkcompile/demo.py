"""The infinite-width theory on real data: ``python -m ntkcompile.demo``.

On scikit-learn's 8x8 handwritten digits (shipped with the package, no
download), for every model in :data:`MODELS`:

1. compile the model into its NNGP and NTK (``ntkcompile.compile``);
2. kernel regression (mean MSE on one-hot targets, ``t = inf``, small ridge;
   ``dynamics.mse_infinite``) with the NTK, and NNGP regression (the GP
   posterior mean) for comparison: test accuracies;
3. minibatch SGD with cross-entropy at infinite width (``dynamics.simulate``)
   against finite NTK-parametrized networks at several widths, each started
   from its own ``f_0`` (``harness.compare_widths``): the gap should fall
   like ``width^(-1/2)`` (TP IIb Thm. 5.3);
4. write ``summary.txt`` and PNG plots to ``--out`` (default ``reports/demo``):
   ``accuracy.png`` (test accuracy over SGD steps of the finite networks and of
   the infinite-width run, beside kernel regression at ``t = inf``, all on the
   same tracked test digits), ``gap_vs_width_*.png`` (the relative gap, with the
   spread over seeds) and ``trajectories_*.png``.

The models: an MLP, a CNN, and a GRU that reads a digit row by row (8 steps of 8
pixels; its kernel is a joint Monte Carlo estimate).  The default run (about 85 s
on two idle cores) trains finite networks of widths 128 to 1024 (the GRU to
512), three seeds each: they dominate the time, which grows faster than the
width.  ``--full`` runs the sweep from 256 to 4096 (the GRU to 1024; two seeds,
several minutes, most of it the widest networks); ``--quick`` a small version
for tests.
Models the compiler cannot handle yet (it raises ``UnsupportedOpError``) are
reported as skipped.

Inputs are centered per pixel and divided by one global standard deviation
(train statistics), so ``|x|^2 / 64`` is about 1. Per-pixel standardization
would blow rarely-lit border pixels up to values around 30; those few points
would then dominate every max-over-points gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .compiled import compile as compile_kernel
from .dynamics import KernelBlocks, kernel_blocks, mse_infinite
from .errors import UnsupportedOpError
from .harness import WidthReport, compare_widths, fit_loglog_slope

__all__ = ["Config", "DEFAULT", "FULL", "MODELS", "QUICK", "ModelSpec", "load_digits_data", "main"]


# ---------------------------------------------------------------------------
# What runs: models and the two configurations.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of the demo: ``factory(width) -> nn.Module`` on inputs of ``input_shape``."""

    name: str
    factory: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]
    compile_options: dict = dataclasses.field(default_factory=dict)


def _mlp(n: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 10))


def _cnn(n: int) -> nn.Module:
    # A flatten readout keeps only aligned positions in the kernel (cheap); global average
    # pooling would need every pair of the 64 positions (64x the work).
    return nn.Sequential(nn.Conv2d(1, n, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(n * 64, 10))


class RowGRU(nn.Module):
    """A digit read row by row: 8 steps of 8 pixels into an ``nn.GRU``, a readout of the last state."""

    def __init__(self, n: int):
        super().__init__()
        self.rnn, self.out = nn.GRU(8, n, batch_first=True), nn.Linear(n, 10)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


# A new model is one entry here.  The GRU's kernel is a joint Monte Carlo estimate: 3 x 256
# samples keep the demo short (relative bias about 1 / 256); its cost grows like
# (inputs x steps)^2 x samples.
MODELS: list[ModelSpec] = [
    ModelSpec("MLP", _mlp, (64,)),
    ModelSpec("CNN", _cnn, (1, 8, 8)),
    ModelSpec("GRU", RowGRU, (8, 8), {"joint_samples": 256, "mc_replicates": 3}),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyperparameters of one demo run.

    ``n_dynamics_test`` of the ``n_test`` test points are tracked through
    training (every step evaluates the finite network on them, which dominates
    the run time); kernel regression uses all ``n_test``.
    """

    n_train: int
    n_test: int
    n_dynamics_test: int
    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    batch_size: int
    lr: float  # cross-entropy SGD
    ridge: float  # kernel regression, relative to the mean diagonal of the kernel
    W_std: float = 1.4
    b_std: float = 0.1
    data_seed: int = 0
    # Widest finite network per model name: a width-n GRU step costs 3 n^2 per input and
    # time step, 24x an MLP layer's over 8 rows, so its sweep stops earlier.
    max_width: tuple[tuple[str, int], ...] = (("GRU", 512),)

    def widths_of(self, name: str) -> tuple[int, ...]:
        cap = dict(self.max_width).get(name)
        return self.widths if cap is None else tuple(w for w in self.widths if w <= cap)


FULL = Config(n_train=200, n_test=300, n_dynamics_test=100, widths=(256, 512, 1024, 2048, 4096),
              seeds=(0, 1), steps=30, batch_size=32, lr=2.0, ridge=1e-3, max_width=(("GRU", 1024),))
# The same story in about a minute: narrower finite networks (the gap's slope needs a
# range of widths, not the widest ones), and three seeds for the spread.
DEFAULT = dataclasses.replace(FULL, widths=(128, 256, 512, 1024), seeds=(0, 1, 2), max_width=(("GRU", 512),))
QUICK = Config(n_train=64, n_test=64, n_dynamics_test=16, widths=(128, 512, 2048),
               seeds=(0,), steps=20, batch_size=32, lr=2.0, ridge=1e-3)


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def load_digits_data(n_train: int, n_test: int, seed: int = 0):
    """A random split of sklearn's 8x8 digits as float64 ``(N, 64)`` inputs and
    int64 labels: ``(x_train, y_train, x_test, y_test)``.

    Centered per pixel and scaled by one global standard deviation, both from
    the train split (see the module docstring for why not per pixel).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(x)} digits")
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    mean = x[train].mean(axis=0)
    scale = (x[train] - mean).std()
    x = (x - mean) / scale
    as_x = lambda idx: torch.tensor(x[idx], dtype=torch.float64)
    as_y = lambda idx: torch.tensor(y[idx], dtype=torch.int64)
    return as_x(train), as_y(train), as_x(test), as_y(test)


# ---------------------------------------------------------------------------
# One model.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ModelResult:
    name: str
    skipped: Optional[str] = None
    accuracy: dict = dataclasses.field(default_factory=dict)
    report: Optional[WidthReport] = None
    timings: dict = dataclasses.field(default_factory=dict)
    y_dyn: Optional[torch.Tensor] = None
    kernel_dyn: dict = dataclasses.field(default_factory=dict)   # t = inf predictions on the tracked points


def _accuracy(f: torch.Tensor, y: torch.Tensor) -> float:
    return float((f.argmax(dim=1) == y).double().mean())


def run_model(spec: ModelSpec, cfg: Config, data, log) -> ModelResult:
    x_train, y_train, x_test, y_test = (t.reshape(-1, *spec.input_shape) if t.is_floating_point() else t for t in data)
    result = ModelResult(spec.name)
    start = time.perf_counter()
    try:
        kfn = compile_kernel(spec.factory(16), W_std=cfg.W_std, b_std=cfg.b_std, input_shape=spec.input_shape,
                             **spec.compile_options)
        blocks = kernel_blocks(kfn, x_train, x_test, get=("nngp", "ntk"))
    except UnsupportedOpError as err:
        first = str(err).splitlines()[0]
        log(f"{spec.name}: skipped ({type(err).__name__}: {first})")
        result.skipped = f"{type(err).__name__}: {first}"
        return result
    result.timings["compile + kernels"] = time.perf_counter() - start
    log(f"{spec.name}: compiled, kernels on {len(x_train)} train x {len(x_test)} test points "
        f"({result.timings['compile + kernels']:.1f} s)")

    y_onehot = torch.nn.functional.one_hot(y_train, 10).to(torch.float64)
    # NNGP regression (the GP posterior mean) is the same solve with the NNGP.
    nngp = KernelBlocks(ntk_train=blocks.nngp_train, ntk_test_train=blocks.nngp_test_train)
    ntk_pred, nngp_pred = (
        mse_infinite(k, y_onehot, ridge=cfg.ridge * float(k.ntk_train.diagonal().mean())).test for k in (blocks, nngp)
    )
    result.accuracy["NTK regression (t=inf)"] = _accuracy(ntk_pred, y_test)
    result.accuracy["NNGP regression"] = _accuracy(nngp_pred, y_test)
    log(f"{spec.name}: test accuracy NTK regression {result.accuracy['NTK regression (t=inf)']:.3f}, "
        f"NNGP regression {result.accuracy['NNGP regression']:.3f}")
    result.kernel_dyn = {"NTK regression": ntk_pred[: cfg.n_dynamics_test],
                         "NNGP regression": nngp_pred[: cfg.n_dynamics_test]}

    # Dynamics on a subset of the test points: the finite runs evaluate every
    # tracked point at every step.
    x_dyn, y_dyn = x_test[: cfg.n_dynamics_test], y_test[: cfg.n_dynamics_test]
    start = time.perf_counter()
    report = compare_widths(
        spec.factory, cfg.widths_of(spec.name), x_train, y_train, x_dyn, W_std=cfg.W_std, b_std=cfg.b_std,
        loss="cross_entropy", lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, seeds=cfg.seeds,
        kfn=kfn, progress=lambda line: log(f"{spec.name}: {line}"),
    )
    result.timings["finite-width sweep"] = time.perf_counter() - start
    result.report, result.y_dyn = report, y_dyn
    widest, seed = report.widths[-1], cfg.seeds[0]
    n_dyn = len(y_dyn)
    for name, pred in result.kernel_dyn.items():
        result.accuracy[f"{name} on the {n_dyn} tracked"] = _accuracy(pred, y_dyn)
    result.accuracy[f"SGD infinite width ({cfg.steps} steps, {n_dyn} tracked)"] = _accuracy(
        report.infinite[widest, seed].test[-1], y_dyn)
    result.accuracy[f"SGD width {widest} ({cfg.steps} steps, {n_dyn} tracked)"] = _accuracy(
        report.finite[widest, seed].test[-1], y_dyn)
    rel = relative_gaps(report)
    log(f"{spec.name}: gap slope {report.slope:.3f}, relative-gap slope "
        f"{fit_loglog_slope(report.widths, np.exp(np.log(rel).mean(axis=1))):.3f} (theory -0.5)")
    return result


def relative_gaps(report: WidthReport) -> np.ndarray:
    """``(W, S)``: the gap ``max |f_t - f_t^inf|`` (over steps, train and tracked test points,
    outputs; ``WidthReport.gaps``) divided by the outputs' size ``rms(f_t^inf)`` over the same:
    a fraction of the outputs, comparable across models and losses."""
    out = np.zeros_like(report.gaps)
    for i, w in enumerate(report.widths):
        for j, s in enumerate(report.seeds):
            inf = report.infinite[w, s]
            g = torch.cat([inf.train, inf.test], dim=1) if inf.test is not None else inf.train
            out[i, j] = report.gaps[i, j] / float(g.pow(2).mean().sqrt())
    return out


# ---------------------------------------------------------------------------
# Report: plots and summary.txt.
# ---------------------------------------------------------------------------


def _plot_trajectories(res: ModelResult, cfg: Config, path: str) -> None:
    import matplotlib.pyplot as plt

    rep, seed = res.report, cfg.seeds[0]
    shown = [rep.widths[0], rep.widths[-1]]
    colors = dict(zip(shown, ("tab:orange", "tab:blue")))
    points = list(range(min(3, len(res.y_dyn))))
    fig, axes = plt.subplots(1, len(points) + 1, figsize=(4 * (len(points) + 1), 3.4))
    steps = np.arange(cfg.steps + 1)
    for ax, p in zip(axes, points):
        label = int(res.y_dyn[p])
        for w in shown:
            ax.plot(steps, rep.finite[w, seed].test[:, p, label], color=colors[w], label=f"width {w}")
            ax.plot(steps, rep.infinite[w, seed].test[:, p, label], color=colors[w], ls="--",
                    label="infinite width, same f0")
        ax.set_title(f"test point {p}: logit of its class {label}")
        ax.set_xlabel("SGD step")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for w in shown:
        ax.plot(steps, rep.finite[w, seed].loss, color=colors[w], label=f"width {w}")
        ax.plot(steps, rep.infinite[w, seed].loss, color=colors[w], ls="--", label="infinite width")
    ax.set_title("train cross-entropy")
    ax.set_xlabel("SGD step")
    ax.legend(fontsize=7)
    fig.suptitle(f"{res.name}: finite (solid) vs infinite-width (dashed) SGD, seed {seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gaps(res: ModelResult, path: str) -> None:
    """The relative gap against width: geometric mean over seeds, bars from the smallest to the
    largest seed's gap, and the ``width^(-1/2)`` of the theory through the first point."""
    import matplotlib.pyplot as plt

    rep = res.report
    rel = relative_gaps(rep)
    w = np.asarray(rep.widths, dtype=float)
    mean = np.exp(np.log(rel).mean(axis=1))
    slope = fit_loglog_slope(w, mean) if len(w) > 1 else float("nan")
    fig, ax = plt.subplots(figsize=(5.2, 4))
    spread = np.maximum(0.0, [mean - rel.min(axis=1), rel.max(axis=1) - mean])    # 0, not -1 ulp, for one seed
    ax.errorbar(w, mean, yerr=spread, fmt="o-", color="tab:blue",
                capsize=3, label=f"{len(rep.seeds)} seeds: geometric mean, min-max (slope {slope:.2f})")
    ax.plot(w, mean[0] * (w / w[0]) ** -0.5, "k--", label="width$^{-1/2}$ (TP IIb Thm. 5.3)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(w, [str(int(v)) for v in w])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("width")
    ax.set_ylabel(r"max$_{t,x}|f_t - f_t^\infty|$ / rms$(f_t^\infty)$")
    ax.set_title(f"{res.name}: finite vs infinite-width SGD, relative gap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(results: Sequence[ModelResult], cfg: Config, path: str) -> None:
    """Test accuracy over SGD steps on the tracked test digits: finite networks (mean over seeds,
    per width), the infinite-width run, and kernel regression at ``t = inf`` on the same digits."""
    import matplotlib.pyplot as plt

    done = [r for r in results if r.skipped is None]
    fig, axes = plt.subplots(1, max(len(done), 1), figsize=(5.2 * max(len(done), 1), 4), squeeze=False)
    steps = np.arange(cfg.steps + 1)
    for ax, r in zip(axes[0], done):
        rep, y = r.report, r.y_dyn
        acc = lambda traj: (traj.test.argmax(-1) == y).double().mean(-1).numpy()  # noqa: E731
        cmap = plt.get_cmap("viridis")
        for i, w in enumerate(rep.widths):
            curves = np.stack([acc(rep.finite[w, s]) for s in rep.seeds])
            ax.plot(steps, curves.mean(0), color=cmap(i / max(len(rep.widths) - 1, 1)), label=f"width {w}")
        inf = np.stack([acc(rep.infinite[rep.widths[-1], s]) for s in rep.seeds]).mean(0)
        ax.plot(steps, inf, "k--", lw=2, label="infinite width (same f0 as the widest)")
        for (name, pred), ls in zip(r.kernel_dyn.items(), (":", "-.")):
            ax.axhline(_accuracy(pred, y), color="tab:red", ls=ls, label=f"{name} (MSE, t = inf)")
        ax.set_ylim(0, 1)
        ax.set_xlabel("SGD step (cross-entropy, batch %d, lr %g)" % (cfg.batch_size, cfg.lr))
        ax.set_ylabel(f"test accuracy on the same {len(y)} digits")
        ax.set_title(f"{r.name}: accuracy during SGD, finite and infinite width ({len(rep.seeds)} seeds)",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(results: Sequence[ModelResult], cfg: Config, total: float, mode: str) -> str:
    lines = [
        f"ntkcompile demo ({mode}) on sklearn 8x8 digits",
        f"config: {dataclasses.asdict(cfg)}",
        f"total time: {total:.1f} s",
        "",
    ]
    for r in results:
        lines.append(f"== {r.name}")
        if r.skipped is not None:
            lines += [f"skipped: {r.skipped}", ""]
            continue
        lines.append(f"test accuracy ({cfg.n_test} test digits, or the first {cfg.n_dynamics_test} tracked "
                     "through training):")
        lines += [f"  {k:<44} {v:.3f}" for k, v in r.accuracy.items()]
        lines.append(f"cross-entropy SGD, {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}: "
                     "max over steps, train and tracked test points, outputs of |f_t - f_t^inf|")
        lines.append(r.report.table())
        lines.append(f"slope: {r.report.slope:.4f}")
        rel = relative_gaps(r.report)
        lines.append("relative gap max|f_t - f_t^inf| / rms(f_t^inf), per width (seeds): " + "; ".join(
            f"{w}: " + ", ".join(f"{g:.3g}" for g in rel[i]) for i, w in enumerate(r.report.widths)))
        rel_mean = np.exp(np.log(rel).mean(axis=1))
        if len(r.report.widths) > 1:
            lines.append(f"relative-gap slope: {fit_loglog_slope(r.report.widths, rel_mean):.4f}")
        lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items())
                     + "; finite runs per width (s): "
                     + ", ".join(f"{w}: {r.report.seconds[i].sum():.1f}" for i, w in enumerate(r.report.widths)))
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntkcompile.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("reports", "demo"), help="report folder (default reports/demo)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the full sweep: widths 256 to 4096, the GRU to 1024, two seeds (several minutes)")
    size.add_argument("--quick", action="store_true", help="small run (~30 s), for tests")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; 0 keeps torch's default). On a shared 2-core "
                             "machine more threads make the many small ops of SGD and simulate spin "
                             "and run up to 100x slower, while the large matmuls gain little")
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    mode = "quick" if args.quick else "full" if args.full else "default"
    cfg = {"quick": QUICK, "full": FULL, "default": DEFAULT}[mode]

    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        _run(cfg, mode, args.out)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(cfg: Config, mode: str, out: str) -> None:
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {line}", flush=True)

    log(f"ntkcompile demo ({mode}): {cfg.n_train} train / {cfg.n_test} test digits, widths {cfg.widths}, "
        f"seeds {cfg.seeds}, {torch.get_num_threads()} thread(s), report -> {out}")
    data = load_digits_data(cfg.n_train, cfg.n_test, cfg.data_seed)
    results = [run_model(spec, cfg, data, log) for spec in MODELS]

    for r in results:
        if r.skipped is None:
            tag = r.name.lower()
            _plot_trajectories(r, cfg, os.path.join(out, f"trajectories_{tag}.png"))
            _plot_gaps(r, os.path.join(out, f"gap_vs_width_{tag}.png"))
    _plot_accuracy(results, cfg, os.path.join(out, "accuracy.png"))
    log("plots written")
    total = time.perf_counter() - t0
    with open(os.path.join(out, "summary.txt"), "w") as fh:
        fh.write(_summary(results, cfg, total, mode) + "\n")
    log(f"done in {total:.1f} s; wrote {sorted(os.listdir(out))} to {out}")


if __name__ == "__main__":
    sys.exit(main())
