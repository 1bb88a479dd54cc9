"""The memory ntkcompile plans with (``resources.available_memory``) honours the process's
own limits, so that a job under ``ulimit`` or in a container splits its work to fit."""
import subprocess
import sys


def test_a_data_limit_lowers_the_memory_available():
    code = ("import resource\n"
            "from ntkcompile.resources import available_memory as have\n"
            "before = have()\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (2 ** 31, resource.RLIM_INFINITY))\n"
            "print(before, have())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert 0 < after <= 2 ** 31 and after <= before
