"""A busy machine for the benchmarks: other processes keeping every core partly busy."""
import os
import subprocess
import sys
import time

_SPIN = """
import time, sys
duty = float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.01 * duty:
        pass
    time.sleep(0.01 * (1 - duty))
"""


class Busy:
    """``with Busy(0.5):`` one process per core, each spinning ``duty`` of every 10 ms."""

    def __init__(self, duty: float):
        self.duty = duty
        self.procs = []

    def __enter__(self):
        if self.duty > 0:
            self.procs = [subprocess.Popen([sys.executable, "-c", _SPIN, str(self.duty)])
                          for _ in range(os.cpu_count() or 1)]
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []
