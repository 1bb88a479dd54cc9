"""What this machine has: memory, for checks made before allocating."""
from __future__ import annotations

import os
from typing import Optional


def physical_memory() -> Optional[int]:
    """Bytes of RAM on this machine, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation: Linux ``MemAvailable`` (else the
    physical memory), less where this process is limited more tightly, by a soft
    ``RLIMIT_AS`` or ``RLIMIT_DATA`` (``ulimit -v`` / ``-d``: what is left of it) or by its
    cgroup's ``memory.max`` (a container's limit); ``None`` where the OS says nothing."""
    have = _meminfo("MemAvailable") or physical_memory()
    for limit in (_rlimit_left("RLIMIT_AS", "VmSize"), _rlimit_left("RLIMIT_DATA", "VmData"), _cgroup_left()):
        if limit is not None:
            have = limit if have is None else min(have, limit)
    return have


def _meminfo(key, path="/proc/meminfo") -> Optional[int]:
    """A ``kB`` entry of ``/proc/meminfo`` (or ``/proc/self/status``) in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rlimit_left(name, used) -> Optional[int]:
    """What is left of a soft resource limit of this process (``used``: its status line)."""
    try:
        import resource
        soft, _ = resource.getrlimit(getattr(resource, name))
    except (ImportError, AttributeError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return max(0, soft - (_meminfo(used, "/proc/self/status") or 0))


def _cgroup_left() -> Optional[int]:
    """What is left of this process's cgroup memory limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, as the container sees its own cgroup)."""
    for limit, current in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                           ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                            "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                top = f.read().strip()
            if top == "max" or int(top) >= 2 ** 60:       # unlimited
                continue
            with open(current) as f:
                return max(0, int(top) - int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return None


_HEAP_SET: Optional[bool] = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # glibc's mallopt parameters (malloc.h)


def keep_heap() -> bool:
    """Let glibc's malloc keep freed arrays of up to 32 MiB in its heaps (once per process).

    A kernel call allocates and frees the same few-MiB arrays tile after tile.  glibc serves
    them from its heaps once its dynamic mmap threshold has grown, but returns the heap's
    free top to the OS whenever it exceeds the (dynamic, small) trim threshold, so each
    tile's arrays are mapped afresh and every page faults: measured here, six cnn3_gap calls
    spent 2.8 s in the OS (page faults) beside 7.5 s of their own, 0.4 s with the thresholds
    set, and warm calls were 1.5-1.9x faster (``benchmarks/bench_vs_neural_tangents.py``).
    The values set are glibc's own ceilings for its dynamic thresholds (mmap threshold 32
    MiB, trim threshold twice that), what a long-running torch process reaches anyway once
    it has freed a 32 MiB array; setting them fixes them there.  Not done where the user
    tuned malloc (``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment), with
    ``NTKCOMPILE_MALLOC=0``, or off glibc.  Returns whether the thresholds are set."""
    global _HEAP_SET
    if _HEAP_SET is not None:
        return _HEAP_SET
    _HEAP_SET = False
    if os.environ.get("NTKCOMPILE_MALLOC", "1") == "0" or "GLIBC_TUNABLES" in os.environ \
            or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc only: another libc's mallopt means other things
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):     # (Windows: no CDLL(None))
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _HEAP_SET = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))
    return _HEAP_SET
