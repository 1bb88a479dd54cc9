"""Tiled kernel computation equals the untiled one; memory stays at the output size."""
import pytest
import torch
from torch import nn

import ntkcompile
from models import ConvResNet, CorrelatedResidual, PostActivationResidual


@pytest.mark.parametrize("bs", [1, 3, 7])
def test_batched_equals_unbatched(bs, capsys):
    kfn = ntkcompile.compile(CorrelatedResidual(4, 8), W_std=1.3, b_std=0.2)
    x1, x2 = torch.randn(10, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for args in ((x1,), (x1, x2)):
        full = kfn(*args)
        tiled = kfn(*args, tile_size=bs, progress=False)
        for name in ("nngp", "ntk"):
            a, b = getattr(full, name), getattr(tiled, name)
            assert torch.allclose(a, b, rtol=1e-12, atol=0)
            if len(args) == 1:                    # against itself: exactly symmetric in tiles too
                assert torch.equal(b, b.T)
    assert capsys.readouterr().err == ""          # progress=False: no bar


def test_batched_conv_and_progress_bar(capsys):
    kfn = ntkcompile.compile(ConvResNet(2, 4), W_std=1.2, b_std=0.1)
    x = torch.randn(9, 2, 5, 5, dtype=torch.float64)
    full = kfn(x, get="ntk")
    tiled = kfn(x, get="ntk", tile_size=2, progress=True)
    assert full.nngp is None and tiled.nngp is None
    assert torch.allclose(full.ntk, tiled.ntk, rtol=1e-12, atol=0)
    err = capsys.readouterr().err
    assert "15/15 tiles" in err                  # 5 blocks per side: 15 on or above the diagonal


def test_default_tiles_are_balanced_and_exact():
    """Without tile_size a conv net is cut into cache-sized, equal tiles; same kernel."""
    kfn = ntkcompile.compile(ConvResNet(2, 4), W_std=1.2, b_std=0.1)
    x = torch.randn(30, 2, 6, 6, dtype=torch.float64)
    auto = kfn(x, progress=False)
    side = kfn._auto_tile(30, x.device)
    tiles = -(-30 // side)
    assert tiles > 1 and tiles * side - 30 < tiles    # balanced: the last tile is not a sliver
    one = kfn(x, tile_size=30, progress=False)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(auto, name), getattr(one, name), rtol=1e-12, atol=0)


@pytest.fixture
def two_threads():
    """torch on 2 threads (CI's 2 cores) for the test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_tiles_computed_one_per_thread_equal_one_at_a_time(two_threads, monkeypatch):
    """On a CPU, tiles run one per thread, each single-threaded (tiling._in_parallel): the
    kernels equal those of one tile at a time, and torch's thread count comes back."""
    from ntkcompile import tiling
    kfn = ntkcompile.compile(ConvResNet(2, 4), W_std=1.2, b_std=0.1)
    x1, x2 = torch.randn(11, 2, 5, 5, dtype=torch.float64), torch.randn(7, 2, 5, 5, dtype=torch.float64)
    seen, real = [], tiling._in_parallel

    def spy(compute, tiles, workers):
        seen.append(workers)
        work = [tiling._tile_work(t, 3, 11, len(args[-1]), len(args) == 1) for t, _ in tiles]
        assert workers == 1 or (work == sorted(work, reverse=True) and work[0] > work[-1])  # largest first
        for r in real(compute, tiles, workers):
            seen.append(torch.get_num_threads())
            yield r

    monkeypatch.setattr(tiling, "_in_parallel", spy)
    for args in ((x1,), (x1, x2)):
        seen.clear()
        par = kfn(*args, tile_size=3, progress=False)
        assert seen[0] == 2 and set(seen[1:]) == {1} and torch.get_num_threads() == 2
        monkeypatch.setattr(tiling, "_tile_workers", lambda *a: 1)
        one = kfn(*args, tile_size=3, progress=False)
        monkeypatch.undo()
        monkeypatch.setattr(tiling, "_in_parallel", spy)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(par, name), getattr(one, name), rtol=1e-13, atol=0)


def test_few_expensive_pairs_are_split_into_a_tile_per_thread(two_threads, monkeypatch):
    """A tanh MLP's pairs cost 2-D quadrature, which the automatic tile size does not count:
    40 inputs fit one tile, which would leave a core idle; the side shrinks until each
    thread has tiling._TILES_PER_WORKER tiles (4: side 10, 10 tiles), and the kernels equal
    those of one tile.  Cheap kernels stay whole (per-tile Python overhead would cost more
    than the second core gives)."""
    from ntkcompile import tiling
    sides, real = [], tiling._fit_memory
    monkeypatch.setattr(tiling, "_fit_memory", lambda k, bs, *a: (sides.append(bs), real(k, bs, *a))[1])
    x = torch.randn(40, 3, dtype=torch.float64)
    for act, side in ((nn.Tanh, 10), (nn.ReLU, 40)):
        kfn = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), act(), nn.Linear(8, 1)), W_std=1.5, b_std=0.1)
        sides.clear()
        auto = kfn(x, progress=False)
        assert kfn._auto_tile(40, x.device) == 40 and sides == [side]      # tanh: 10 tiles on and above the diagonal
        one = kfn(x, tile_size=40, progress=False)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(auto, name), getattr(one, name), rtol=1e-13, atol=0)


