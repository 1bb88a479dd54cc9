"""``compile()`` and the compiled kernel it returns.

Pipeline: trace (``trace``) -> lower to the Tensor Program IR (``passes.lower``,
with width inference and the Simple GIA Check) -> the backward program
(``passes.backward``) -> verify (``ir.verify``) -> plan the Master Theorem once
(``kernels.planner``) -> render the plan as Python source per call mode
(``codegen``).  Calling the compiled kernel only runs generated code.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import codegen, ops  # noqa: F401  (ops: registers every rule)
from .errors import InputShapeError, NonFiniteInputError, UnsupportedOpError
from .export import graph_of, is_exported_program
from .ir.graph import render, to_dot
from .ir.printer import format_program
from .ir.verify import verify
from .kernels.planner import aligned_positions, plan_kernels
from .passes.backward import backward
from .passes.lower import is_rule_module, lower
from .plan import expectations

_GETS = ("nngp", "ntk")


@dataclass
class Kernels:
    """Kernels of ``x1`` against ``x2``: ``(N1, N2)`` tensors (None if not requested).

    For several outputs these are the per-output factors (the full kernel is the
    factor times the identity on outputs).  ``mc_stderr`` is the largest standard
    error of any Monte Carlo expectation used (None when none was needed).
    ``quad_error`` estimates the largest relative error of any quadrature (1-D, 2-D,
    and the N-D tensor-product rule), from the change ``d`` between ``n`` and ``n/2``
    nodes per dimension, relative to the integrand's size: ``d^2`` for smooth
    integrands (exponential convergence), ``d`` for kinked ones; None when no
    quadrature was needed.  It is conservative: the kernels' true errors measured
    30-300x below it (tanh nets; a BatchNorm CNN).  A call warns above ``QUAD_WARN``.
    """
    nngp: Optional[torch.Tensor]
    ntk: Optional[torch.Tensor]
    mc_stderr: Optional[float] = None
    quad_error: Optional[float] = None

    def __iter__(self):
        return iter((self.nngp, self.ntk))


class CompiledKernel:
    """The infinite-width NNGP and NTK of a model; call it on batches of inputs."""

    def __init__(self, model, gm, *, W_std, b_std, std, input_shape, dtype, device, mc_samples, seed,
                 quadrature_degree, jit=False, frontend=None):
        self.model_name = frontend.name if frontend is not None else type(model).__name__
        self._gm = gm
        self._frontend = frontend     # export.Graph: exports on the first call when fx could not trace
        self._model_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self.W_std, self.b_std, self.std = W_std, b_std, std
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.mc_samples, self.seed = mc_samples, seed
        self.quadrature_degree = quadrature_degree
        self.jit = jit
        self._program = None
        self._plan = None
        self._fns: dict = {}
        if input_shape is None and frontend is not None:
            input_shape = frontend.input_shape
        if input_shape is None and gm is not None:
            input_shape = _infer_input_shape(gm)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if self.input_shape is not None:
            self._lower()

    # ---------------------------------------------------------------- compile
    def _lower(self):
        example = torch.zeros((2,) + self.input_shape, dtype=self._model_dtype)
        if self._gm is None:
            self._gm = self._frontend.export(example)
        program = backward(lower(self._gm, example, self.W_std, self.b_std, self.std))
        verify(program)
        try:   # plan now, so unsupported combinations fail at compile time, not at the first call
            self._plan = plan_kernels(program, mc_samples=self.mc_samples, seed=self.seed,
                                      degree=self.quadrature_degree)
        except UnsupportedOpError:
            raise
        except NotImplementedError as e:
            raise UnsupportedOpError(f"{self.model_name}: {e}") from e
        program.backward.builder.freeze()
        verify(program)
        self._program = program

    def _function(self, self_mode: bool, want_ntk: bool):
        """The kernel function of one call mode, rendered from the plan on first use."""
        key = (self_mode, want_ntk)
        if key not in self._fns:
            outputs = ("nngp", "ntk") if want_ntk else ("nngp",)
            fn, text = codegen.render(self._plan, self_mode=self_mode, outputs=outputs, prep=self._program.prep)
            if self.jit:
                # fuses the elementwise chains into C++/OpenMP loops (TorchInductor); the first
                # call per input shape pays the compilation
                fn = torch.compile(fn, dynamic=False, options=_inductor_options())
            self._fns[key] = (fn, text)
        return self._fns[key]

    # ---------------------------------------------------------------- inspect
    @property
    def program(self) -> str:
        """The forward and backward Tensor Program, with the evaluator of every expectation."""
        if self._program is None:
            return f"<{self._no_program('print(kfn.program)')}>"
        return format_program(self._program, expectations(self._plan))

    @property
    def code(self) -> str:
        """The generated source of the kernel functions built so far (self mode, both kernels first)."""
        if self._program is None:
            return self.program
        self._function(True, True)
        return "\n".join(text for _, text in self._fns.values())

    def graph(self, path=None) -> str:
        """The program in TP IIb's graphical notation, as Graphviz DOT text (``ir/graph.py``).

        ``path`` also writes it: ``.dot``/``.gv`` as text; ``.svg``/``.png``/``.pdf`` rendered by
        Graphviz when it is installed (else the ``.dot`` is written, with a warning saying how to
        render it).
        """
        if self._program is None:
            raise ValueError(self._no_program("kfn.graph()"))
        text = to_dot(self._program, self.model_name)
        if path is not None:
            render(text, path)
        return text

    def _no_program(self, then: str) -> str:
        return (f"{self.model_name}: no Tensor Program yet. Its program depends on the input's shape "
                "(a convolution's spatial size), which is not known: compile with input_shape, e.g. "
                "ntkcompile.compile(model, input_shape=(3, 32, 32)), or call the kernel once, kfn(x); "
                f"then {then}. From the command line: ntkcompile show MODEL --input-shape 3,32,32")

    @property
    def out_features(self) -> Optional[int]:
        """The model's number of outputs (the readout's ``out_features``; None before the
        input shape is known)."""
        return None if self._program is None else self._program.readout.out_features

    def __repr__(self):
        shape = self.input_shape if self.input_shape is not None else "?"
        return f"<ntkcompile kernel of {self.model_name}, input shape {shape}>"

    # ---------------------------------------------------------------- call
    def __call__(self, x1, x2=None, get=_GETS, *, tile_size: Optional[int] = None,
                 progress: Optional[bool] = None, batch_size: Optional[int] = None) -> Kernels:
        """Kernels of ``x1`` against ``x2`` (``x2=None``: against itself).

        ``tile_size`` computes the ``N1 x N2`` result in tiles of at most
        ``tile_size`` inputs per side (memory: the output plus one tile's work);
        against itself only the tiles on and above the diagonal are computed. By
        default tiles are sized so one tile's position-pair arrays fit in cache on a
        CPU (2 MiB) and take up to 256 MiB on a GPU.
        ``progress`` shows a progress bar on stderr (default: when there are 8 or more
        tiles and the computation has run for a second; ``True`` always, ``False`` never).
        ``batch_size`` is the old name of ``tile_size`` (deprecated: in ``simulate`` a
        batch is an SGD minibatch).
        """
        if batch_size is not None:
            if tile_size is not None:
                raise TypeError("pass tile_size only (batch_size is its deprecated alias)")
            warnings.warn("kfn(..., batch_size=B) is deprecated: the tile size is tile_size=B",
                          DeprecationWarning, stacklevel=2)
            tile_size = batch_size
        get = (get,) if isinstance(get, str) else tuple(get)
        bad = [g for g in get if g not in _GETS]
        if bad or not get:
            raise ValueError(f"get must name kernels among {_GETS}, got {get!r}")
        if tile_size is not None and (not isinstance(tile_size, int) or isinstance(tile_size, bool)
                                      or tile_size < 1):
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        x1 = self._check(x1, "x1")
        x2 = None if x2 is None else self._check(x2, "x2")
        if self._program is None:
            self.input_shape = tuple(x1.shape[1:])
            self._lower()
            x1 = self._check(x1, "x1")
        if x2 is None:
            # duplicate inputs: compute each distinct input once and copy, so the kernel
            # is exactly singular there (duplicates otherwise see c = 1 - eps, and the
            # arccos-type closed forms amplify eps into ~1e-8 errors that break PSD-ness)
            uniq, inverse = torch.unique(x1, dim=0, return_inverse=True)
            if uniq.shape[0] < x1.shape[0]:
                k = self(uniq, None, get, tile_size=tile_size, progress=progress)
                pick = lambda m: None if m is None else m[inverse][:, inverse]  # noqa: E731
                return Kernels(nngp=pick(k.nngp), ntk=pick(k.ntk), mc_stderr=k.mc_stderr, quad_error=k.quad_error)
        want_ntk = "ntk" in get
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        bs = tile_size or self._auto_tile(max(n1, n2), x1.device)
        starts1, starts2 = range(0, n1, bs), range(0, n2, bs)
        tiles = [(i, j) for i in starts1 for j in starts2 if x2 is not None or j >= i]
        out = {name: torch.empty((n1, n2), dtype=self.dtype, device=x1.device) for name in get}
        errors = []
        bar = _Progress(len(tiles), progress)
        with torch.no_grad():
            for i, j in tiles:
                a = x1[i:i + bs]
                if x2 is None and i == j:
                    nngp, ntk, mc = self._function(True, want_ntk)[0](a)   # symmetric by construction
                else:
                    b = (x1 if x2 is None else x2)[j:j + bs]
                    nngp, ntk, mc = self._function(False, want_ntk)[0](a, b)
                errors += mc      # (kind, 0-d tensor) pairs, converted once at the end
                for name, block in (("nngp", nngp), ("ntk", ntk)):
                    if name in out:
                        # closed forms and quadrature run in float64; float32 is rounded here
                        out[name][i:i + bs, j:j + bs] = block
                        if x2 is None and i != j:
                            out[name][j:j + bs, i:i + bs] = block.T
                bar.step()
        bar.close()
        worst = {kind: max(float(e) for k, e in errors if k == kind) for kind in {k for k, _ in errors}}
        if worst.get("quad", 0.0) > self.QUAD_WARN:
            warnings.warn(
                f"ntkcompile: estimated quadrature error {worst['quad']:.1e} (relative), from the change "
                f"between {self.quadrature_degree} nodes and half as many; steep activations at large "
                f"pre-activation variances need more nodes: compile with a larger quadrature_degree, "
                f"e.g. {2 * self.quadrature_degree}. Kernels.quad_error reports the estimate.",
                RuntimeWarning, stacklevel=2)
        return Kernels(nngp=out.get("nngp"), ntk=out.get("ntk"), mc_stderr=worst.get("mc"),
                       quad_error=worst.get("quad"))

    # Quadrature error estimate above which a call warns.  The estimate is conservative
    # (true errors measured 30-250x smaller on tanh nets), so this means errors ~1e-6.
    QUAD_WARN = 1e-4

    # Entries of one tile's pair arrays (N1 * N2 * positions^2): 2 MiB in float64, so a
    # tile's working set stays in cache.  The generated code is a chain of elementwise
    # passes; on 68 MB arrays each pass is memory-bound (measured 6x slower per entry
    # than on 2 MB arrays, 2-core CPU, benchmarks/README.md), and per-input work is
    # recomputed per tile at a cost of ~2 / (tile side * positions) of the total.
    _TILE_ENTRIES = 2 ** 18
    _TILE_ENTRIES_GPU = 2 ** 25     # 256 MiB per array: a few GB for the live set

    def _auto_tile(self, n, device):
        """Inputs per tile side when ``tile_size`` is not given.

        Sized by the entries of one tile's pair arrays (all position pairs, or aligned
        positions for flatten readouts): cache-sized on CPU, large on GPUs, where small
        tiles would only add kernel launches.  Tiles are balanced (2000 inputs -> 4 x 500
        rather than 3 x 512 + 464), so ``jit=True`` compiles fewer shapes.
        """
        positions = max([1] + [math.prod(shape) for p in self._program.params
                               if getattr(p, "geometry", None) is not None
                               for shape in (p.geometry.in_shape, p.geometry.out_shape)])
        per_pair = positions if aligned_positions(self._program) else positions ** 2
        entries = self._TILE_ENTRIES if device.type == "cpu" else self._TILE_ENTRIES_GPU
        side = max(1, min(n, int(math.sqrt(entries / per_pair))))
        return -(-n // -(-n // side))

    def _check(self, x, name):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise InputShapeError(
                f"{name} has shape {tuple(x.shape)}, but the kernel was compiled for inputs of shape "
                f"(N, {', '.join(map(str, self.input_shape))})")
        if x.ndim < 2:
            raise InputShapeError(f"{name} must have a batch axis first: shape (N, features), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise NonFiniteInputError(f"{name} contains NaN or inf (rows {bad[:10]}{'...' if len(bad) > 10 else ''})")
        device = self.device or x.device
        return x.to(device=device, dtype=self.dtype)


class _Progress:
    """A one-line progress bar on stderr for tiled kernel computations."""

    _DELAY = 1.0    # seconds before an automatic bar appears: short runs stay quiet

    def __init__(self, total, enabled):
        self.total, self.done = total, 0
        self.auto = enabled is None
        self.enabled = (total >= 8) if enabled is None else bool(enabled)
        self.shown = False
        self.t0 = self.last = time.perf_counter()

    def step(self):
        self.done += 1
        el = time.perf_counter() - self.t0
        due = self.done == self.total or el - (self.last - self.t0) >= 0.1   # <= 10 redraws/s
        if self.enabled and due and (not self.auto or el >= self._DELAY):
            self.shown, self.last = True, self.t0 + el
            eta = el / self.done * (self.total - self.done)
            width = 30
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r[ntkcompile] [{'#' * fill}{'.' * (width - fill)}] "
                             f"{self.done}/{self.total} tiles, {el:.1f}s elapsed, ~{eta:.1f}s left")
            sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write("\n")


# TorchInductor's store-vs-recompute thresholds.  A layer's pair array is read 2-4
# times by the next layer (correlation, V-transform, NTK term); inductor inlines
# buffers read fewer than 4 times and expressions of up to 50 ops on CPU, and across
# 8 layers the inlined copies multiply: the mlp8_relu cross tile became a kernel of
# ~300k ops that took 115 s to compile.  Storing buffers read twice or more, and
# expressions over 30 ops, compiles it in 18 s; warm times measured the same
# (mlp8_relu) or 6% faster (cnn3_gap) on the 2-core machine.
_INDUCTOR = {"realize_reads_threshold": 2, "realize_cpu_opcount_threshold": 30}


def _inductor_options():
    from torch._inductor import config
    return {k: v for k, v in _INDUCTOR.items() if hasattr(config, k)}   # keys vary across torch versions


def _infer_input_shape(gm: fx.GraphModule):
    """The input's feature shape when the input feeds a Linear directly, else None."""
    modules = dict(gm.named_modules())
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for user in ph.users:
        if user.op == "call_module" and isinstance(modules[user.target], nn.Linear):
            return (modules[user.target].in_features,)
    return None      # e.g. a convolution: the spatial size is fixed by the first call


