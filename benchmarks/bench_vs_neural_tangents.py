#!/usr/bin/env python
"""Time ntkcompile against neural-tangents 0.6.5 on the same inputs.

    bash benchmarks/setup_nt_env.sh                 # once: creates benchmarks/.nt-venv
    python benchmarks/bench_vs_neural_tangents.py   # runs both, prints a table per case

neural-tangents runs in its own virtual environment (``benchmarks/.nt-venv``,
jax 0.4.30 CPU) through ``_nt_worker.py`` in a subprocess; ntkcompile runs in
this process.  Both compute the float64 NNGP and NTK of ``x`` against itself.
See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _roofline  # noqa: E402
from _load import Busy  # noqa: E402
VENV_PYTHON = HERE / ".nt-venv" / "bin" / "python"
WORKER = HERE / "_nt_worker.py"

# Benchmark the checkout this script lives in, installed or not.
if (HERE.parent / "ntkcompile" / "__init__.py").is_file():
    sys.path.insert(0, str(HERE.parent))

# Must match _nt_worker.CASES (W_std / b_std / depth); widths are those of the
# finite torch model handed to ntkcompile, irrelevant for the limit kernel.
CASES = {
    "mlp8_relu": dict(W_std=1.5, b_std=0.05, depth=8, width=512, n=2000, shape=(100,),
                      desc="8 x [Linear, ReLU] + Linear(., 1)"),
    "cnn3_gap": dict(W_std=1.4, b_std=0.1, depth=3, width=64, n=64, shape=(3, 8, 8),
                     desc="3 x [Conv2d 3x3 pad 1, ReLU] + AdaptiveAvgPool2d(1) + Linear(., 1)"),
    # No closed form on either side: neural-tangents' stax.ElementwiseNumerical (Gauss-Hermite,
    # deg^2 nodes per pair) against ntkcompile's default 2-D quadrature, at equal accuracy.
    "mlp4_tanh": dict(W_std=1.5, b_std=0.1, depth=4, width=512, n=100, shape=(20,),
                      desc="4 x [Linear, Tanh] + Linear(., 1)"),
}
PEAKS: dict = {}        # the machine's bandwidth and matmul rate (_roofline.machine_peaks)
_STREAM = {"cnn3_gap": 0, "mlp8_relu": 1, "mlp4_tanh": 2}     # the inputs' random stream per case


# --------------------------------------------------------------------------- inputs


def make_inputs(case: str, seed: int) -> np.ndarray:
    spec = CASES[case]
    # One independent stream per case, so --cases does not change the inputs.
    rng = np.random.default_rng([seed, _STREAM[case]])
    return rng.standard_normal((spec["n"], *spec["shape"]))


def build_torch_model(case: str, width: int | None = None):
    from torch import nn

    spec = CASES[case]
    w = width or spec["width"]
    layers: list = []
    if case in ("mlp8_relu", "mlp4_tanh"):
        d = spec["shape"][0]
        for _ in range(spec["depth"]):
            layers += [nn.Linear(d, w), nn.ReLU() if case == "mlp8_relu" else nn.Tanh()]
            d = w
        layers += [nn.Linear(d, 1)]
    elif case == "cnn3_gap":
        c = spec["shape"][0]
        for _ in range(spec["depth"]):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1)]
    else:
        raise KeyError(case)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- metrics


def rel_diffs(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |a - ref| / max |ref|, ||a - ref||_F / ||ref||_F)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"kernel shapes differ: {a.shape} vs {ref.shape}")
    d = a - ref
    return float(np.abs(d).max() / np.abs(ref).max()), float(np.linalg.norm(d) / np.linalg.norm(ref))


def offdiag_rel(a: np.ndarray, ref: np.ndarray) -> float:
    """max over i != j of |a - ref| / max |ref|: the NTK agreement away from the diagonal."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    np.fill_diagonal(d, 0.0)
    return float(d.max() / np.abs(ref).max())


def exact_diagonal(case: str, x_np: np.ndarray) -> dict | None:
    """NNGP and NTK of each input with itself for ``mlp8_relu``, by the c = 1 recursion.

    An independent check of the diagonal, where the arc-cosine forms are evaluated at
    c = 1 and rounding of c (to 1 - eps) costs ~1e-8: with E[relu(z)^2] = q/2 and
    E[relu'(z)^2] = 1/2, ``q_1 = W^2 |x|^2/d + b^2``, ``T_1 = q_1``, then per layer
    ``q <- W^2 q/2 + b^2``, ``T <- W^2 T/2 + q``; the readout adds one more step.
    """
    if case != "mlp8_relu":
        return None
    spec = CASES[case]
    w2, b2 = spec["W_std"] ** 2, spec["b_std"] ** 2
    q = w2 * (x_np ** 2).sum(1) / x_np.shape[1] + b2
    t = q.copy()
    for _ in range(spec["depth"] - 1):
        q = w2 * q / 2 + b2
        t = w2 * t / 2 + q
    nngp = w2 * q / 2 + b2
    return {"nngp": nngp, "ntk": w2 * t / 2 + nngp}


