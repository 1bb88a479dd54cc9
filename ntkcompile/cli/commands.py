"""The command line's subcommands: ``kernel``, ``show``, ``simulate``, ``demo``, ``bench``.

Each takes the parsed arguments and returns the exit status; bad input raises
``BadInput`` (exit status 2, see ``cli/__init__.py``).  Everything is checked
before anything is computed or written, and outputs are written whole or not
at all (a temporary file renamed into place).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from ..compiled import compile as compile_kernel
from ..dynamics import simulate as run_simulate
from ..errors import InputShapeError
from ..export import is_exported_program
from ..ir.graph import render
from .load import BadInput, load_array, load_model

_KERNELS = ("nngp", "ntk")


def kernel(args) -> int:
    gets = _gets(args.get)
    _check_out(args.out, ".npz")
    x1 = _batch(load_array(args.x1, args.key, "--x1"), "--x1")
    x2 = None if args.x2 is None else _batch(load_array(args.x2, args.key, "--x2"), "--x2")
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise InputShapeError(f"--x2 has inputs of shape {tuple(x2.shape[1:])}, --x1 of shape {tuple(x1.shape[1:])}")
    model = _model(args, x1[:2])
    kfn = _compile(model, args, tuple(x1.shape[1:]))
    start = time.perf_counter()
    try:
        k = kfn(x1, x2, get=gets, tile_size=args.tile_size, progress=args.progress)
    except (ValueError, TypeError) as e:
        raise BadInput(str(e)) from e
    seconds = time.perf_counter() - start
    arrays = {name: getattr(k, name).cpu().numpy() for name in gets}
    for name in ("mc_stderr", "quad_error"):
        if getattr(k, name) is not None:
            arrays[name] = np.float64(getattr(k, name))
    _save_npz(args.out, arrays)
    summary = {"command": "kernel", "model": args.model, "model_name": kfn.model_name,
               "input_shape": list(kfn.input_shape), "n1": x1.shape[0], "n2": x1.shape[0] if x2 is None else x2.shape[0],
               "get": list(gets), "out": args.out, "dtype": args.dtype, "device": str(args.device or "cpu"),
               "seconds": round(seconds, 4), "mc_stderr": k.mc_stderr, "quad_error": k.quad_error}
    if args.json:
        print(json.dumps(summary))
    else:
        shape = f"{summary['n1']} x {summary['n2']}"
        print(f"ntkcompile kernel: {', '.join(gets)} ({shape}) of {kfn.model_name} -> {args.out} ({seconds:.2f} s)")
    return 0


def show(args) -> int:
    shape = _shape(args.input_shape) if args.input_shape else None
    example = None if shape is None else torch.zeros((2,) + shape)
    model = _model(args, example)
    kfn = _compile(model, args, shape)
    if kfn.input_shape is None:
        raise BadInput(f"the Tensor Program of {args.model} depends on the shape of its input, which it does "
                       "not say: pass --input-shape, e.g. --input-shape 3,32,32")
    print(kfn.program)
    if args.code:
        print("\n" + kfn.code)
    if args.graph:
        _check_out(args.graph, None)
        written = render(kfn.graph(), args.graph)
        print(f"ntkcompile show: wrote the graph to {written}", file=sys.stderr)
    return 0


def simulate(args) -> int:
    _check_out(args.out, ".npz")
    if args.plot:
        _check_out(args.plot, None)
    x_train = _batch(load_array(args.x_train, args.key, "--x-train"), "--x-train")
    y = load_array(args.y_train, args.key, "--y-train")
    x_test = None if args.x_test is None else _batch(load_array(args.x_test, args.key, "--x-test"), "--x-test")
    if y.shape[0] != x_train.shape[0]:
        raise BadInput(f"--y-train has {y.shape[0]} rows, --x-train {x_train.shape[0]}")
    if args.loss == "cross_entropy":
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise BadInput("--loss cross_entropy needs class indices in --y-train (integers)")
        y = y.long()
    else:
        y = y.double()
    model = _model(args, x_train[:2])
    kfn = _compile(model, args, tuple(x_train.shape[1:]))
    start = time.perf_counter()
    try:
        traj = run_simulate(kfn, x_train.double(), y, None if x_test is None else x_test.double(), loss=args.loss,
                            lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                            f0=None if args.f0 == "zero" else "prior", seed=args.seed)
    except (ValueError, TypeError) as e:
        raise BadInput(str(e)) from e
    arrays = {"train": traj.train.numpy(), "loss": traj.loss.numpy(), "step": np.arange(args.steps + 1)}
    if traj.test is not None:
        arrays["test"] = traj.test.numpy()
    _save_npz(args.out, arrays)
    if args.plot:
        _plot(traj, args)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"command": "simulate", "model": args.model, "model_name": kfn.model_name,
                          "steps": args.steps, "loss": args.loss, "lr": args.lr, "out": args.out,
                          "plot": args.plot, "final_loss": float(traj.loss[-1]), "seconds": round(seconds, 4)}))
    else:
        print(f"ntkcompile simulate: {args.steps} steps, train loss {float(traj.loss[0]):.4g} -> "
              f"{float(traj.loss[-1]):.4g}; wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def demo(args) -> int:
    from .. import demo as demo_module
    return int(demo_module.main(args.args) or 0)


def bench(args) -> int:
    """``benchmarks/mlp_timing.py`` of the source tree, in a subprocess importing this package."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "mlp_timing.py")
    if not os.path.exists(script):
        raise BadInput("the benchmarks ship with the source tree (benchmarks/ beside the ntkcompile package), "
                       "which this installation does not have; run from a checkout")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.call([sys.executable, script, *args.args], env=env)


