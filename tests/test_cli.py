"""The ``ntkcompile`` command line, run as a subprocess (``python -m ntkcompile``).

Oracle: ``ntkcompile.compile``/``simulate`` called here in Python on the original
modules (not on the files the command line reads), and the program's IR for the
graph.  The subprocess invocations are independent, so they all start at once
(starting an interpreter that imports torch is most of their cost) and each test
checks its own.  A few further paths (TorchScript, simulate, ``--debug``) run the
same ``main`` in this process, where they cost only their own work.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ntkcompile
from helpers.dot import expected_edges, parse_dot
from models import SharedLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W_STD, B_STD = 1.4, 0.1

CLI_MODELS = '''
import torch
from torch import nn


def mlp(d=5, n=32, out=3):
    return nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, n), nn.Tanh(), nn.Linear(n, out))
'''


def _runs(tmp):
    """name -> argv after ``python -m ntkcompile``."""
    k = ["--W-std", str(W_STD), "--b-std", str(B_STD)]
    return {
        "pt2": ["kernel", "m.pt2", "--x1", "x1.npy", "--x2", "x2.npy", "--out", "k_pt2.npz", "--json", *k],
        "pickle_refused": ["kernel", "pickled.pt", "--x1", "x1.npy", "--out", "k_refused.npz", *k],
        "pickle_trusted": ["kernel", "pickled.pt", "--x1", "x1.npy", "--out", "k_trusted.npz", "--trust-pickle",
                           "--get", "ntk", *k],
        "missing": ["kernel", "nothere.pt2", "--x1", "x1.npy", "--out", "k_missing.npz"],
        "not_a_model": ["kernel", "x1.npy", "--x1", "x1.npy", "--out", "k_notmodel.npz"],
        "shape": ["kernel", "m.pt2", "--x1", "x7.npy", "--out", "k_shape.npz"],
        "get": ["kernel", "m.pt2", "--x1", "x1.npy", "--get", "ntk,fisher", "--out", "k_get.npz"],
        "show": ["show", "models:SharedLinear", "--model-args", "[5, 8]", "--graph", "g.dot", *k],
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Write the models and inputs, start every invocation, collect ``{name: CompletedProcess}``."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "cli_models.py").write_text(CLI_MODELS)
    sys.path.insert(0, str(tmp))
    try:
        import cli_models
    finally:
        sys.path.remove(str(tmp))
    torch.manual_seed(0)
    model = cli_models.mlp()
    rng = np.random.default_rng(0)
    data = {"x1": rng.normal(size=(6, 5)), "x2": rng.normal(size=(4, 5)), "x7": rng.normal(size=(3, 7))}
    for name, arr in data.items():
        np.save(tmp / f"{name}.npy", arr)
    data["xt"], data["yt"] = rng.normal(size=(10, 5)), np.arange(10) % 3
    np.savez(tmp / "data.npz", x=data["xt"], y=data["yt"])
    torch.export.save(torch.export.export(model, (torch.randn(2, 5),)), tmp / "m.pt2")
    torch.jit.save(torch.jit.script(model), tmp / "m.ts")
    torch.save(model, tmp / "pickled.pt")
    torch.save(model.state_dict(), tmp / "sd.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), str(tmp)]),
               OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, "-m", "ntkcompile", *argv], cwd=tmp, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in _runs(tmp).items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return tmp, model, data, results


def _main(tmp, argv, monkeypatch, capsys):
    """``ntkcompile.cli.main(argv)`` in ``tmp``: ``(exit status, stdout, stderr)``."""
    from ntkcompile.cli import main
    monkeypatch.chdir(tmp)
    monkeypatch.syspath_prepend(str(tmp))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _kernels(model, x1, x2=None, get=("nngp", "ntk")):
    kfn = ntkcompile.compile(model, W_std=W_STD, b_std=B_STD)
    k = kfn(torch.from_numpy(x1), None if x2 is None else torch.from_numpy(x2), get=get)
    return {name: getattr(k, name).numpy() for name in get}


def _assert_close(got, want, tol=1e-10):
    for name, w in want.items():
        assert got[name].shape == w.shape
        assert np.abs(got[name] - w).max() <= tol * np.abs(w).max(), name


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result


def test_kernel_of_an_exported_archive_equals_compile_in_python(cli):
    tmp, model, data, results = cli
    r = _ok(results["pt2"])
    summary = json.loads(r.stdout)
    assert summary["n1"] == 6 and summary["n2"] == 4 and summary["get"] == ["nngp", "ntk"]
    with np.load(tmp / "k_pt2.npz") as z:
        assert set(z.files) == {"nngp", "ntk", "quad_error"}        # tanh: quadrature, with its estimate
        _assert_close(dict(z), _kernels(model, data["x1"], data["x2"]))
        assert summary["quad_error"] == pytest.approx(float(z["quad_error"]))


def test_a_pickled_module_is_refused_without_trust_pickle_and_loads_with_it(cli):
    tmp, model, data, results = cli
    r = results["pickle_refused"]
    assert r.returncode == 2 and not (tmp / "k_refused.npz").exists()
    assert "--trust-pickle" in r.stderr and "arbitrary code" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    _ok(results["pickle_trusted"])
    with np.load(tmp / "k_trusted.npz") as z:
        _assert_close(dict(z), _kernels(model, data["x1"], get=("ntk",)))


def test_a_torchscript_archive_is_converted(cli, monkeypatch, capsys):
    tmp, model, data, _ = cli
    status, _, err = _main(tmp, ["kernel", "m.ts", "--x1", "x1.npy", "--out", "k_ts.npz",
                                 "--W-std", str(W_STD), "--b-std", str(B_STD)], monkeypatch, capsys)
    assert status == 0, err
    with np.load(tmp / "k_ts.npz") as z:
        _assert_close(dict(z), _kernels(model, data["x1"]))


@pytest.mark.parametrize("name, words", [
    ("missing", "no such file: nothere.pt2"),
    ("not_a_model", "x1.npy is not a model"),
    ("shape", "exported for inputs of shape (N, 5), got inputs of shape (N, 7)"),
    ("get", "unknown kernel 'fisher'"),
])
def test_bad_input_is_one_line_and_exit_status_2(cli, name, words):
    tmp, _, _, results = cli
    r = results[name]
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not list(tmp.glob(f"k_{name}*.npz"))


def test_a_factory_whose_input_does_not_fit_and_debug(cli, monkeypatch, capsys):
    tmp = cli[0]
    argv = ["kernel", "cli_models:mlp", "--x1", "x7.npy", "--out", "k_fit.npz"]
    status, _, err = _main(tmp, argv, monkeypatch, capsys)
    assert status == 2 and "inputs of shape (N, 7) do not fit cli_models:mlp" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ntkcompile.InputShapeError):          # --debug: the exception itself
        _main(tmp, argv + ["--debug"], monkeypatch, capsys)


def test_show_prints_the_program_and_writes_its_graph(cli):
    tmp, _, _, results = cli
    r = _ok(results["show"])
    kfn = ntkcompile.compile(SharedLinear(5, 8), W_std=W_STD, b_std=B_STD)
    assert r.stdout.strip() == kfn.program.strip()          # the same program, printed
    nodes, edges, _ = parse_dot((tmp / "g.dot").read_text())
    got = {(s, d, a["class"], a.get("label", "").split("\\n")[0]) for s, d, a in edges}
    assert got == expected_edges(kfn._program)
    assert sum(a["class"] == "matrix" and a["label"] == "b" for _, _, a in edges) == 2   # weight sharing


def test_simulate_writes_the_trajectory_of_ntkcompile_simulate(cli, monkeypatch, capsys):
    tmp, model, data, _ = cli
    argv = ["simulate", "cli_models:mlp", "--state-dict", "sd.pt", "--x-train", "data.npz:x", "--y-train",
            "data.npz:y", "--x-test", "x2.npy", "--loss", "cross_entropy", "--lr", "2", "--steps", "6",
            "--batch-size", "4", "--seed", "3", "--out", "traj.npz", "--plot", "traj.png", "--json",
            "--W-std", str(W_STD), "--b-std", str(B_STD)]
    status, out, err = _main(tmp, argv, monkeypatch, capsys)
    assert status == 0, err
    assert json.loads(out)["steps"] == 6 and (tmp / "traj.png").stat().st_size > 0
    kfn = ntkcompile.compile(model, W_std=W_STD, b_std=B_STD)
    traj = ntkcompile.simulate(kfn, torch.from_numpy(data["xt"]), torch.from_numpy(data["yt"]),
                               torch.from_numpy(data["x2"]), loss="cross_entropy", lr=2.0, steps=6,
                               batch_size=4, seed=3)
    with np.load(tmp / "traj.npz") as z:
        _assert_close(dict(z), {"train": traj.train.numpy(), "test": traj.test.numpy(), "loss": traj.loss.numpy()})
        assert list(z["step"]) == list(range(7))


def test_demo_and_bench_pass_their_arguments_on(monkeypatch, capsys):
    from ntkcompile.cli import commands, main
    with pytest.raises(SystemExit) as e:                   # the demo's own --help
        main(["demo", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(commands.subprocess, "call", lambda argv, env: calls.append((argv, env)) or 0)
    assert main(["bench", "--n", "10"]) == 0
    (argv, env), = calls
    assert argv[0] == sys.executable and argv[1].endswith(os.path.join("benchmarks", "mlp_timing.py"))
    assert os.path.exists(argv[1]) and argv[2:] == ["--n", "10"] and env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
