"""The memory ntkcompile plans with (``resources.available_memory``) honours the process's
own limits, so that a job under ``ulimit`` or in a container splits its work to fit."""
import os
import subprocess
import sys

import pytest


def test_a_data_limit_lowers_the_memory_available():
    code = ("import resource\n"
            "from ntkcompile.resources import available_memory as have\n"
            "before = have()\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (2 ** 31, resource.RLIM_INFINITY))\n"
            "print(before, have())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert 0 < after <= 2 ** 31 and after <= before


_WARM_CALLS = """
import resource, torch, ntkcompile
from torch import nn
from ntkcompile import resources
torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
kfn = ntkcompile.compile(m)
x = torch.randn(32, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
first = kfn(x, progress=False)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    kfn(x, progress=False)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3
print(int(resources.keep_heap()), faults, float(first.ntk.sum()))
"""


def _warm_faults(env):
    out = subprocess.run([sys.executable, "-c", _WARM_CALLS], env=env, capture_output=True, text=True, check=True)
    kept, faults, total = out.stdout.split()
    return kept == "1", int(faults), float(total)


def test_keep_heap_stops_warm_calls_faulting_in_fresh_pages():
    """glibc returns a freed heap top to the OS past a small trim threshold, so a kernel call
    whose tiles allocate and free the same MiB-sized arrays faults their pages in again tile
    after tile (about 19,000 minor faults a call here, for a pooled CNN on 32 inputs).  Kernel
    calls set glibc's thresholds once (``resources.keep_heap``); the oracle is the OS's count of
    minor page faults, ``NTKCOMPILE_MALLOC=0`` the contrast, and the kernels are the same."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    kept, faults, total = _warm_faults(env)
    if not kept:
        pytest.skip("not glibc: keep_heap does nothing here")
    off, faults_off, total_off = _warm_faults({**env, "NTKCOMPILE_MALLOC": "0"})
    assert not off and total == total_off
    assert faults_off > 5 * faults, (faults, faults_off)


def test_keep_heap_leaves_a_users_malloc_tuning_alone():
    code = "from ntkcompile import resources; print(int(resources.keep_heap()))"
    for extra in ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000000"}, {"MALLOC_ARENA_MAX": "2"},
                  {"NTKCOMPILE_MALLOC": "0"}):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **extra}, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == "0", extra
