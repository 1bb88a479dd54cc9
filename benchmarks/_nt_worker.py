"""neural-tangents side of ``bench_vs_neural_tangents.py``.

This file runs INSIDE ``benchmarks/.nt-venv`` (created by ``setup_nt_env.sh``),
where jax + neural-tangents are installed and torch is not.  It is never
imported by ntkcompile.

Request: one JSON object, given as the first command-line argument or on stdin::

    {"case": "mlp8_relu", "inputs": "/tmp/x.npz", "out": "/tmp/nt_k.npz",
     "repeats": 3}

(``"deg": 25`` too for ``mlp4_tanh``: ``stax.ElementwiseNumerical``'s Gauss-Hermite
degree per axis; ``"serve": true``: after the result, time one more warm call for each
``call`` line read from stdin, printing ``{"t": seconds}``, until another line or EOF.)

``inputs`` is an .npz with an array ``x`` (PyTorch layout: (N, D) for the MLP,
(N, C, H, W) for the CNN).  The worker writes ``nngp`` and ``ntk`` (float64,
(N, N)) to ``out`` and prints one JSON object with the timings on the last
line of stdout.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # neural_tangents imports TF

# Case definitions: (layers builder, W_std, b_std).  Widths are irrelevant for
# the infinite-width kernel; they only need to be valid numbers.
CASES = {
    "mlp8_relu": {"W_std": 1.5, "b_std": 0.05, "depth": 8, "width": 512},
    "cnn3_gap": {"W_std": 1.4, "b_std": 0.1, "depth": 3, "width": 64},
    "mlp4_tanh": {"W_std": 1.5, "b_std": 0.1, "depth": 4, "width": 512},
}


def build_model(case, deg=None):
    from neural_tangents import stax

    spec = CASES[case]
    w, b = spec["W_std"], spec["b_std"]
    layers = []
    if case == "mlp8_relu":
        for _ in range(spec["depth"]):
            layers += [stax.Dense(spec["width"], W_std=w, b_std=b, parameterization="ntk"),
                       stax.Relu()]
        layers += [stax.Dense(1, W_std=w, b_std=b, parameterization="ntk")]
    elif case == "cnn3_gap":
        for _ in range(spec["depth"]):
            layers += [stax.Conv(spec["width"], (3, 3), padding="SAME", W_std=w, b_std=b,
                                 parameterization="ntk"),
                       stax.Relu()]
        layers += [stax.GlobalAvgPool(),
                   stax.Dense(1, W_std=w, b_std=b, parameterization="ntk")]
    elif case == "mlp4_tanh":   # no closed form in neural-tangents: Gauss-Hermite with deg^2 nodes
        import jax.numpy as jnp
        for _ in range(spec["depth"]):
            layers += [stax.Dense(spec["width"], W_std=w, b_std=b, parameterization="ntk"),
                       stax.ElementwiseNumerical(jnp.tanh, deg=int(deg))]
        layers += [stax.Dense(1, W_std=w, b_std=b, parameterization="ntk")]
    else:
        raise KeyError(f"unknown case {case!r}; known: {sorted(CASES)}")
    return stax.serial(*layers)


def read_request(argv):
    if len(argv) > 1:
        text = argv[1]
    else:
        text = sys.stdin.read()
    req = json.loads(text)
    for key in ("case", "inputs", "out"):
        if key not in req:
            raise KeyError(f"request lacks {key!r}")
    req.setdefault("repeats", 3)
    req.setdefault("deg", None)
    return req


def main(argv):
    req = read_request(argv)
    # Anything the libraries print goes to stderr; stdout carries only our JSON.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr

    import numpy as np
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt

    case = req["case"]
    x_np = np.load(req["inputs"])["x"].astype(np.float64)
    if x_np.ndim == 4:  # PyTorch NCHW -> neural-tangents NHWC
        x_np = np.ascontiguousarray(x_np.transpose(0, 2, 3, 1))

    _, _, kernel_fn = build_model(case, req["deg"])
    get = ("nngp", "ntk")
    f = jax.jit(lambda x: kernel_fn(x, None, get))

    # Start the XLA backend and put x on the device outside the timed region,
    # so "cold" is trace + compile + first run only.
    x = jax.device_put(jnp.asarray(x_np, dtype=jnp.float64))
    x.block_until_ready()

    def call():
        out = f(x)
        out.nngp.block_until_ready()
        out.ntk.block_until_ready()
        return out

    t0 = time.perf_counter()
    out = call()
    cold = time.perf_counter() - t0

    call()  # warm-up
    warm = []
    for _ in range(int(req["repeats"])):
        t0 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t0)

    nngp = np.asarray(out.nngp, dtype=np.float64)
    ntk = np.asarray(out.ntk, dtype=np.float64)
    np.savez(req["out"], nngp=nngp, ntk=ntk)

    result = {
        "case": case,
        "deg": req["deg"],
        "cold_s": cold,
        "warm_s": min(warm),
        "warm_all_s": warm,
        "shape_in": list(x_np.shape),
        "shape_out": list(nngp.shape),
        "dtype": str(out.nngp.dtype),
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__,
                     "neural_tangents": nt.__version__, "numpy": np.__version__},
        "backend": jax.default_backend(),
    }
    sys.stdout = real_stdout
    print(json.dumps(result), flush=True)
    if req.get("serve"):    # then one warm call per "call" line on stdin, its time on stdout
        for line in sys.stdin:
            if line.strip() != "call":
                break
            t0 = time.perf_counter()
            call()
            print(json.dumps({"t": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
