"""``compile()`` and the compiled kernel it returns.

Pipeline: trace (``trace``) -> lower to the Tensor Program IR (``passes.lower``,
with width inference and the Simple GIA Check) -> the backward program
(``passes.backward``) -> verify (``ir.verify``) -> plan the Master Theorem once
(``kernels.planner``) -> render the plan as Python source per call mode
(``codegen``).  Calling the compiled kernel only runs generated code.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import codegen, ops  # noqa: F401  (ops: registers every rule)
from .errors import (InputShapeError, KernelMemoryError, NonFiniteInputError, NTKCompileError, TraceError,
                     UnsupportedOpError)
from .export import graph_of, is_exported_program
from .ir.graph import render, to_dot
from .ir.printer import format_program
from .ir.verify import verify
from .kernels import fused, quadrature
from .kernels.planner import aligned_positions, plan_kernels
from . import batched, distinct, tiling
from .passes.backward import backward
from .passes.homogeneity import is_homogeneous
from .ir import Atom
from .passes.lower import BatchCoupled, in_table, is_rule_module, lower, reads_integers
from .plan import expectations

_GETS = ("nngp", "ntk")


@dataclass
class Kernels:
    """Kernels of ``x1`` against ``x2``: ``(N1, N2)`` tensors (None if not requested).

    For several outputs these are the per-output factors (the full kernel is the
    factor times the identity on outputs).

    When Monte Carlo was used, ``nngp_stderr``/``ntk_stderr`` are the standard
    errors of every returned entry, from the spread of ``mc_replicates``
    independent evaluations (so they include how each expectation's error
    propagates through the layers), and ``mc_stderr`` is their largest entry; all
    None otherwise.  ``quad_error`` estimates the largest relative error of any
    quadrature (1-D, 2-D, and the N-D tensor-product rule), from the change ``d``
    between ``n`` and ``n/2`` nodes per dimension, relative to the integrand's
    size: ``d^2`` for smooth integrands (exponential convergence), ``d`` for kinked
    ones; None when no quadrature was needed.  It is conservative: the kernels' true
    errors measured 30-300x below it (tanh nets; a BatchNorm CNN).  A call warns
    above ``QUAD_WARN``.
    """
    nngp: Optional[torch.Tensor]
    ntk: Optional[torch.Tensor]
    mc_stderr: Optional[float] = None
    quad_error: Optional[float] = None
    nngp_stderr: Optional[torch.Tensor] = None
    ntk_stderr: Optional[torch.Tensor] = None

    def __iter__(self):
        return iter((self.nngp, self.ntk))


class CompiledKernel:
    """The infinite-width NNGP and NTK of a model; call it on batches of inputs."""

    def __init__(self, model, gm, *, W_std, b_std, std, input_shape, dtype, device, mc_samples, seed,
                 quadrature_degree, mc_replicates=8, quadrature_tol=None, nd_degree=None, jit=False,
                 frontend=None, joint_samples=4096):
        self.model_name = frontend.name if frontend is not None else type(model).__name__
        self._gm = gm
        self._frontend = frontend     # export.Graph: exports on the first call when fx could not trace
        self._model_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self.W_std, self.b_std, self.std = W_std, b_std, std
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.mc_samples, self.seed, self.joint_samples = mc_samples, seed, joint_samples
        self.quadrature_degree = quadrature_degree
        self.mc_replicates, self.quadrature_tol, self.nd_degree = mc_replicates, quadrature_tol, nd_degree
        self.jit = jit
        self._program = None
        self._plan = None
        self._fns: dict = {}
        self._homogeneous = False
        self._joint = False
        self._evaluators_of = None     # (plan, numeric, nd): CompiledKernel._evaluators
        # a batch-coupled model (BatchNorm in training mode): lowered per call's batch sizes
        # with the batch as a fixed axis; sizes -> (program, plan, functions)
        self._batched = False
        self._batch_sizes = None
        self._by_sizes: dict = {}
        self.input_shape = None
        self._provisional = False     # an inferred input shape, until the first call confirms it
        if input_shape is None and frontend is not None:
            input_shape = frontend.input_shape
        if input_shape is None and gm is not None:
            inferred = _infer_input_shape(gm)
            if inferred is not None:
                try:
                    self._specialize(inferred)
                    self._provisional = True
                except InputShapeError:
                    pass      # a Linear that reads the last axis of inputs with more axes: the first call tells
                except NTKCompileError:
                    # refused as vectors, but an attention (q @ k^T) needs positions: the first
                    # Linear reads the last axis of a sequence, and the first call's shape
                    # decides (a call with vectors raises the error again)
                    if not _attends(gm):
                        raise
        elif input_shape is not None:
            self._specialize(tuple(input_shape))

    # ---------------------------------------------------------------- compile
    def _specialize(self, shape):
        """Lower and plan for inputs of ``shape`` (the shape is kept only if that works)."""
        self.input_shape = shape
        try:
            self._lower()
        except BaseException:
            self.input_shape, self._program, self._plan = None, None, None
            raise

    # The batch a batch-coupled model is lowered for at compile time (for errors and printouts)
    _SHOWN_BATCH = (8,)

    def _lower(self, sizes=None):
        """Lower, differentiate and plan; ``sizes``: the batches of a batch-coupled model."""
        # a model that reads token ids is run on integer examples when floats fail
        dtypes = [self._model_dtype] + ([torch.long] if self._reads_tokens() else [])
        for i, dtype in enumerate(dtypes):
            example = torch.zeros((sum(sizes) if sizes else 2,) + self.input_shape, dtype=dtype)
            try:
                gm = self._gm if self._gm is not None else self._frontend.export(example)
                program = lower(gm, example, self.W_std, self.b_std, self.std, batch=sizes)
                break
            except BatchCoupled as coupled:
                if sizes is not None:
                    raise
                self._gm = gm
                self._batched = True
                try:
                    return self._lower(self._SHOWN_BATCH)
                except UnsupportedOpError as e:
                    raise UnsupportedOpError(
                        f"{self.model_name}: {coupled}\nso the batch is one unit and the model is lowered with the "
                        f"batch as a fixed axis (kfn(x) the kernel of the batch x), where:\n{e}") from e
            except (InputShapeError, TraceError):
                if i == len(dtypes) - 1:
                    raise
        self._gm = gm
        program = backward(program)
        verify(program)
        try:   # plan now, so unsupported combinations fail at compile time, not at the first call
            self._plan = plan_kernels(program, mc_samples=self.mc_samples, seed=self.seed,
                                      degree=self.quadrature_degree, tol=self.quadrature_tol,
                                      nd_degree=self.nd_degree, joint_samples=self.joint_samples)
        except UnsupportedOpError:
            raise
        except NotImplementedError as e:
            raise UnsupportedOpError(f"{self.model_name}: {e}") from e
        program.backward.builder.freeze()
        verify(program)
        self._program = program
        self._homogeneous = is_homogeneous(program)
        # sampled jointly over a tile's inputs (gated recurrent layers): cross tiles are
        # computed as blocks of the kernel of both batches together (tiling)
        self._joint = any(getattr(n, "joint", False) for n in program.nodes)
        if sizes is not None:
            self._fns = {}
            self._batch_sizes = tuple(sizes)
            self._by_sizes[self._batch_sizes] = (program, self._plan, self._fns)

    def _use_sizes(self, sizes):
        """Make the program of a batch-coupled model for batches ``sizes`` the current one."""
        if sizes != self._batch_sizes:
            if sizes in self._by_sizes:
                self._program, self._plan, self._fns = self._by_sizes[sizes]
                self._batch_sizes = sizes
            else:
                self._lower(sizes)

    def _function(self, self_mode: bool, want_ntk: bool, check: bool = False):
        """The kernel function of one call mode, rendered from the plan on first use
        (``check``: the slow version that checks every array, for diagnosis)."""
        key = (self_mode, want_ntk, check)
        if key not in self._fns:
            outputs = ("nngp", "ntk") if want_ntk else ("nngp",)
            cpu = self.device is None or self.device.type == "cpu"
            fn, text = codegen.render(self._plan, self_mode=self_mode, outputs=outputs, prep=self._program.prep,
                                      check=check, mc=(self.mc_samples, self.seed),
                                      fuse=not (check or self.jit) and cpu and fused.available())
            if self.jit and not check:
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
        text = format_program(self._program, expectations(self._plan))
        if self._batched:
            text = (f"batch-coupled: the batch is one unit, one input whose positions are its examples (here "
                    f"batches of {list(self._batch_sizes)}; kfn(x1, x2) puts both batches side by side, each "
                    f"normalized by its own statistics)\n{text}")
        return text

    @property
    def code(self) -> str:
        """The generated source of the kernel functions built so far (self mode, both kernels first)."""
        if self._program is None:
            return self.program
        self._function(True, True)
        return "\n".join(text for (_, _, check), (_, text) in self._fns.items() if not check)

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

    @property
    def output_positions(self) -> tuple:
        """The positions of a readout at every position (a per-step readout of a sequence,
        ``(T,)``): kernels are then ``(N1, N2, *P, *P)``, entry ``[a, b, s, t]`` pairing
        output position ``s`` of input ``a`` with ``t`` of ``b``; ``()`` for one output per
        input (None before the input shape is known)."""
        if self._program is None:
            return None
        r = self._program.readout
        return tuple(r.positions) if r.pool == "steps" and not self._batched else ()

    def __repr__(self):
        shape = self.input_shape if self.input_shape is not None else "?"
        return f"<ntkcompile kernel of {self.model_name}, input shape {shape}>"

    # ---------------------------------------------------------------- call
    def __call__(self, x1, x2=None, get=_GETS, *, tile_size: Optional[int] = None,
                 progress: Optional[bool] = None, out=None, batch_size: Optional[int] = None,
                 resume: bool = False, distributed: bool = False) -> Kernels:
        """Kernels of ``x1`` against ``x2`` (``x2=None``: against itself).

        ``tile_size`` computes the ``N1 x N2`` result in tiles of at most
        ``tile_size`` inputs per side (memory: the output plus one tile's work);
        against itself only the tiles on and above the diagonal are computed. By
        default tiles are sized so one tile's position-pair arrays fit in cache on a
        CPU (2 MiB) and take up to 256 MiB on a GPU, and within the memory available.
        ``out``: arrays to write the kernels into (``{"nngp": a, "ntk": b}``, or one
        array when one kernel is asked for): torch tensors or numpy arrays of shape
        ``(N1, N2)``, a ``numpy.memmap`` included, for kernels larger than memory.
        With memmaps, a journal ``<file>.tiles.json`` beside the first one records the
        tiles written (flushed to disk first, every 10 s); ``resume=True`` skips them, so an
        interrupted computation continues where it stopped (same inputs, same
        ``tile_size``; a journal of another computation raises ``ValueError``; tiles
        of an earlier run have NaN standard errors).
        ``distributed=True`` spreads the tiles over the processes of an initialized
        ``torch.distributed`` group (``torchrun``; gloo on CPUs, NCCL on GPUs): every rank
        calls with the same arguments, computes every ``world_size``-th tile, and gets the
        whole kernel (summed over ranks in memory, or written into shared ``out=`` memmap
        files, then a barrier).
        Every value returned is finite: a NaN or inf raises ``NonFiniteKernelError``
        naming the model node it comes from; kernels or work that would not fit in
        memory raise ``KernelMemoryError`` before anything is allocated.
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
        if not isinstance(distributed, bool):
            raise ValueError(f"distributed must be True or False, got {distributed!r}")
        if not isinstance(resume, bool) or (resume and out is None):
            raise ValueError(f"resume must be True or False, and True only with out= arrays on disk; got "
                             f"resume={resume!r}{' without out=' if out is None else ''}")
        get = (get,) if isinstance(get, str) else tuple(get)
        bad = [g for g in get if g not in _GETS]
        if bad or not get:
            raise ValueError(f"get must name kernels among {_GETS}, got {get!r}")
        if tile_size is not None and (not isinstance(tile_size, int) or isinstance(tile_size, bool)
                                      or tile_size < 1):
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        shape = tuple(getattr(x1, "shape", ()))
        if self._provisional and len(shape) > len(self.input_shape) + 1 and shape[-1:] == self.input_shape[-1:]:
            # (N, *P, d) for a Linear(d, .) that reads the input: positions, not an error
            self.input_shape, self._program, self._plan, self._fns = None, None, None, {}
        self._provisional = False
        x1 = self._check(x1, "x1")
        x2 = None if x2 is None else self._check(x2, "x2")
        if self._program is None:
            self._specialize(tuple(x1.shape[1:]))
            x1 = self._check(x1, "x1")
            x2 = None if x2 is None else self._check(x2, "x2")
        if self._batched:
            return self._kernels(*batched.evaluate(self, x1, x2, get, tile_size, out, resume, distributed))
        if x2 is not None and distinct.same_inputs(x1, x2):
            x2 = None       # against itself: the symmetric kernel (a cross call's triangles may differ)
        if x2 is None and x1.shape[0] > 1:      # duplicate inputs: each distinct one computed once
            k = distinct.with_duplicates(self, x1, get, tile_size, progress, out, distributed)
            if k is not None:
                return k
        return self._kernels(*tiling.evaluate(self, x1, x2, get, tile_size, progress, out, resume, distributed))

    def _kernels(self, outputs, stderr, worst) -> Kernels:
        """The ``Kernels`` of a call from its outputs, standard errors and worst error estimates
        (warning about large quadrature errors)."""
        tiling.warn_about(worst, self.quadrature_degree, self.nd_degree)
        quad = max([worst[k] for k in ("quad", "quad_nd") if k in worst], default=None)
        mc = max(float(v.max()) for v in stderr.values()) if stderr else None
        return Kernels(nngp=outputs.get("nngp"), ntk=outputs.get("ntk"), mc_stderr=mc, quad_error=quad,
                       nngp_stderr=stderr.get("nngp"), ntk_stderr=stderr.get("ntk"))

    QUAD_WARN = tiling.QUAD_WARN

    # Entries of one tile's pair arrays (N1 * N2 * positions^2): 4 MiB in float64, so a
    # tile's working set stays in cache.  The generated code is a chain of elementwise
    # passes; on 68 MB arrays each pass is memory-bound (measured 6x slower per entry
    # than on 2 MB arrays, 2-core CPU, benchmarks/README.md), and per-input work is
    # recomputed per tile at a cost of ~2 / (tile side * positions) of the total.  Each
    # tile also costs about 1 ms of Python and thread hand-offs (cnn3_gap, one thread:
    # 403 / 298 / 283 ms at 136 / 36 / 21 tiles, 298 ms again at 10): 2^19 rather than
    # 2^18 took cnn3_gap from 189 to 167 ms on two threads, 259 to 228 ms on a busy machine.
    _TILE_ENTRIES = 2 ** 19
    _TILE_ENTRIES_GPU = 2 ** 25     # 256 MiB per array: a few GB for the live set

    def _auto_tile(self, n, device):
        """Inputs per tile side when ``tile_size`` is not given.

        Sized by the entries of one tile's pair arrays (all position pairs, or aligned
        positions for flatten readouts): cache-sized on CPU, large on GPUs, where small
        tiles would only add kernel launches.  Tiles are balanced (2000 inputs -> 4 x 500
        rather than 3 x 512 + 464), so ``jit=True`` compiles fewer shapes.
        """
        per_pair = self._pair_entries()
        entries = self._TILE_ENTRIES if device.type == "cpu" else self._TILE_ENTRIES_GPU
        side = max(1, min(n, int(math.sqrt(entries / per_pair))))
        return tiling.balanced(n, side)

    # Rows (inputs x time steps) one joint Monte Carlo sample covers at most: its Gram
    # matrices have _JOINT_ROWS^2 entries (about 1.3 GB for the ten a backward keeps),
    # and factoring a full-rank input covariance would cost up to _JOINT_ROWS^3.
    _JOINT_ROWS = 4096

    def _joint_side(self, n):
        """Inputs sampled together by the joint Monte Carlo (gated recurrent layers): the
        most, up to ``n``, whose rows stay under ``_JOINT_ROWS`` and whose sampled arrays
        fit the memory ``scan_mc.plan`` allows (halved until they do)."""
        joint = [a for a in self._program.nodes if getattr(a, "joint", False)]
        side = max(1, min(n, self._JOINT_ROWS // max(a.joint_rows for a in joint)))
        while side > 1:
            try:
                for a in joint:
                    a.joint_plan(side, self.joint_samples)
                return side
            except KernelMemoryError:
                side //= 2
        return side

    def _reads_tokens(self) -> bool:
        """True if the model may read integer inputs (token ids of an embedding)."""
        if self._gm is not None:
            return reads_integers(self._gm)
        return any(isinstance(m, nn.Embedding) for m in self._frontend.module.modules())

    def _pair_entries(self) -> int:
        """Entries of one pair of inputs in the pair arrays: all position pairs, or aligned
        positions for flatten readouts."""
        program = self._program
        positions = max([1] + [math.prod(shape) for p in program.params
                               if getattr(p, "geometry", None) is not None
                               for shape in (p.geometry.in_shape, p.geometry.out_shape)]
                        + [math.prod(program.positions(n)) for n in program.nodes if isinstance(n, Atom)])
        r = program.readout     # a per-position readout's backward arrays (batch-coupled: the examples)
        seeds = math.prod(r.positions) ** 2 if r.pool == "steps" else 1
        return positions * seeds if aligned_positions(self._program) else positions ** 2 * seeds

    def _evaluators(self):
        """``(numeric, nd)``: whether some expectation is not a closed form, how many use the N-D
        evaluator; one walk of the plan (tens of ms when deep), kept with the plan it describes."""
        if self._evaluators_of is None or self._evaluators_of[0] is not self._plan:
            hows = [how for _, how in expectations(self._plan)]
            self._evaluators_of = (self._plan, any(not h.startswith("closed form") for h in hows),
                                   sum("N-D evaluator" in h for h in hows))
        return self._evaluators_of[1:]

    def _pair_work(self) -> int:
        """Rough work per pair of inputs, in entries evaluated: the pair arrays' entries, times
        ``quadrature_degree^2`` when some expectation is not a closed form (its nodes, which
        the tile size does not count)."""
        return self._pair_entries() * (self.quadrature_degree ** 2 if self._evaluators()[0] else 1)

    def _nd_calls(self) -> int:
        """N-D evaluations (``quadrature.expect_nd``) one call of the generated kernel makes,
        times the Monte Carlo replicates that rerun it: the progress bar's unit inside a tile."""
        return self._evaluators()[1] * max(1, self.mc_replicates)

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
        if x.ndim < (1 if self._reads_tokens() else 2):      # token ids may be one per input
            raise InputShapeError(f"{name} must have a batch axis first: shape (N, features), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise NonFiniteInputError(f"{name} contains NaN or inf (rows {bad[:10]}{'...' if len(bad) > 10 else ''})")
        device = self.device or x.device
        return x.to(device=device, dtype=self.dtype)


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


_ATTENTION_OPS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", torch.softmax, "softmax",
                  F.softmax, F.scaled_dot_product_attention}


def _attends(gm: fx.GraphModule) -> bool:
    """True if the graph has an attention-like op (a product of two tensors, a softmax)."""
    return any(n.op in ("call_function", "call_method") and in_table(n.target, _ATTENTION_OPS)
               for n in gm.graph.nodes)


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
            mc_samples: int = quadrature.DEFAULT_MC_SAMPLES, seed: int = 0, mc_replicates: int = 8, joint_samples: int = 4096,
            quadrature_degree: int = 96,
            quadrature_tol: Optional[float] = 1e-6, nd_degree: Optional[int] = None,
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
        mc_samples, seed, mc_replicates: the randomized quasi-Monte Carlo evaluator, used
            only for nonlinearities of more than three correlated Gaussians (a post-activation
            residual chain of two blocks or more): the kernels are the mean of
            ``mc_replicates`` independent evaluations, each over ``mc_samples /
            mc_replicates`` scrambled Sobol points (default 8 x 4096), and their spread
            gives the standard error of every returned entry (``Kernels.nngp_stderr``,
            ``ntk_stderr``).
        joint_samples: coordinates sampled per replicate by the joint Monte Carlo
            evaluator of gated recurrent layers (GRU, LSTM), which samples every input
            of a tile and every time step together (so kernels are Gram matrices:
            symmetric PSD); ``mc_replicates`` independent replicates give the standard
            errors. Its bias is O(1 / joint_samples), its spread O(1 / sqrt(total)).
        quadrature_degree: nodes per dimension of the trapezoidal rule for 2-D
            expectations without a closed form (1-D ones use twice this; at least 8).
            The error falls exponentially with the nodes and grows with the
            pre-activation standard deviation (tanh needs about 50 nodes per unit of
            std for 1e-12): a 2-layer tanh net with pre-activation variances up to
            3.5 had NTK errors of 7e-4 at 48, 1.5e-5 at 64, 4e-9 at 96 and 9e-13 at 128.
            Every call estimates the error conservatively (``Kernels.quad_error``,
            from the change between ``n`` and ``n/2`` nodes) and warns above 1e-4.
        quadrature_tol: every entry of a quadrature whose estimate (the relative change
            between ``n/2`` and ``n`` nodes, a bound on the error at ``n``) exceeds this
            is recomputed with twice the nodes, up to twice (4x ``quadrature_degree``);
            None keeps the degree fixed. Smooth integrands only (kinked ones have exact
            forms where it matters). Measured: true errors 1e-12 to 1e-16 at the default.
        nd_degree: nodes per dimension of the N-D tensor-product rule (default 64 /
            32 / 16 for 1 / 2 / 3 dimensions), refined to ``quadrature_tol`` likewise.
        jit: run the generated kernel through ``torch.compile`` (fused loops, ~10x faster
            on large batches; needs a C++ compiler; the first call per shape compiles).
    """
    if not isinstance(model, nn.Module) and not is_exported_program(model):
        raise TypeError("ntkcompile.compile expects an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if parameterization != "ntk":
        raise ValueError(f"parameterization must be 'ntk', got {parameterization!r}")
    _check_std("W_std", W_std)
    _check_std("b_std", b_std)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if std is not None and not isinstance(std, dict):
        raise TypeError(f"std must be a dict {{module name: (W_std, b_std)}}, got {type(std).__name__}")
    if input_shape is not None:
        if not (isinstance(input_shape, (tuple, list, torch.Size)) and input_shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
            raise ValueError(f"input_shape must be the shape of one input (positive ints, no batch axis), "
                             f"got {input_shape!r}")
    fused.prepare()      # a first use on this machine builds the fused C kernels while we trace and plan
    graph = graph_of(model, input_shape, is_rule_module)     # torch.fx, or torch.export (export.py)
    names = {n for n, _ in graph.module.named_modules()}
    params = {n for n, _ in graph.module.named_parameters()}     # a bare parameter's own std (ops/params.py)
    for key, pair in (std or {}).items():
        if key not in names and key not in params:
            raise ValueError(f"std names a module {key!r} that the model does not have; "
                             f"modules: {sorted(n for n in names if n)}")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"std[{key!r}] must be a pair (W_std, b_std), got {pair!r}")
        _check_std(f"std[{key!r}] W_std", pair[0])
        _check_std(f"std[{key!r}] b_std", pair[1])
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {device!r}") from e
    _check_int("quadrature_degree", quadrature_degree, 8,
               "the nodes per dimension of the trapezoidal rule (the error estimate uses a quarter as many)")
    _check_int("mc_samples", mc_samples, 2, "Monte Carlo samples")
    _check_int("mc_replicates", mc_replicates, 1, "independent Monte Carlo replicates")
    if mc_samples // mc_replicates < 2:
        raise ValueError(f"mc_samples ({mc_samples}) must give each of the {mc_replicates} replicates 2 samples")
    if nd_degree is not None:
        _check_int("nd_degree", nd_degree, 2, "the nodes per dimension of the N-D quadrature")
    if quadrature_tol is not None and (isinstance(quadrature_tol, bool) or not isinstance(quadrature_tol, (int, float))
                                       or not quadrature_tol > 0):
        raise ValueError(f"quadrature_tol must be a positive number or None, got {quadrature_tol!r}")
    _check_int("seed", seed, 0, "the Monte Carlo seed")
    _check_int("joint_samples", joint_samples, 2, "coordinates per replicate of the joint Monte Carlo")
    return CompiledKernel(graph.module, graph.gm, W_std=W_std, b_std=b_std, std=std, input_shape=input_shape,
                          dtype=dtype, device=device, mc_samples=mc_samples, seed=seed,
                          mc_replicates=mc_replicates, quadrature_degree=int(quadrature_degree),
                          quadrature_tol=quadrature_tol, nd_degree=nd_degree, jit=bool(jit), frontend=graph,
                          joint_samples=joint_samples)


def _check_std(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_int(name, value, least, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} ({what}) must be an integer >= {least}, got {value!r}")