def compile(model: nn.Module, *, W_std: float = 1.0, b_std: float = 0.0, parameterization: str = "ntk",
            std: Optional[dict] = None, input_shape=None, dtype=torch.float64, device=None,
            mc_samples: int = 200_000, seed: int = 0, quadrature_degree: int = 96,
            jit: bool = False) -> CompiledKernel:
    """Compile ``model`` into its infinite-width NNGP and NTK (Tensor Programs II/IIb).

    Args:
        model: an ordinary ``nn.Module`` at any finite width; which axes are width
            is inferred from the data flow.  Traced with torch.fx, or, when fx cannot
            trace it, exported with torch.export.  Or a ``torch.export.ExportedProgram``
            (``torch.export.export`` / ``torch.export.load``); its input shape is the exported one.
        W_std, b_std: every weight is ``W_std/sqrt(fan_in) * w`` and every bias
            ``b_std * beta`` with ``w, beta ~ N(0, 1)`` (the readout included).
        parameterization: ``"ntk"`` (the only one so far).
        std: ``{qualified module name: (W_std, b_std)}`` overrides.
        input_shape: feature shape of one input (inferred when the input feeds a
            Linear; otherwise fixed by the first call).
        dtype: ``torch.float64`` (default) or ``torch.float32``.
        device: where kernels are computed (default: the inputs' device).
        mc_samples, seed: the Monte Carlo evaluator, used only for nonlinearities
            of more than three correlated Gaussians.
        quadrature_degree: nodes per dimension of the trapezoidal rule for 2-D
            expectations without a closed form (1-D ones use twice this; at least 32).
            Fixed, so results do not depend on tiling. The error falls exponentially
            with the nodes and grows with the pre-activation variance: a 2-layer tanh
            net with pre-activation variances up to 3.5 had NTK errors of 7e-4 at 48,
            1.5e-5 at 64, 4e-9 at 96 and 9e-13 at 128 (Gauss-Hermite, used before,
            gave 8e-4 at 64). Every call estimates the error conservatively
            (``Kernels.quad_error``) and warns when the estimate exceeds 1e-4.
        jit: run the generated kernel through ``torch.compile`` (fused loops, ~10x faster
            on large batches; needs a C++ compiler; the first call per shape compiles).
    """
    if not isinstance(model, nn.Module) and not is_exported_program(model):
        raise TypeError("ntkcompile.compile expects an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if parameterization != "ntk":
        raise ValueError(f"parameterization must be 'ntk', got {parameterization!r}")
    for name, value in (("W_std", W_std), ("b_std", b_std)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    graph = graph_of(model, input_shape, is_rule_module)     # torch.fx, or torch.export (export.py)
    names = {n for n, _ in graph.module.named_modules()}
    for key, pair in (std or {}).items():
        if key not in names:
            raise ValueError(f"std names a module {key!r} that the model does not have; "
                             f"modules: {sorted(n for n in names if n)}")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"std[{key!r}] must be a pair (W_std, b_std), got {pair!r}")
    return CompiledKernel(graph.module, graph.gm, W_std=W_std, b_std=b_std, std=std, input_shape=input_shape,
                          dtype=dtype, device=device, mc_samples=mc_samples, seed=seed,
                          quadrature_degree=int(quadrature_degree), jit=bool(jit), frontend=graph)
