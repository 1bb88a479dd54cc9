"""N-D integrands compiled to C: each ``pointwise.Program`` as one loop over a block of points.

``sampling.c`` interprets a program one instruction at a time over a block of 256 points,
each instruction a pass that reads and writes L1 (about 3.6 cycles per vector of points
and instruction on ResNet v1).  Compiled, the whole integrand is one loop whose values stay
in vector registers, with the same steps in the same order (``Program.c_body``; only the
sums over points are reordered).  The bodies are built with the system C compiler that
builds ``fused.c``: every program made since the last build, in one file (one compiler run
per model, 0.2-1 s), cached on disk by the hash of its source, compiler flags and CPU (the
least recently used pruned: ``prune``); where that fails the interpreter runs (``body``
returns None).  ``qmc`` builds them only for calls of ``WORTH`` points x entries or more.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional

from . import fused

BLOCK = 256                        # sampling.c's BLOCK
# Points x entries of one call from which qmc builds the bodies: interpreted, such a call takes
# about 0.05 s (twice the compiled time); a build costs 0.2-1 s, once per machine and model, so
# small kernels (and the test suite) never wait for the compiler.
WORTH = 1 << 23
_lock = threading.Lock()
_pending: "weakref.WeakSet" = weakref.WeakSet()     # programs made, not built yet
_libraries: list = []             # the loaded libraries (kept: their functions are in use)
_state = {"failed": ""}


def register(program) -> None:
    """Queue ``program`` for the next build (``pointwise.build_family`` calls this)."""
    if program.source:
        with _lock:
            _pending.add(program)


def body(program) -> Optional[int]:
    """The address of ``program``'s compiled body, building every queued program first if it
    is not built yet; None where no compiler works (the interpreter runs)."""
    if program.body is not None or not program.source:
        return program.body
    with _lock:
        if program.body is None and not _state["failed"]:
            todo = sorted(set(_pending) | {program}, key=lambda p: p.source)
            _pending.clear()
            try:
                _build(todo)
            except OSError as e:
                _state["failed"] = str(e)
                warnings.warn(f"ntkcompile: the N-D integrands could not be compiled ({e}); sampling.c "
                              "interprets them, about 2x slower", RuntimeWarning, stacklevel=2)
    return program.body


def _build(programs) -> None:
    names = [f"ntk_body_{hashlib.sha256(p.source.encode()).hexdigest()[:16]}" for p in programs]
    unique = dict(zip(names, programs))
    source = "#include <stdint.h>\n#define BLOCK %d\n\n" % BLOCK + "\n".join(
        p.source.replace("{name}", name) for name, p in sorted(unique.items()))
    cc = fused._compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    # the sums over points may be reordered (vectorized): a body's values then agree with the
    # interpreter's to rounding, which is all a Monte Carlo mean needs; the library's name
    # hashes the source's text, so a temporary file serves
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bodies.c"
        src.write_text(source)
        path = fused.build_library(cc, (src,), "bodies", "the integrands",
                                   extra_flags=("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"))
    prune(path)
    lib = ctypes.CDLL(str(path))
    _libraries.append(lib)
    for name, program in zip(names, programs):
        program.body = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


# Libraries of integrands kept in the cache directory: every set of programs (a model, a change
# of planner) makes its own, about 70 KB; the most recently used KEEP, and any used within KEEP_DAYS.
KEEP, KEEP_DAYS = 32, 7


def prune(used: Path) -> None:
    """Mark ``used`` as used now (its time of modification) and delete the other ``bodies-*.so``
    beside it beyond the ``KEEP`` most recently used that no process has used in ``KEEP_DAYS``
    (one loaded meanwhile keeps its mapping; a later run rebuilds it)."""
    now = time.time()
    try:
        os.utime(used)
        found = sorted(((p.stat().st_mtime, p) for p in used.parent.glob("bodies-*.so")), reverse=True)
    except OSError:
        return
    for mtime, p in found[KEEP:]:
        if now - mtime > KEEP_DAYS * 86400:
            try:
                p.unlink()
            except OSError:
                pass


def status() -> str:
    """Whether the integrands are compiled here, and why not."""
    return (f"not compiled: {_state['failed']}" if _state["failed"]
            else f"compiled for calls of {WORTH} points x entries or more")