# --------------------------------------------------------------------------- neural-tangents


def _nt_env() -> dict:
    """The neural-tangents worker's environment: jax on the CPU, quiet, and nothing from this
    environment's PYTHONPATH leaking into the venv."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    return env


def run_nt(case: str, x_path: str, out_path: str, repeats: int, deg: int | None = None) -> tuple[dict, dict]:
    if not VENV_PYTHON.exists():
        sys.exit(
            f"error: the neural-tangents environment {VENV_PYTHON.parent.parent} does not exist.\n"
            f"Create it first (needs PyPI access, ~3 GB):\n\n    bash {HERE / 'setup_nt_env.sh'}\n\n"
            "or pass --skip-nt to time ntkcompile alone."
        )
    req = {"case": case, "inputs": x_path, "out": out_path, "repeats": repeats, "deg": deg}
    proc = subprocess.run([str(VENV_PYTHON), str(WORKER), json.dumps(req)],
                          capture_output=True, text=True, env=_nt_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        sys.exit(f"error: the neural-tangents worker failed on {case!r} (exit {proc.returncode}):\n{tail}\n"
                 f"If the environment is broken, recreate it: bash {HERE / 'setup_nt_env.sh'} --force")
    result = json.loads(lines[-1])
    with np.load(out_path) as k:
        kernels = {"nngp": k["nngp"], "ntk": k["ntk"]}
    return result, kernels


def run_interleaved(case: str, x_np: np.ndarray, x_path: str, out_path: str, device, jit: bool,
                    rounds: int) -> dict:
    """Warm calls of both libraries taken in turn, ``rounds`` of one each: the machine's speed
    drifts by 15-25% over minutes here (both libraries' warm times move together between
    runs), so a ratio of calls made seconds apart is steadier than one of bests taken minutes
    apart.  neural-tangents' worker stays up and serves one call per request."""
    import torch

    import ntkcompile

    req = {"case": case, "inputs": x_path, "out": out_path, "repeats": 1, "serve": True}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(VENV_PYTHON), str(WORKER), json.dumps(req)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=_nt_env())
        try:
            if not proc.stdout.readline().strip():          # its own result: the worker is warm
                err.seek(0)
                sys.exit(f"error: the neural-tangents worker failed on {case!r}:\n{err.read()[-3000:]}")
            spec = CASES[case]
            torch.manual_seed(0)
            kfn = ntkcompile.compile(build_torch_model(case).to(device), W_std=spec["W_std"], b_std=spec["b_std"],
                                     jit=jit)
            x = torch.as_tensor(x_np, dtype=torch.float64, device=device)

            def call():
                kfn(x, None, get=("nngp", "ntk"), progress=False)
                _sync(device)

            call()
            call()
            nt, nc = [], []
            for _ in range(rounds):
                proc.stdin.write("call\n")
                proc.stdin.flush()
                nt.append(json.loads(proc.stdout.readline())["t"])
                t0 = time.perf_counter()
                call()
                nc.append(time.perf_counter() - t0)
        finally:
            proc.stdin.close()
            proc.wait()
    ratios = sorted(a / b for a, b in zip(nt, nc))
    return {"nt_s": nt, "nc_s": nc, "ratios": ratios, "median_ratio": float(np.median(ratios))}


