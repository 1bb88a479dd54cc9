"""Convergence of empirical NTKs of finite networks to an infinite-width kernel.

TP II (Fig. 1, Sec. 7) measures how fast the empirical NTK of a randomly
initialized network in NTK parametrization approaches its limit: the relative
Frobenius error decays like ``width^(-1/2)``, so the least-squares slope of
``log(error)`` against ``log(width)`` is about ``-0.5``. ``convergence_sweep``
repeats that experiment for any model factory and any limit kernel.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ntkcompile.empirical import empirical_ntk
from ntkcompile.harness import fit_loglog_slope  # one definition, re-exported for the tests
from ntkcompile.parametrize import ntk_parametrize

__all__ = ["convergence_sweep", "fit_loglog_slope", "relative_frobenius"]


def relative_frobenius(a, b) -> float:
    """``||a - b||_F / ||b||_F`` in float64 (``b`` is the reference)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.linalg.norm((a - b).reshape(-1)) / torch.linalg.norm(b.reshape(-1)))


def convergence_sweep(
    factory: Callable[[int], nn.Module],
    widths: Sequence[int],
    seeds: Sequence[int],
    x1: Tensor,
    x2: Tensor | None,
    limit_ntk,
    W_std: float,
    b_std: float,
    std: Mapping[str, tuple[float, float]] | None = None,
    per_example: bool = True,
    log: Callable[[str], None] | None = None,
    biases: Sequence[str] = (),
) -> tuple[np.ndarray, float]:
    """Relative error of finite-width empirical NTKs against ``limit_ntk``.

    For every width and seed: ``torch.manual_seed(seed)``, build
    ``ntk_parametrize(factory(width), W_std, b_std, std=std)`` and take
    ``relative_frobenius(empirical_ntk(net, x1, x2), limit_ntk)``.

    Errors are averaged over seeds with the *geometric* mean: the fit is in log
    space, and the geometric mean is the mean of ``log(error)``, so one unlucky
    seed does not dominate a width (the arithmetic mean would also bias the
    fitted slope towards the widths with the largest spread).

    ``per_example=False`` differentiates whole batches (torch's fused RNN ops have
    no ``vmap`` rule, see ``empirical_ntk``); ``log`` is called with one line per
    width (the per-seed errors), which slow tests print for their docstrings; ``biases``:
    bare parameters used as biases (``ntk_parametrize``).

    Returns:
        ``(mean_errors, slope)``: one geometric-mean error per width (in the
        order of ``widths``) and the least-squares log-log slope of them.
    """
    if not widths or not seeds:
        raise ValueError("need at least one width and one seed")
    limit = torch.as_tensor(limit_ntk, dtype=torch.float64)
    means = []
    for width in widths:
        logs = []
        for seed in seeds:
            torch.manual_seed(seed)
            net = ntk_parametrize(factory(width), W_std, b_std, std=std, biases=biases)
            ntk = empirical_ntk(net, x1, x2, per_example=per_example)
            logs.append(math.log(relative_frobenius(ntk, limit)))
        means.append(math.exp(sum(logs) / len(logs)))
        if log is not None:
            log(f"width {width:>5}: errors " + " ".join(f"{math.exp(v):.4f}" for v in logs)
                + f", geometric mean {means[-1]:.4f}")
    means = np.asarray(means)
    slope = fit_loglog_slope(widths, means) if len(widths) > 1 else float("nan")
    return means, slope
