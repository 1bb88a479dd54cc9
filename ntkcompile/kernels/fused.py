"""Fused kernels for the closed-form rules on the default path (CPU, float64).

The arc-cosine rules (ReLU-family V-transforms, the step family's, and the angle they
share) are each one C loop (``fused.c``) over the pair arrays instead of a dozen torch ops
that each read and write whole arrays (and ``sampling.c``, the N-D quasi-Monte Carlo,
``kernels/qmc.py``).  The C files need only libm: compiled once per machine with the system
C compiler (well under a second), cached on disk, loaded with ``ctypes``; arccos is SLEEF's
(looked up in libtorch, which calls its 1-ulp version; the fused rules take the 3.5-ulp
one, twice as fast: 1.1 against 2.2 ns per entry here), so the fused rules agree with
their torch forms to a few ulps (an MKL build of torch takes arccos and sqrt from MKL's
VML, which rounds differently from SLEEF and the correctly rounded ``sqrt`` used here).

Without a C compiler, on other devices and dtypes, under ``torch.compile``, or
with ``NTKCOMPILE_FUSED=0`` in the environment, every rule falls back to its torch
form: the callers (``ops/activations.py``, ``kernels/quadrature.py``) call the
functions here first and use torch when they return ``None``.  ``status()``
says which path is in use and why.

Cache: ``$NTKCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/ntkcompile``, else
``~/.cache/ntkcompile``; one library per source, compiler and CPU (its flags are in
the file name's hash, since the code is built for the CPU it runs on).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .compat import compiling

SOURCE = Path(__file__).with_name("fused.c")
EXTRA_SOURCES, HEADERS = (Path(__file__).with_name("sampling.c"),), (Path(__file__).with_name("simd.h"),)
_RULES = {"angle": (0, 3), "relu": (1, 4), "step": (2, 3)}
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c99"]
_RUN_LENGTH = 4                      # window tables whose runs are shorter on average gather
_RUN_GAP = 8                         # a run of a window table steps over at most this many -1s
_PARALLEL_ENTRIES = 1 << 16          # below this, one thread (a thread's start costs more)

_lock = threading.Lock()
_state: dict = {}                    # "lib" (ctypes library or None), "why" (a sentence)
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_off = 0                             # > 0 inside ``disabled()``
_meter = None                        # a Meter inside ``metered()``


# ------------------------------------------------------------------ building and loading


def _after_fork():
    global _pool, _pool_size
    _pool, _pool_size = None, 0       # the parent's threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def cache_dir() -> Path:
    root = os.environ.get("NTKCOMPILE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ntkcompile"


def _compiler() -> Optional[list]:
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cand:
            argv = shlex.split(cand)
            if argv and shutil.which(argv[0]):
                return argv
    return None


def _cpu_flags() -> str:
    """What the CPU supports (the library is built with -march=native for it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def _library_path(cc: list, flags: list, stem: str, parts) -> Path:
    h = hashlib.sha256(b"\0".join([*parts, " ".join(cc).encode(), " ".join(flags).encode(), _cpu_flags().encode(),
                                   sys.platform.encode()]))
    return cache_dir() / f"{stem}-{h.hexdigest()[:16]}.so"


def build_library(cc: list, sources, stem: str, what: str, extra_flags=(), headers=()) -> Path:
    """The cached library ``stem-<hash>.so`` of ``sources`` (hashed with the ``headers`` they
    include, the compiler, its flags and the CPU; -march=native where the compiler takes it),
    compiled first if missing (atomically: concurrent processes each build a private file and
    rename it into place); ``what`` names it in the error.  Also ``native``'s integrands."""
    errors = []
    parts = [p.read_bytes() for p in (*sources, *headers)]
    # AVX-512: 512-bit vectors in loops gcc vectorizes (default 256; mlp8's program 31 -> 26 ns/entry)
    native = ["-march=native"] + ["-mprefer-vector-width=512"] * (" avx512f" in _cpu_flags())
    for flags in (_FLAGS + [*extra_flags] + native, _FLAGS + [*extra_flags]):
        path = _library_path(cc, flags, stem, parts)
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [*cc, *flags, *map(str, sources), "-o", tmp, "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            os.replace(tmp, path)
            return path
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
    raise OSError(f"could not compile {what}:\n" + "\n".join(errors))


def _sleef_acos(width: int) -> Optional[int]:
    """The address of SLEEF's arccos for ``width`` doubles in libtorch (torch's vectorized
    arccos where it is not built with MKL; the 3.5-ulp variant where there is one), or None:
    then libm's ``acos``.  MKL's ``vdAcos`` (an MKL build of torch's) is slower here and
    serializes concurrent callers."""
    if width not in (4, 8):
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).is_file():
            try:
                lib = ctypes.CDLL(str(lib_dir / name))
            except OSError:
                return None
            for accuracy in ("u35", "u10"):          # u35 (3.5 ulp) takes half u10's time here
                fn = getattr(lib, f"Sleef_acosd{width}_{accuracy}", None)
                if fn is not None:
                    return ctypes.cast(fn, ctypes.c_void_p).value
            return None
    return None


_P, _I, _L, _D = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
_WINDOW_PAIR = (None, [_P, _P, _L, _L, _I, _P, _P, _P, _D, _L, _L])
_SIGNATURES = {   # (restype, argtypes) of the library's functions
    "ntk_rule": (ctypes.c_int, [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2),
    "ntk_window_pair": _WINDOW_PAIR, "ntk_window_pair_shift": _WINDOW_PAIR,
    "ntk_roots": (ctypes.c_int, [ctypes.c_void_p] * 6 + [ctypes.c_int64]),
    "ntk_window_same": (None, [_P, _P, _L, _L, _I, _P, _D, _L, _L]),
    "ntk_gather": (None, [_P, _L, _P, _P, _L, _P, _L, _L]),
    "ntk_unpack": (None, [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]),
    "ntk_program": (_I, [_P, _I] + [_P] * 5 + [_I] + [_P] * 2 + [_L] * 2 + [_I]),
    "ntk_qmc": (_I, [_P, _I, _P, _I, _I, _I, _P, _P, _P, _P, _L, _L, _P, _L, _L, _I, _P, _P, _P, _L, _L, _P]),
    "ntk_factor2": (None, [_P] * 8 + [_L, _P]), "ntk_pack": (None, [_P, _I, _L, _L, _P]),
    "ntk_rank": (_I, [_P, _I, _L, _D]),
}


def _open():
    """Build (if not cached) and load the library once per process; ``_state`` says how it went."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, ""
        if os.environ.get("NTKCOMPILE_FUSED", "1").strip() == "0":
            why = "disabled by NTKCOMPILE_FUSED=0"
        elif (cc := _compiler()) is None:
            why = "no C compiler found (set CC)"
        else:
            try:
                path = build_library(cc, (SOURCE, *EXTRA_SOURCES), "fused", "the fused kernels", headers=HEADERS)
                lib = ctypes.CDLL(str(path))
                for name, (restype, argtypes) in _SIGNATURES.items():
                    getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
                width = lib.ntk_width()
                sleef = _sleef_acos(width)
                lib.ntk_init(ctypes.c_void_p(sleef))
                why = f"fused C kernels in use ({path}; {width} doubles per vector, arccos from " \
                      f"{'SLEEF' if sleef else 'libm'})"
            except OSError as e:
                lib, why = None, str(e)
        _state.update(lib=lib, why=why)
        return lib


def _load():
    """The library, or None; the first caller to find it unavailable (other than disabled)
    is warned, in its own thread."""
    lib = _state["lib"] if "lib" in _state else _open()
    if lib is None and not _state.get("warned") and not _state["why"].startswith("disabled"):
        _state["warned"] = True
        warnings.warn(f"ntkcompile: the fused kernels are unavailable ({_state['why']}); the closed-form "
                      "rules take their torch forms, 2-4x slower (NTKCOMPILE_FUSED=0 silences this)",
                      RuntimeWarning, stacklevel=4)
    return lib


def prepare():
    """Start building the library in the background if it is not loaded yet: ``compile()``
    calls this, so a first use on a new machine overlaps the C build (0.2-0.5 s) with
    tracing and planning.  The first kernel call waits for it (``_open`` holds the lock),
    so every call takes the same path."""
    if "lib" not in _state and not _state.get("preparing"):
        _state["preparing"] = True
        threading.Thread(target=_open, name="ntkcompile-fused-build", daemon=True).start()


def status() -> str:
    """Which path the closed-form rules take here, and why."""
    _load()
    return _state["why"]


def available() -> bool:
    return _load() is not None


def reset():
    """Forget the loaded library (tests: re-read ``NTKCOMPILE_FUSED`` and the cache)."""
    with _lock:
        _state.clear()


class Meter:
    """Bytes the fused kernels read and write (each input at its broadcast size, as a torch
    op is counted by benchmarks/_roofline.py), while ``metered()`` is active."""
    bytes = 0


@contextlib.contextmanager
def metered():
    global _meter
    _meter = Meter()
    try:
        yield _meter
    finally:
        _meter = None


@contextlib.contextmanager
def disabled():
    """Within the block, every rule takes its torch form (to compare the two paths)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


# ------------------------------------------------------------------ calling


def _applicable(args) -> bool:
    return all(isinstance(a, Tensor) and a.dtype == torch.float64 and a.device.type == "cpu"
               and not a.requires_grad for a in args) and not compiling()


def _coalesce(shape, strides):
    """Merge dimensions every array walks through contiguously; drop size-1 ones."""
    dims = [(n, list(s)) for n, s in zip(shape, zip(*strides)) if n != 1]
    out: list = []
    for n, s in dims:
        if out and all(ps == st * n for ps, st in zip(out[-1][1], s)):
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out


def _walk(arrays, shape, most: int):
    """``arrays`` broadcast to ``shape`` and the dimensions all of them walk, coalesced
    (``_coalesce``); copied contiguous when that leaves more than ``most`` dimensions."""
    arrays = [a if a.shape == shape else torch.broadcast_to(a, shape) for a in arrays]
    dims = _coalesce(shape, [a.stride() for a in arrays])
    if len(dims) > most:
        arrays = [a.contiguous() for a in arrays]
        dims = _coalesce(shape, [a.stride() for a in arrays])
    return arrays, dims


def _run(rule: str, args, params=()) -> Optional[Tensor]:
    lib = None if _off else _load()
    if lib is None or not _applicable(args):
        return None
    code, n_in = _RULES[rule]
    shape = args[0].shape
    if all(a.shape == shape and a.is_contiguous() for a in args):      # the common case: one flat loop
        sizes, strides = [1, 1, args[0].numel()], [0, 0, 1] * n_in
    else:
        shape = torch.broadcast_shapes(*[a.shape for a in args])
        args, dims = _walk(args, shape, 3)
        dims = [(1, [0] * n_in)] * (3 - len(dims)) + dims
        sizes = [n for n, _ in dims]
        strides = [s[r] for r in range(n_in) for s in (d[1] for d in dims)]
    out = torch.empty(shape, dtype=torch.float64)
    if out.numel() == 0:
        return out
    st = (ctypes.c_int64 * len(strides))(*strides)
    par = (ctypes.c_double * 2)(*(list(params) + [0.0, 0.0])[:2])
    shp = (ctypes.c_int64 * 3)(*sizes)
    ptrs = (ctypes.c_void_p * n_in)(*[a.data_ptr() for a in args])

    positive = []

    def part(lo, hi):
        rc = lib.ntk_rule(code, n_in, ptrs, st, shp, ctypes.c_void_p(out.data_ptr()), par, lo, hi)
        if rc < 0:
            raise RuntimeError(f"fused rule {rule!r} failed (code {rc})")
        positive.append(rc == 1)

    _parallel(part, out.numel(), out.numel())
    if all(positive):
        # every k11, k22 > 0: ops/elementwise.pin_zero_variance need not look for zeros
        out.variances_positive = True
    if _meter is not None:
        _meter.bytes += 8 * out.numel() * (n_in + 1)
    return out


def _parallel(part, rows: int, entries: int):
    """``part(lo, hi)`` over ``[0, rows)``: in one call, or split over torch's intra-op
    thread count (``tiling`` sets it to 1 in the threads that compute tiles side by side)."""
    global _pool, _pool_size
    threads = 1 if entries < _PARALLEL_ENTRIES else min(torch.get_num_threads(), rows)
    if threads <= 1:
        part(0, rows)
        return
    if _pool_size < threads:
        _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="ntkcompile-fused"), threads
    cuts = [rows * i // threads for i in range(threads + 1)]
    for f in [_pool.submit(part, lo, hi) for lo, hi in zip(cuts, cuts[1:])]:
        f.result()


def angle(k11, k12, k22) -> Optional[Tensor]:
    """``arccos c`` (``quadrature.angle``), or None where the fused path does not apply."""
    return _run("angle", (k11, k12, k22))


def relu_family(k11, k12, k22, theta, aa: float, ab2: float) -> Optional[Tensor]:
    """``aa R(c) + ab2 R(-c)`` with ``R`` the arc-cosine kernel at ``theta`` (ops/activations)."""
    return _run("relu", (k11, k12, k22, theta), (aa, ab2))


def step_family(k11, theta, k22, aa: float, ab2: float) -> Optional[Tensor]:
    """``aa S(c) + ab2 S(-c)`` with ``S = (pi - theta) / (2 pi)`` (ops/activations); the
    variances only say whether they are all positive."""
    return _run("step", (k11, theta, k22), (aa, ab2))


# ------------------------------------------------------------------ window sums on pairs


@functools.lru_cache(maxsize=256)
def _window_table(g, adjoint: bool):
    """``(taps, n_out)`` int32: for each tap of ``g`` (``ConvGeometry``) and output position,
    the input position it reads, or -1 for zero padding.  ``adjoint``: for each input
    position, the output position whose window reads it at that tap (-1: none)."""
    offsets = torch.tensor(g.offsets(), dtype=torch.int64).reshape(-1, len(g.kernel))
    stride, pad = torch.tensor(g.stride), torch.tensor(g.padding)
    src, dst = (g.out_shape, g.in_shape) if adjoint else (g.in_shape, g.out_shape)
    pos = torch.cartesian_prod(*[torch.arange(n) for n in dst]).reshape(-1, len(dst))  # (n_out, nd)
    if adjoint:       # s = p * stride + offset - pad  =>  p = (s + pad - offset) / stride
        num = pos[None] + pad - offsets[:, None]
        coord = torch.div(num, stride, rounding_mode="floor")
        ok = (num % stride == 0)
    else:
        coord = pos[None] * stride + offsets[:, None] - pad
        ok = torch.ones_like(coord, dtype=torch.bool)
    ok &= (coord >= 0) & (coord < torch.tensor(src))
    flat = torch.zeros(coord.shape[:2], dtype=torch.int64)
    for n, c in zip(src, coord.unbind(-1)):
        flat = flat * n + c
    table = torch.where(ok.all(-1), flat, -1).to(torch.int32).contiguous()
    runs, run_at = [], [0]
    for row in table.tolist():
        for q, s in enumerate(row):
            if s < 0:
                continue
            last = runs[-1] if len(runs) > run_at[-1] else None
            if last and 0 <= q - last[0] - last[2] < _RUN_GAP and last[1] + q - last[0] == s:
                last[3] |= q > last[0] + last[2]      # across padding (-1 entries): masked
                last[2] = q - last[0] + 1
            else:
                runs.append([q, s, 1, 0])
        run_at.append(len(runs))
    if len(runs) * _RUN_LENGTH > (table >= 0).sum():     # short runs: gather entry by entry
        return table, None, None
    return table, torch.tensor(runs, dtype=torch.int32).reshape(-1, 4), torch.tensor(run_at, dtype=torch.int32)


@functools.lru_cache(maxsize=256)
def _window_shifts(g, adjoint: bool):
    """``(shift, mask)`` where every tap of ``_window_table`` reads ``q + shift[t]`` at the
    output positions q it reads at all (stride-1 windows), ``mask`` (int64) all bits set
    there and 0 elsewhere; else None."""
    table = _window_table(g, adjoint)[0].to(torch.int64)
    ok = table >= 0
    delta = table - torch.arange(table.shape[1])
    shift = delta.gather(1, ok.to(torch.int8).argmax(1, keepdim=True))[:, 0]    # at the first entry read
    if not bool((~ok | (delta == shift[:, None])).all()):
        return None
    return shift.to(torch.int32).contiguous(), torch.where(ok, -1, 0).contiguous()


def window_pair(a, g, adjoint: bool = False) -> Optional[Tensor]:
    """``kernels.spatial.stencil_pair`` (``adjoint``: its adjoint) of ``a``:
    ``(*batch, *S, *S) -> (*batch, *P, *P)`` (or back), or None where the fused path does
    not apply."""
    lib = None if _off else _load()
    if lib is None or not _applicable((a,)):
        return None
    src, dst = (g.out_shape, g.in_shape) if adjoint else (g.in_shape, g.out_shape)
    n_in, n_out = math.prod(src), math.prod(dst)
    batch = a.shape[:a.ndim - 2 * len(src)]
    a = a.reshape(-1, n_in, n_in).contiguous()
    out = torch.empty((*batch, *dst, *dst), dtype=torch.float64)
    table, runs, run_at = _window_table(g, adjoint)
    ptr = lambda t: ctypes.c_void_p(None if t is None else t.data_ptr())  # noqa: E731
    shifts = _window_shifts(g, adjoint)

    def part(lo, hi):
        if shifts is not None:
            lib.ntk_window_pair_shift(ptr(a), ptr(out), n_in, n_out, table.shape[0], ptr(table), ptr(shifts[0]),
                                      ptr(shifts[1]), float(g.size), lo, hi)
        else:
            lib.ntk_window_pair(ptr(a), ptr(out), n_in, n_out, table.shape[0], ptr(table), ptr(runs), ptr(run_at),
                                float(g.size), lo, hi)

    _parallel(part, a.shape[0], out.numel())
    if _meter is not None:
        _meter.bytes += 8 * (a.numel() + out.numel())
    return out


def window_same(a, g) -> Optional[Tensor]:
    """``kernels.spatial.stencil_same`` of ``a``: ``(N, *S) -> (N, *P)``, or None where the fused
    path does not apply.  The arrays are small (one input's variances over positions): a
    C loop instead of a dozen torch calls (pad, a view per tap, adds) per layer and tile."""
    lib = None if _off else _load()
    if lib is None or not _applicable((a,)):
        return None
    nd = len(g.kernel)
    n_in, n_out = math.prod(g.in_shape), math.prod(g.out_shape)
    batch = a.shape[:a.ndim - nd]
    a = a.reshape(-1, n_in).contiguous()
    out = torch.empty((*batch, *g.out_shape), dtype=torch.float64)
    table = _window_table(g, False)[0]
    lib.ntk_window_same(a.data_ptr(), out.data_ptr(), n_in, n_out, table.shape[0], table.data_ptr(),
                        float(g.size), 0, a.shape[0])
    if _meter is not None:
        _meter.bytes += 8 * (a.numel() + out.numel())
    return out


# ------------------------------------------------------------------ the packed pair layout


def _index_ok(*idx) -> bool:
    return all(isinstance(i, Tensor) and i.dtype == torch.int64 and i.device.type == "cpu"
               and i.is_contiguous() for i in idx)


def gather(x, a, b=None) -> Optional[Tensor]:
    """``x[a]`` (``b`` None) or ``x[a, b]`` for a float64 ``x`` with ``b`` indexing its second axis
    (``kernels.spatial``: lifts to and packing into the packed pairs), or None where the fused
    path does not apply.  Bounds are the caller's: the indices come from ``pair_indices``."""
    lib = None if _off else _load()
    if lib is None or not _applicable((x,)) or not _index_ok(a, *(() if b is None else (b,))):
        return None
    lead = 1 if b is None else 2
    if x.ndim < lead or a.ndim != 1 or (b is not None and b.shape != a.shape) or not x.is_contiguous():
        return None                    # (a strided x: torch's indexing reads it in place)
    row = math.prod(x.shape[lead:])
    out = torch.empty((a.shape[0], *x.shape[lead:]), dtype=torch.float64)
    stride = 1 if b is None else x.shape[1]

    def part(lo, hi):
        lib.ntk_gather(x.data_ptr(), row, a.data_ptr(), None if b is None else b.data_ptr(), stride,
                       out.data_ptr(), lo, hi)

    _parallel(part, a.shape[0], out.numel())
    if _meter is not None:
        _meter.bytes += 8 * 2 * out.numel() + 8 * a.numel() * (1 if b is None else 2)
    return out


def unpack(packed, i, j, n) -> Optional[Tensor]:
    """The symmetric ``(n, n)`` matrix of the packed pairs ``packed[t]`` at ``(i[t], j[t])``."""
    lib = None if _off else _load()
    if lib is None or not _applicable((packed,)) or not _index_ok(i, j) or packed.ndim != 1:
        return None
    packed = packed.contiguous()
    out = torch.empty((n, n), dtype=torch.float64)
    lib.ntk_unpack(packed.data_ptr(), i.data_ptr(), j.data_ptr(), n, out.data_ptr(), 0, packed.shape[0])
    if _meter is not None:
        _meter.bytes += 8 * (packed.numel() + 2 * i.numel() + out.numel())
    return out


# ------------------------------------------------------------------ programs (kernels/program.py)

_BLOCK = 256                         # fused.c's BLOCK: the entries of one register
_PROGRAM_DIMS = 8                    # fused.c's PROG_MAX_DIMS


def leaf_shape(x):
    """The shape of a program's input: an array's, or ``x[idx]``'s for ``(x, idx)``."""
    return (x[1].shape[0], *x[0].shape[1:]) if isinstance(x, tuple) else x.shape


def _c_program(prog):
    """``prog``'s instructions and constants as ctypes arrays, made once per program."""
    c = getattr(prog, "_c_arrays", None)
    if c is None:
        c = ((ctypes.c_int32 * (7 * len(prog.code)))(*[v for ins in prog.code for v in ins]),
             (ctypes.c_double * len(prog.consts))(*prog.consts))
        prog._c_arrays = c
    return c


def program(prog, leaves, shape) -> Optional[list]:
    """Run a ``kernels.program.Program``'s instructions over ``leaves`` (pair arrays, or
    ``(x, idx)``: ``x[idx]`` for a 1-D ``x``), all broadcast to ``shape``; its outputs, or
    None where the fused path does not apply or a rule met a variance that is not positive."""
    lib = None if _off else _load()
    if lib is None:
        return None
    arrays = [x[0] if isinstance(x, tuple) else x for x in leaves]
    if not _applicable(arrays) or not _index_ok(*(x[1] for x in leaves if isinstance(x, tuple))):
        return None
    n_out, registers = len(prog.outputs), prog.registers
    if len(shape) != 1 or any(isinstance(x, tuple) and x[0].ndim != 1 for x in leaves):
        leaves = [gather(*x) if isinstance(x, tuple) else x for x in leaves]   # lifted arrays
        if any(x is None for x in leaves):
            return None
    plain, dims = _walk([x for x in leaves if not isinstance(x, tuple)], shape, _PROGRAM_DIMS)
    dims = dims or [(math.prod(shape), [0] * len(plain))]     # only gathered inputs, or one entry
    sizes = [n for n, _ in dims]
    strides, ptrs, index, p = [], [], [], 0
    for x in leaves:
        if isinstance(x, tuple):
            strides += [0] * (len(dims) - 1) + [x[0].stride(0)]
            ptrs.append(x[0].data_ptr())
            index.append(x[1].data_ptr())
        else:
            strides += [d[1][p] for d in dims]
            ptrs.append(plain[p].data_ptr())
            index.append(None)
            p += 1
    sums = [prog.sum_axes.get(k) for k in prog.outputs]      # the axes an output sums over, else None
    outs = [torch.empty(shape, dtype=torch.float64) if a is None else
            torch.zeros(shape[:len(shape) - a], dtype=torch.float64) for a in sums]
    total = math.prod(shape)
    if total == 0:
        return outs
    c_code, c_consts = _c_program(prog)
    c_leaves = (ctypes.c_void_p * len(ptrs))(*ptrs)
    c_strides = (ctypes.c_int64 * len(strides))(*strides)
    c_index = (ctypes.c_void_p * len(index))(*index)
    c_outs = (ctypes.c_void_p * n_out)(*[o.data_ptr() for o in outs])
    c_shape = (ctypes.c_int64 * len(sizes))(*sizes)
    ok = []

    def part(lo, hi):
        regs = torch.empty(registers * _BLOCK, dtype=torch.float64)
        rc = lib.ntk_program(c_code, len(prog.code), c_consts, c_leaves, c_strides, c_index, c_outs, len(sizes),
                             c_shape, regs.data_ptr(), lo, hi, registers)
        if rc < 0:
            raise RuntimeError(f"fused program failed (code {rc})")
        ok.append(rc == 1)

    if prog.sums:           # threads split at whole sums (each output entry is one thread's)
        g = math.lcm(*prog.sums.values())
        _parallel(lambda lo, hi: part(lo * g, hi * g), total // g, total)
    else:
        _parallel(part, total, total)
    if not all(ok):
        return None
    if _meter is not None:
        _meter.bytes += 8 * total * (len(leaves) + sums.count(None))
    return outs