# --------------------------------------------------------------------------- ntkcompile


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run_ntkcompile(case: str, x_np: np.ndarray, repeats: int, device, jit: bool = False,
                   roofline: bool = False, **options) -> tuple[dict, dict]:
    """Compile and time in this process; ``cold_s`` here is the first call in a process
    that has already compiled other cases (``run_cold`` measures a new process)."""
    import torch

    import ntkcompile

    spec = CASES[case]
    torch.manual_seed(0)
    model = build_torch_model(case).to(device)
    x = torch.as_tensor(x_np, dtype=torch.float64, device=device)
    get = ("nngp", "ntk")

    _sync(device)
    t0 = time.perf_counter()
    kfn = ntkcompile.compile(model, W_std=spec["W_std"], b_std=spec["b_std"], jit=jit, **options)
    t_compile = time.perf_counter() - t0
    out = kfn(x, None, get=get, progress=False)
    _sync(device)
    cold = time.perf_counter() - t0

    def call():
        o = kfn(x, None, get=get, progress=False)
        _sync(device)
        return o

    warm = []
    if repeats:
        call()  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t0)

    kernels = {k: getattr(out, k).detach().to("cpu", torch.float64).numpy() for k in get}
    work = _roofline.traffic(kfn, x) if roofline and device.type == "cpu" and not jit else None
    return {"cold_s": cold, "compile_s": t_compile, "warm_s": min(warm) if warm else None,
            "warm_all_s": warm, "work": work, "quad_error": out.quad_error}, kernels


def run_cold(case: str, x_path: str, device: str, jit: bool, first_use: bool = False) -> dict:
    """ntkcompile's cold time in a new process: ``compile`` plus the first call, after the
    imports (as neural-tangents' cold time is its first jitted call, after its imports).
    ``first_use``: with an empty cache of fused kernels, as on a machine that never ran
    ntkcompile (the C kernels are then compiled within the first call)."""
    req = {"case": case, "inputs": x_path, "device": device, "jit": jit}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, **({"NTKCOMPILE_CACHE": cache} if first_use else {}))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cold-worker", json.dumps(req)],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: the ntkcompile cold-start worker failed on {case!r}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _cold_worker(text: str) -> int:
    import torch

    req = json.loads(text)
    with np.load(req["inputs"]) as f:
        x_np = f["x"]
    res, _ = run_ntkcompile(req["case"], x_np, 0, torch.device(req["device"]), jit=req["jit"])
    print(json.dumps({"cold_s": res["cold_s"], "compile_s": res["compile_s"]}))
    return 0


def run_empirical(case: str, x_np: np.ndarray, n: int, width: int, device) -> dict:
    """Empirical NTK of the case's MLP at finite ``width`` via torch.func."""
    import torch

    import ntkcompile
    from ntkcompile.empirical import empirical_ntk

    spec = CASES[case]
    torch.manual_seed(0)
    model = build_torch_model(case, width=width).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    ntk_parametrize = getattr(ntkcompile, "ntk_parametrize", None)
    if ntk_parametrize is None:  # not re-exported at the top level yet
        from ntkcompile.parametrize import ntk_parametrize
    net = ntk_parametrize(model, spec["W_std"], spec["b_std"], generator=gen)
    x = torch.as_tensor(x_np[:n], dtype=torch.float64, device=device)
    _sync(device)
    t0 = time.perf_counter()
    k = empirical_ntk(net, x)
    _sync(device)
    t = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())
    return {"time_s": t, "n": n, "width": width, "n_params": n_params,
            "ntk": k.detach().to("cpu", torch.float64).numpy()}


# --------------------------------------------------------------------------- report


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _cold(nc: dict | None):
    return None if nc is None else nc.get("cold_new_process_s", nc["cold_s"])


