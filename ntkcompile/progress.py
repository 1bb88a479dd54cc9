"""The progress bar of tiled kernel computations (``tiling.evaluate``)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    """A one-line progress bar on stderr for tiled kernel computations.

    Tiles that call N-D evaluators (``quadrature.expect_nd``: Monte Carlo or quadrature
    over many slots, minutes for a post-activation residual network) also report their
    chunks (``within``), so that the bar moves inside a tile: each tile counts for one,
    split evenly over the ``nd_calls`` evaluations it is expected to make.  Automatic
    bars appear after a second, for runs of 8 or more tiles or tiles that report."""

    _DELAY = 1.0    # seconds before an automatic bar appears: short runs stay quiet

    def __init__(self, total, enabled, nd_calls=0, banded=False):
        self.total, self.done, self.tiles = total, 0.0, 0
        self.auto = enabled is None
        self.enabled = (total >= 8 or nd_calls > 0 or banded) if enabled is None else bool(enabled)
        self.nd_calls = nd_calls
        self.partial: dict = {}             # tile -> (fraction reported, calls finished)
        self.lock = threading.Lock()
        self.shown = False
        self.t0 = self.last = time.perf_counter()

    def within(self, tile):
        """A ``quadrature.PROGRESS.hook`` for the chunks of ``tile``'s N-D evaluations."""
        def hook(done, total):
            with self.lock:
                frac, calls = self.partial.get(tile, (0.0, 0))
                now = min(0.99, (calls + done / total) / self.nd_calls)
                self.done += max(0.0, now - frac)
                self.partial[tile] = (max(frac, now), calls + (done == total))
                self._draw(False)
        return hook if self.nd_calls else None

    def add(self, tile, fraction):
        """Another ``fraction`` of ``tile`` is done (one of its bands of positions, ``kernels.bands``,
        possibly computed at once with others of the same tile)."""
        with self.lock:
            frac, calls = self.partial.get(tile, (0.0, 0))
            now = min(0.99, frac + fraction)
            self.done += now - frac
            self.partial[tile] = (now, calls)
            self._draw(False)

    def step(self, tile=None):
        with self.lock:
            frac, _ = self.partial.pop(tile, (0.0, 0))
            self.done += 1.0 - frac
            self.tiles += 1
            self._draw(self.tiles == self.total)

    def _draw(self, last):
        el = time.perf_counter() - self.t0
        due = last or el - (self.last - self.t0) >= 0.1   # <= 10 redraws/s
        if self.enabled and due and (not self.auto or el >= self._DELAY) and self.done > 0:
            self.shown, self.last = True, self.t0 + el
            eta = el / self.done * max(0.0, self.total - self.done)
            width = 30
            fill = int(width * min(self.done, self.total) / self.total)
            sys.stderr.write(f"\r[ntkcompile] [{'#' * fill}{'.' * (width - fill)}] "
                             f"{self.tiles}/{self.total} tiles, {el:.1f}s elapsed, ~{eta:.1f}s left")
            sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write("\n")