# -- helpers ----------------------------------------------------------------------------

def _gets(text):
    gets = tuple(g.strip() for g in text.split(",") if g.strip())
    bad = [g for g in gets if g not in _KERNELS]
    if bad or not gets:
        raise BadInput(f"--get {text!r}: unknown kernel {', '.join(map(repr, bad)) or '(none)'}; "
                       "choose from nngp, ntk (e.g. --get nngp,ntk)")
    return tuple(dict.fromkeys(gets))


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise BadInput(f"--input-shape {text!r}: expected positive integers such as 3,32,32")
    return shape


def _batch(x, what):
    if x.ndim < 2:
        raise BadInput(f"{what} has shape {tuple(x.shape)}: inputs need a batch axis first, (N, features...)")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16)):
        raise BadInput(f"{what} holds {x.dtype} values, not real numbers")
    return x.double()


def _model(args, example):
    model = load_model(args.model, model_args=args.model_args, state_dict=args.state_dict,
                       trust_pickle=args.trust_pickle, example=example)
    if example is not None:
        _check_fits(model, example, args.model)
    return model


def _check_fits(model, example, name):
    """Run the model once on two inputs: a shape that does not fit fails here, with torch's reason."""
    if is_exported_program(model):
        val = next((n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"
                    and n.name in model.graph_signature.user_inputs), None)
        shape = tuple(val.shape[1:]) if isinstance(val, torch.Tensor) else None
        if shape is not None and all(isinstance(s, int) for s in shape) and shape != tuple(example.shape[1:]):
            raise InputShapeError(f"{name} was exported for inputs of shape (N, {', '.join(map(str, shape))}), "
                                  f"got inputs of shape (N, {', '.join(map(str, example.shape[1:]))})")
        return
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    try:
        with torch.no_grad():
            model(example.to(dtype))
    except Exception as e:
        reason = " ".join(str(e).split()[:40])
        raise InputShapeError(f"inputs of shape (N, {', '.join(map(str, example.shape[1:]))}) do not fit "
                              f"{name}: {type(e).__name__}: {reason}") from e


def _compile(model, args, input_shape):
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {args.device}: no CUDA device is available")
    try:
        return compile_kernel(model, W_std=args.W_std, b_std=args.b_std, input_shape=input_shape,
                              dtype=getattr(torch, args.dtype), device=args.device, jit=args.jit,
                              quadrature_degree=args.quadrature_degree)
    except (ValueError, TypeError) as e:
        if isinstance(e, InputShapeError):
            raise
        raise BadInput(str(e)) from e


def _check_out(path, suffix):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BadInput(f"cannot write {path}: no such folder {folder}")
    if suffix and not path.endswith(suffix):
        raise BadInput(f"{path}: the output is an {suffix} file; name it so")


def _save_npz(path, arrays):
    """Write ``arrays`` to ``path`` in one piece (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plot(traj, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BadInput("--plot needs matplotlib (pip install matplotlib)") from e
    steps = np.arange(args.steps + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(steps, traj.loss.numpy())
    ax1.set_yscale("log" if args.loss == "mse" and float(traj.loss.min()) > 0 else "linear")
    ax1.set(xlabel="SGD step", ylabel=f"train {args.loss}", title="training loss at infinite width")
    shown = traj.test if traj.test is not None else traj.train
    for p in range(min(4, shown.shape[1])):
        ax2.plot(steps, shown[:, p, 0].numpy(), label=f"{'test' if traj.test is not None else 'train'} point {p}")
    ax2.set(xlabel="SGD step", ylabel="output 0", title="outputs f_t(x)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)
