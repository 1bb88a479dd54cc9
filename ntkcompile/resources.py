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