def print_case(case: str, x_np: np.ndarray, repeats: int, nt: dict | None, nc: dict | None,
               diffs: dict, entk: dict | None, busy: dict | None = None, duty: float = 0.0,
               turns: dict | None = None) -> None:
    spec = CASES[case]
    print()
    print(f"== {case}: {spec['desc']}, W_std={spec['W_std']}, b_std={spec['b_std']}")
    print(f"   {x_np.shape[0]} inputs of shape {tuple(x_np.shape[1:])}, NNGP + NTK of x with itself, float64")
    rows = [("", "neural-tangents", "ntkcompile", "NT/ntkcompile")]
    nt_cold = nt["cold_s"] if nt else None
    nt_warm = nt["warm_s"] if nt else None
    nc_cold = _cold(nc)
    nc_warm = nc["warm_s"] if nc else None
    rows.append(("cold: new process, first call", _fmt_t(nt_cold), _fmt_t(nc_cold), _fmt_ratio(nt_cold, nc_cold)))
    if nc and nc.get("cold_first_use_s"):
        first = nc["cold_first_use_s"]
        rows.append(("cold, first use (C kernels built)", _fmt_t(nt_cold), _fmt_t(first), _fmt_ratio(nt_cold, first)))
    rows.append((f"warm: best of {repeats}", _fmt_t(nt_warm), _fmt_t(nc_warm), _fmt_ratio(nt_warm, nc_warm)))
    if turns:
        r = turns["ratios"]
        rows.append((f"warm, in turns: medians of {len(r)}", _fmt_t(float(np.median(turns["nt_s"]))),
                     _fmt_t(float(np.median(turns["nc_s"]))), f"{turns['median_ratio']:.2f}x"))
    if busy:
        b_nt, b_nc = busy.get("nt"), busy.get("nc")
        for label, a, b in (("cold", b_nt and b_nt["cold_s"], _cold(b_nc)),
                            ("warm", b_nt and b_nt["warm_s"], b_nc and b_nc["warm_s"])):
            rows.append((f"busy ({duty:.0%} of every core): {label}", _fmt_t(a), _fmt_t(b), _fmt_ratio(a, b)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if turns:
        r = turns["ratios"]
        print(f"   in turns: NT/ntkcompile per round {r[0]:.2f}x to {r[-1]:.2f}x (median {turns['median_ratio']:.2f}x)")
    if nc and nc.get("work") and PEAKS:
        print(f"   ntkcompile warm: {_roofline.fractions(nc['work'], nc['warm_s'], PEAKS)}")
    for k in ("nngp", "ntk"):
        if k in diffs:
            mx, fro = diffs[k]
            print(f"   {k.upper():4s} ntkcompile vs NT: max|a-b|/max|b| = {mx:.2e}   rel. Frobenius = {fro:.2e}")
    if "ntk_offdiag" in diffs:
        print(f"   NTK  ntkcompile vs NT off the diagonal: max|a-b|/max|b| = {diffs['ntk_offdiag']:.2e}")
    for who, errs in diffs.get("diag_vs_exact", {}).items():
        print(f"   diagonal vs the exact c = 1 recursion, {who:15s}: NNGP {errs['nngp']:.1e}, "
              f"NTK {errs['ntk']:.1e} (max relative)")
    if entk is not None:
        sub = "" if entk["n"] == x_np.shape[0] else f" (first {entk['n']} of {x_np.shape[0]} inputs, for time)"
        print(f"   empirical NTK, width {entk['width']} ({entk['n_params']:,} params), torch.func{sub}: "
              f"{_fmt_t(entk['time_s'])}")
        for ref, (mx, fro) in entk["diffs"].items():
            print(f"      vs {ref:15s}: max|a-b|/max|b| = {mx:.2e}   rel. Frobenius = {fro:.2e}")


def tanh_case(args, x_np: np.ndarray, x_path: str, tmp: str, device) -> dict:
    """mlp4_tanh: neural-tangents' ElementwiseNumerical at several degrees against
    ntkcompile's default quadrature.  The reference is ntkcompile at quadrature degree 384
    (its own error estimate is printed); neural-tangents' kernels converging to it as the
    degree grows is the independent check.  The time ratio is taken at the lowest degree
    whose error is at most ntkcompile's default error."""
    case = "mlp4_tanh"
    degs = [int(d) for d in args.nt_degs.split(",") if d.strip()]
    ref_run, ref = run_ntkcompile(case, x_np, 0, device, quadrature_degree=384)

    def err(k):
        return max(rel_diffs(k[n], ref[n])[0] for n in ("nngp", "ntk"))

    nc, nc_k = run_ntkcompile(case, x_np, args.repeats, device, roofline=True)
    nc["cold_new_process_s"] = run_cold(case, x_path, args.device, False)["cold_s"]
    nc["err"] = err(nc_k)
    nts = []
    for deg in degs:       # a degree-200 call takes about a minute here: one timed call above 100
        r, k = run_nt(case, x_path, os.path.join(tmp, f"tanh_{deg}.npz"), args.repeats if deg <= 100 else 1,
                      deg=deg)
        r["err"] = err(k)
        nts.append(r)
    match = next((r for r in nts if r["err"] <= nc["err"]), None)
    busy = None
    if args.busy > 0:
        busy = {}
        with Busy(args.busy):
            busy["nc"], _ = run_ntkcompile(case, x_np, args.repeats, device)
            busy["nc"]["cold_new_process_s"] = run_cold(case, x_path, args.device, False)["cold_s"]
            peer = match or nts[-1]          # no degree as accurate: the most accurate one timed
            busy["nt"], _ = run_nt(case, x_path, os.path.join(tmp, "tanh_busy.npz"),
                                   args.repeats if peer["deg"] <= 100 else 1, deg=peer["deg"])
    spec = CASES[case]
    print()
    print(f"== {case}: {spec['desc']}, W_std={spec['W_std']}, b_std={spec['b_std']}")
    print(f"   {x_np.shape[0]} inputs of shape {tuple(x_np.shape[1:])}, NNGP + NTK of x with itself, float64")
    print(f"   reference: ntkcompile at quadrature_degree=384 (estimated quadrature error "
          f"{ref_run['quad_error']:.1e}); neural-tangents converges to it as its degree grows")
    print("   error = max over NNGP, NTK of max|k - ref| / max|ref|")
    for r in nts:
        print(f"   neural-tangents deg={r['deg']:<4d} cold {_fmt_t(r['cold_s']):>9}  warm {_fmt_t(r['warm_s']):>9}  "
              f"error {r['err']:.1e}")
    print(f"   ntkcompile (default)    cold {_fmt_t(_cold(nc)):>9}  warm {_fmt_t(nc['warm_s']):>9}  "
          f"error {nc['err']:.1e}")
    if nc.get("work") and PEAKS:
        print(f"   ntkcompile warm: {_roofline.fractions(nc['work'], nc['warm_s'], PEAKS)}")
    if match is None:
        print(f"   no degree in {degs} reaches ntkcompile's error; pass larger --nt-degs")
    else:
        print(f"   at equal accuracy (deg={match['deg']}): NT/ntkcompile warm {_fmt_ratio(match['warm_s'], nc['warm_s'])}, "
              f"cold {_fmt_ratio(match['cold_s'], _cold(nc))}")
    if busy:
        b_nt, b_nc = busy["nt"], busy["nc"]
        print(f"   busy ({args.busy:.0%} of every core): ntkcompile cold {_fmt_t(_cold(b_nc))}, warm "
              f"{_fmt_t(b_nc['warm_s'])}; neural-tangents deg={b_nt['deg']} cold {_fmt_t(b_nt['cold_s'])}, "
              f"warm {_fmt_t(b_nt['warm_s'])}; NT/ntkcompile warm {_fmt_ratio(b_nt['warm_s'], b_nc['warm_s'])}")
    return {"n": int(x_np.shape[0]), "reference": ref_run, "neural_tangents": nts, "ntkcompile": nc, "equal_accuracy_deg": match and match["deg"],
            "busy": busy, "busy_duty": args.busy}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases (default: all = {','.join(CASES)})")
    p.add_argument("--repeats", type=int, default=3, help="warm calls; the best is reported (default 3)")
    p.add_argument("--device", default="cpu",
                   help="torch device for ntkcompile and the empirical NTK (default cpu); "
                        "neural-tangents always runs on the CPU build of jax")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--nt-only", action="store_true",
                   help="skip ntkcompile.compile: time neural-tangents only (the empirical-NTK "
                        "check still runs, against the neural-tangents NTK, unless --entk-n 0)")
    p.add_argument("--skip-nt", action="store_true", help="skip neural-tangents: time ntkcompile only")
    p.add_argument("--entk-n", type=int, default=200,
                   help="inputs for the empirical NTK of mlp8_relu (default 200: the 2000 of the "
                        "case take ~100x longer); 0 disables it")
    p.add_argument("--entk-width", type=int, default=1024, help="width of the empirical-NTK MLP (default 1024)")
    p.add_argument("--json", metavar="PATH", help="also write all timings and differences to PATH")
    p.add_argument("--jit", action="store_true",
                   help="compile ntkcompile's generated kernel with torch.compile (fused C++ loops; "
                        "the cold time then includes that compilation)")
    p.add_argument("--busy", type=float, default=0.0, metavar="DUTY",
                   help="also time both libraries while one process per core spins DUTY of the time "
                        "(e.g. 0.5: the machine half busy); default 0: idle only")
    p.add_argument("--nt-degs", default="10,25,50,100,200",
                   help="mlp4_tanh: neural-tangents ElementwiseNumerical degrees to time (default 10,25,50,100,200)")
    p.add_argument("--turns", type=int, default=7, metavar="R",
                   help="also time R rounds of one warm call of each library in turn and report the "
                        "median ratio (steadier on a machine whose speed drifts; default 7, 0: off)")
    p.add_argument("--cold-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_worker:
        return _cold_worker(args.cold_worker)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.nt_only and args.skip_nt:
        p.error("--nt-only and --skip-nt exclude each other")

    device = None
    if not args.nt_only or args.entk_n > 0:
        import torch

        device = torch.device(args.device)

    print(f"ntkcompile vs neural-tangents 0.6.5 | {os.cpu_count()} CPUs | device {args.device} | "
          f"repeats {args.repeats} | seed {args.seed}")
    if device is not None and device.type == "cpu" and not args.nt_only:
        PEAKS.update(_roofline.machine_peaks())
        print(f"machine: {PEAKS['bandwidth_Bps'] / 1e9:.1f} GB/s (float64 add, 256 MiB arrays), "
              f"{PEAKS['flops_per_s'] / 1e9:.1f} GFLOP/s (float64 2048^2 matmul)")
    if not args.nt_only:
        from ntkcompile.kernels import fused
        print(f"ntkcompile's closed-form rules: {fused.status()}")
    report = {}
    with tempfile.TemporaryDirectory(prefix="ntk-bench-") as tmp:
        for case in cases:
            x_np = make_inputs(case, args.seed)
            x_path = os.path.join(tmp, f"{case}_x.npz")
            np.savez(x_path, x=x_np)
            if case == "mlp4_tanh":
                report[case] = tanh_case(args, x_np, x_path, tmp, device)
                continue

            nt = nt_k = None
            if not args.skip_nt:
                nt, nt_k = run_nt(case, x_path, os.path.join(tmp, f"{case}_nt.npz"), args.repeats)
            nc = nc_k = None
            if not args.nt_only:
                nc, nc_k = run_ntkcompile(case, x_np, args.repeats, device, jit=args.jit, roofline=True)
                nc["cold_new_process_s"] = run_cold(case, x_path, args.device, args.jit)["cold_s"]
                nc["cold_first_use_s"] = run_cold(case, x_path, args.device, args.jit, first_use=True)["cold_s"]
            turns = None
            if args.turns > 0 and not args.skip_nt and not args.nt_only:
                turns = run_interleaved(case, x_np, x_path, os.path.join(tmp, f"{case}_nt_turns.npz"), device,
                                        args.jit, args.turns)
            busy = None
            if args.busy > 0:
                busy = {}
                with Busy(args.busy):
                    if not args.skip_nt:
                        busy["nt"], _ = run_nt(case, x_path, os.path.join(tmp, f"{case}_nt_busy.npz"), args.repeats)
                    if not args.nt_only:
                        busy["nc"], _ = run_ntkcompile(case, x_np, args.repeats, device, jit=args.jit)
                        busy["nc"]["cold_new_process_s"] = run_cold(case, x_path, args.device, args.jit)["cold_s"]
            diffs = {}
            if nt_k is not None and nc_k is not None:
                diffs = {k: rel_diffs(nc_k[k], nt_k[k]) for k in ("nngp", "ntk")}
                diffs["ntk_offdiag"] = offdiag_rel(nc_k["ntk"], nt_k["ntk"])
            exact = exact_diagonal(case, x_np)
            if exact is not None:
                diffs["diag_vs_exact"] = {
                    who: {k: float(np.max(np.abs(np.diag(ks[k]) - exact[k]) / np.abs(exact[k]))) for k in exact}
                    for who, ks in (("neural-tangents", nt_k), ("ntkcompile", nc_k)) if ks is not None}

            entk = None
            n_e = min(args.entk_n, x_np.shape[0])
            if case == "mlp8_relu" and n_e > 0:
                entk = run_empirical(case, x_np, n_e, args.entk_width, device)
                entk["diffs"] = {}
                if nc_k is not None:
                    entk["diffs"]["ntkcompile"] = rel_diffs(entk["ntk"], nc_k["ntk"][:n_e, :n_e])
                if nt_k is not None:
                    entk["diffs"]["neural-tangents"] = rel_diffs(entk["ntk"], nt_k["ntk"][:n_e, :n_e])

            print_case(case, x_np, args.repeats, nt, nc, diffs, entk, busy, args.busy, turns)
            report[case] = {
                "busy": busy, "busy_duty": args.busy,
                "n": int(x_np.shape[0]), "input_shape": list(x_np.shape[1:]),
                "neural_tangents": nt, "ntkcompile": nc, "in_turns": turns,
                "diff_ntkcompile_vs_nt": {k: {"max_rel": v[0], "fro_rel": v[1]}
                                          for k, v in diffs.items() if k in ("nngp", "ntk")},
                "ntk_offdiag_max_rel": diffs.get("ntk_offdiag"),
                "diagonal_vs_exact": diffs.get("diag_vs_exact"),
                "empirical_ntk": None if entk is None else {
                    k: v for k, v in entk.items() if k != "ntk"},
            }
    print()
    print("Times are wall clock on a shared machine: treat them as approximate.")
    report["machine"] = PEAKS
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
