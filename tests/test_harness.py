"""Finite networks trained by SGD against the infinite-width recursion (TP IIb).

Oracle: real finite networks (``ntk_parametrize``-d, float64, ``torch.optim.SGD``)
trained on sklearn's 8x8 digits. From each network's own ``f_0``, the max over
steps, points and outputs of ``|f_t - f_t^inf|`` must fall like ``width^(-1/2)``
(TP IIb Thm. 5.3; docs Sec. 6-7): the fitted log-log slope lies in [-0.7, -0.3].

Run the full sweeps with ``pytest -m slow tests/test_harness.py``.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from ntkcompile import demo, dynamics
from ntkcompile.errors import DivergenceError, NonFiniteLossError
from ntkcompile.harness import compare_widths, fit_loglog_slope, train_finite

W_STD, B_STD = 1.4, 0.1
LR = {"mse": 1.0, "cross_entropy": 2.0}
STEPS, BATCH = 20, 32


# SGD and simulate are thousands of small ops: one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits_data(64, 32, seed=0)


def _mlp(act):
    return lambda n: nn.Sequential(nn.Linear(64, n), act(), nn.Linear(n, n), act(), nn.Linear(n, 10))


def _cnn(n):
    return nn.Sequential(nn.Conv2d(1, n, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, 10))


# name: (factory, input shape of one example)
MODELS = {
    "relu_mlp": (_mlp(nn.ReLU), (64,)),
    "tanh_mlp": (_mlp(nn.Tanh), (64,)),
    "cnn": (_cnn, (1, 8, 8)),
}


def _setup(name, loss, digits):
    """Inputs, targets and compiled kernel."""
    factory, shape = MODELS[name]
    x_train, y_train, x_test, _ = digits
    x_train, x_test = x_train.reshape(-1, *shape), x_test.reshape(-1, *shape)
    kfn = ntkcompile.compile(factory(16), W_std=W_STD, b_std=B_STD, input_shape=shape)
    y = F.one_hot(y_train, 10).double() if loss == "mse" else y_train
    return factory, kfn, x_train, y, x_test


def _sweep(name, loss, digits, widths, seeds):
    factory, kfn, x_train, y, x_test = _setup(name, loss, digits)
    return compare_widths(
        factory, widths, x_train, y, x_test, W_std=W_STD, b_std=B_STD, loss=loss, lr=LR[loss],
        steps=STEPS, batch_size=BATCH, seeds=seeds, kfn=kfn,
    )


# ---------------------------------------------------------------------------
# The harness replays simulate's own batches from the network's own f_0.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_infinite_run_is_simulate_with_batch_size_from_own_f0(loss, digits):
    factory, kfn, x_train, y, x_test = _setup("relu_mlp", loss, digits)
    report = compare_widths(factory, [32], x_train, y, x_test, W_std=W_STD, b_std=B_STD, loss=loss,
                            lr=LR[loss], steps=5, batch_size=BATCH, seeds=(3,), kfn=kfn)
    fin, inf = report.finite[32, 3], report.infinite[32, 3]
    assert fin.train.shape == inf.train.shape == (6, 64, 10)
    assert fin.test.shape == (6, 32, 10)
    f0 = torch.cat([fin.train[0], fin.test[0]])
    direct = dynamics.simulate(kfn, x_train, y, x_test, loss=loss, lr=LR[loss], steps=5,
                               batch_size=BATCH, seed=3, f0=f0)
    torch.testing.assert_close(inf.train, direct.train, rtol=0, atol=0)
    torch.testing.assert_close(inf.test, direct.test, rtol=0, atol=0)
    # The finite network really trained, and its recorded loss is the loss of its outputs.
    assert fin.loss[-1] < fin.loss[0]
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    assert math.isclose(float(fin.loss[2]), float(loss_fn(fin.train[2], y)), rel_tol=1e-12)
    gap = max(float((fin.train - inf.train).abs().max()), float((fin.test - inf.test).abs().max()))
    assert report.gaps[0, 0] == gap


# ---------------------------------------------------------------------------
# Acceptance: gap ~ width^(-1/2) for ReLU/tanh MLPs and a CNN, MSE and CE.
# ---------------------------------------------------------------------------


def test_gap_slope_relu_mse_fast(digits):
    # One seed, three widths (~12 s). Over init seeds 0..7 this configuration's
    # slope is -0.50 +- 0.09 (mean +- std; seed 0 gives -0.41: gaps 0.50,
    # 0.30, 0.16), so the band [-0.7, -0.3] is about +-2 sigma.
    report = _sweep("relu_mlp", "mse", digits, widths=(256, 1024, 4096), seeds=(0,))
    assert np.all(np.diff(report.gaps[:, 0]) < 0), report.table()
    assert -0.7 <= report.slope <= -0.3, report.table()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["relu_mlp", "tanh_mlp", "cnn"])
def test_gap_slope_acceptance(name, loss, digits):
    # Geometric mean over 3 seeds; measured slopes (widths 256..4096):
    # relu mse -0.50, relu CE -0.48, tanh mse -0.41, tanh CE -0.44.
    report = _sweep(name, loss, digits, widths=(256, 512, 1024, 2048, 4096), seeds=(0, 1, 2))
    assert report.mean_gaps[-1] < report.mean_gaps[0], report.table()
    assert -0.7 <= report.slope <= -0.3, report.table()


# ---------------------------------------------------------------------------
# docs Sec. 7: 1-hidden-layer ReLU, SGD batch 1, MSE, lr 0.5, 12 steps.
# ---------------------------------------------------------------------------

TP_WIDTHS = (256, 1024, 4096, 16384)
TP_GAPS = (0.16, 0.064, 0.030, 0.018)  # slope -0.525


@pytest.mark.filterwarnings("error:simulate:RuntimeWarning")
def test_tp_one_hidden_layer_batch_one(digits):
    """The docs give gaps only, not the setup. Assumed here (the data are ours):

    * ``Linear(64, n, bias=False) -> ReLU -> Linear(n, 1, bias=False)``, NTK
      parametrization, ``W_std = 1``: then ``NTK(x, x) = |x|^2 / d``;
    * 12 digits scaled onto the sphere ``|x|^2 = d``, so ``NTK(x, x) = 1`` and a
      step of lr 0.5 on ``(f - y)^2`` fits its one example exactly (a natural
      reason for lr 0.5); targets +-1 (digit parity); 32 test points;
    * batch 1 = one shuffled epoch (simulate's scheme), 12 steps;
    * gap over train and test points; geometric mean over 8 seeds.

    Measured: 0.27, 0.12, 0.061, 0.035 (slope -0.49), 1.7-2.0x the docs'
    numbers: same order of magnitude, same ``width^(-1/2)`` law. simulate must
    not warn (warnings are errors here): for batch-1 SGD its stability bound is
    the per-example ``lr <= |B| out / NTK(x, x) = 1``, not the full-batch limit
    ``N out / lambda_max(NTK)`` that lr 0.5 exceeds.
    """
    x_train, y_train, x_test, _ = digits
    sphere = lambda x: x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    x_train, x_test = sphere(x_train[:12]), sphere(x_test)
    y = (y_train[:12] % 2) * 2 - 1.0
    factory = lambda n: nn.Sequential(nn.Linear(64, n, bias=False), nn.ReLU(), nn.Linear(n, 1, bias=False))
    report = compare_widths(factory, TP_WIDTHS, x_train, y, x_test, W_std=1.0, b_std=0.0, loss="mse",
                            lr=0.5, steps=12, batch_size=1, seeds=range(8))
    ratio = report.mean_gaps / np.asarray(TP_GAPS)
    assert np.all((ratio > 1 / 3) & (ratio < 3)), (ratio, report.table())
    assert -0.7 <= report.slope <= -0.3, report.table()
    assert -0.7 <= fit_loglog_slope(TP_WIDTHS, TP_GAPS) <= -0.3  # the docs' own numbers obey the law


# ---------------------------------------------------------------------------
# Finite runs that diverge say so (issue 9).
# ---------------------------------------------------------------------------


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)


def _tiny(n):
    return nn.Sequential(nn.Linear(4, n), nn.ReLU(), nn.Linear(n, 2))


TINY = dict(W_std=W_STD, b_std=B_STD)


def test_train_finite_divergence_names_width_seed_step_and_lr():
    x, y, xt = _tiny_data()
    with pytest.raises(DivergenceError) as err:
        train_finite(_tiny, 32, x, y, xt, **TINY, lr=100.0, steps=200, seed=3)
    step, msg = err.value.step, str(err.value)
    assert err.value.lr == 100.0 and 0 < step < 200
    assert msg.startswith("train_finite: width 32, seed 3:") and f"step {step} of 200" in msg
    assert "lr = 100, batch size 16 of N = 16, loss 'mse'" in msg and "Lower lr" in msg
    # Oracle: the same run one step shorter is finite throughout, so `step` is the first bad one.
    ok = train_finite(_tiny, 32, x, y, xt, **TINY, lr=100.0, steps=step - 1, seed=3)
    assert all(torch.isfinite(v).all() for v in (ok.train, ok.test, ok.loss))


def test_compare_widths_names_the_width_and_the_infinite_width_bound():
    x, y, xt = _tiny_data()
    kfn = ntkcompile.compile(_tiny(16), **TINY, input_shape=(4,))
    with pytest.raises(DivergenceError) as err:
        compare_widths(_tiny, [16, 32], x, y, xt, **TINY, lr=100.0, steps=40, batch_size=4, seeds=(2,), kfn=kfn)
    msg = str(err.value)
    assert msg.startswith("compare_widths: train_finite: width 16, seed 2:")
    assert isinstance(err.value.__cause__, DivergenceError) and err.value.step == err.value.__cause__.step
    # The bound for seed 2's batches: shuffled epochs cut in fours, numpy's eigvalsh per batch.
    g, batches = torch.Generator().manual_seed(2), []
    while len(batches) < 40:
        perm = torch.randperm(16, generator=g).numpy()
        batches += [perm[i : i + 4] for i in range(0, 16, 4)]
    k = kfn(x).ntk.numpy()
    bound = min(4 * 2 / np.linalg.eigvalsh(k[np.ix_(b, b)]).max() for b in batches[:40])
    distinct = len({tuple(sorted(b)) for b in batches[:40]})
    assert "Infinite-width bound for this schedule: the minibatch mean-MSE stability bound" in msg
    assert f"= {bound:.6g} (the smallest over the {distinct} distinct batches" in msg


def test_train_finite_callable_loss_failures_blame_the_loss():
    x, y, xt = _tiny_data()
    nan_on_small_batches = lambda f, t: F.mse_loss(f, t) * (math.nan if f.shape[0] < 16 else 1.0)
    batches = [torch.arange(16)] * 2 + [torch.arange(4)] * 2
    with pytest.raises(NonFiniteLossError, match="returned nan on the batch of step 3 of 4, although") as err:
        train_finite(_tiny, 32, x, y, xt, **TINY, loss=nan_on_small_batches, lr=0.1, steps=4, batches=batches)
    assert err.value.step == 3 and isinstance(err.value, DivergenceError)
    # Value 0, gradient 0/0.
    sqrt_of_square = lambda f, t: torch.sqrt((f - f.detach()) ** 2).mean()
    with pytest.raises(NonFiniteLossError, match="has a non-finite gradient on the batch of step 1 of 3"):
        train_finite(_tiny, 32, x, y, xt, **TINY, loss=sqrt_of_square, lr=0.1, steps=3)


# ---------------------------------------------------------------------------
# The demo (quick mode) writes its report.
# ---------------------------------------------------------------------------


def test_demo_quick_writes_report(tmp_path, capsys):
    assert demo.main(["--quick", "--out", tmp_path]) == 0
    for name in ("summary.txt", "accuracy.png", "gap_vs_width_mlp.png", "trajectories_mlp.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.txt").read_text()
    assert "slope:" in summary and "NTK regression" in summary
    slope = float(summary.split("slope:")[1].split()[0])
    assert -1.0 < slope < -0.2, summary
    # the relative gap (max gap over the outputs' rms) falls too, and every accuracy of the
    # SGD comparison is on the same tracked test points as kernel regression's
    assert -1.0 < float(summary.split("relative-gap slope:")[1].split()[0]) < -0.2, summary
    assert "NTK regression on the 16 tracked" in summary and "SGD infinite width (20 steps, 16 tracked)" in summary
    out = capsys.readouterr().out
    assert "MLP: width" in out  # progress lines
    assert "CNN:" in out
    # the recurrent model: digits read row by row by an nn.GRU, its own sweep (widths up to 512)
    assert (tmp_path / "gap_vs_width_gru.png").stat().st_size > 0
    gru = summary.split("== GRU")[1]
    assert "skipped" not in gru and "GRU: width    512" in out and "GRU: width   2048" not in out
    assert -1.0 < float(gru.split("slope:")[1].split()[0]) < -0.2, gru
    assert float(gru.split("NTK regression (t=inf)")[1].split()[0]) > 0.3     # 10 classes: chance is 0.1


def test_demo_default_is_smaller_than_full_and_full_is_the_old_sweep():
    assert demo.FULL.widths == (256, 512, 1024, 2048, 4096) and demo.FULL.seeds == (0, 1)
    assert max(demo.DEFAULT.widths) < max(demo.FULL.widths)
    assert len(demo.DEFAULT.widths) >= 4 and len(demo.DEFAULT.seeds) >= 3      # a slope, and error bars
    assert len(demo.DEFAULT.widths_of("GRU")) >= 3 and max(demo.DEFAULT.widths_of("GRU")) <= 512   # in 90 s
    assert max(demo.FULL.widths_of("GRU")) > max(demo.DEFAULT.widths_of("GRU"))
    with pytest.raises(SystemExit):
        demo.main(["--full", "--quick"])