def test_a_failing_tile_in_a_thread_raises_and_restores_the_threads(two_threads):
    """A tile whose kernel is not finite raises the usual error from the worker threads'
    results; the remaining tiles are cancelled and torch's thread count is restored."""
    from ntkcompile.errors import NonFiniteKernelError

    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x / x.norm(dim=1, keepdim=True))))

    x = torch.randn(12, 3, dtype=torch.float64)
    x[9] = 0.0                                  # 0/0 in the tiles of row 9
    kfn = ntkcompile.compile(Normalized())
    with pytest.raises(NonFiniteKernelError):
        kfn(x, tile_size=2, progress=False)
    assert torch.get_num_threads() == 2
    assert torch.isfinite(kfn(x[:9], tile_size=2, progress=False).ntk).all()


def test_the_progress_bar_moves_inside_a_tile_of_n_d_evaluations(monkeypatch, capsys):
    """A post-activation residual ``relu(h + W h)`` needs the N-D evaluator (Monte Carlo over
    4 slots), which can take minutes in one tile (a small ResNet v1: no output for 719 s).
    Its chunks advance the bar: one tile, drawn part-way before it finishes, and whole at
    the end."""
    from ntkcompile import tiling

    class PostRes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.o(torch.relu(h + self.b(h)))

    kfn = ntkcompile.compile(PostRes())
    drawn, real = [], tiling._Progress._draw
    monkeypatch.setattr(tiling._Progress, "_draw", lambda bar, last: (drawn.append((bar.tiles, bar.done)),
                                                                      real(bar, last)))
    kfn(torch.randn(3, 3, dtype=torch.float64), tile_size=3, progress=True)
    assert kfn._nd_calls() > 0
    inside = [done for tiles, done in drawn if tiles == 0]
    assert inside and 0 < min(inside) and max(inside) < 1 and inside == sorted(inside)
    assert drawn[-1] == (1, pytest.approx(1.0))
    assert "1/1 tiles" in capsys.readouterr().err


def test_bad_tile_size_and_the_deprecated_alias():
    kfn = ntkcompile.compile(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    x = torch.randn(5, 3, dtype=torch.float64)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tile_size"):
            kfn(x, tile_size=bad)
    with pytest.warns(DeprecationWarning, match="tile_size"):
        old = kfn(x, batch_size=2)
    torch.testing.assert_close(old.ntk, kfn(x, tile_size=2).ntk, rtol=0, atol=0)
    with pytest.raises(TypeError, match="tile_size only"):
        kfn(x, tile_size=2, batch_size=2)


_PEAK_SCRIPT = """
import resource, sys, torch, ntkcompile
from torch import nn
torch.manual_seed(0)
kfn = ntkcompile.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                       nn.Linear(16, 1)), W_std=1.4, b_std=0.1)
x = torch.randn(int(sys.argv[1]), 8, dtype=torch.float64)
if int(sys.argv[1]) > 10:
    k = kfn(x, get="ntk", tile_size=1000, progress=False)
    idx = torch.tensor([0, 7777, 19999])
    torch.testing.assert_close(k.ntk[idx][:, idx], kfn(x[idx], get="ntk").ntk, rtol=1e-12, atol=0)
# VmHWM is this process's own high-water mark (a new address space at exec); ru_maxrss on Linux
# also counts the parent's at fork, so a pytest process that was already large hid the run
try:
    print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_20000_inputs_in_tiles_memory_bounded():
    """The 20000-input MLP kernel: the peak resident memory of a fresh process exceeds that of
    the same process computing nothing by about the output (3.2 GB) plus one tile's work.
    Each is measured in its own process, so the high-water marks are the run's own."""
    import subprocess
    import sys

    def peak(n):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n)], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    extra = peak(20000) - peak(2)
    out_bytes = 20000 * 20000 * 8
    assert out_bytes <= extra < out_bytes + 600e6, (extra / 1e9, out_bytes / 1e9)


@pytest.mark.slow
@pytest.mark.parametrize("model, shape, rtol", [
    (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)), (5,), 2e-6),
    (ConvResNet(2, 4), (2, 6, 6), 1e-12),
    (PostActivationResidual(5, 8), (5,), 1e-12),
], ids=["mlp", "conv_resnet", "post_activation"])
def test_jit_matches_eager(model, shape, rtol):
    """torch.compile of the generated code (needs a C++ compiler) gives the same kernels.

    The tanh MLP's quadrature refines every entry whose error estimate exceeds
    ``quadrature_tol`` (1e-6); rounding differences between the fused and the eager code
    can put an entry on the other side of that test, and the two values then differ by
    up to the estimate (measured: one entry of 144 at 2.9e-7), so it is compared within
    twice the tolerance; the ResNet (closed forms only) to 1e-12.  The post-activation
    residual's N-D expectations (quasi-Monte Carlo) run eagerly inside the compiled code, on
    the same points: to 1e-12 (traced, they took the dense evaluator, every entry on the same
    points: 6.5e-2 off on such an MLP at 512 points)."""
    x = torch.randn(12, *shape, dtype=torch.float64)
    a = ntkcompile.compile(model, W_std=1.3, b_std=0.1)(x)
    b = ntkcompile.compile(model, W_std=1.3, b_std=0.1, jit=True)(x)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=rtol, atol=0)
    torch.testing.assert_close(a.nngp, b.nngp, rtol=rtol, atol=0)
