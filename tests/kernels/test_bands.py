"""Position bands (``kernels.bands``): a pooled CNN whose position pairs do not fit in the
memory available is computed band by band, and equals the kernel computed whole.

Oracles: the same compiled kernel with all position pairs at once (the memory check
forced low only for the banded run), and for the banded stencils the whole-image
stencils of ``kernels.spatial`` restricted to the band's rows.
"""
import pytest
import torch
import torch.nn as nn

import ntkcompile
from ntkcompile import tiling
from ntkcompile.errors import KernelMemoryError
from ntkcompile.ir.geometry import ConvGeometry
from ntkcompile.kernels import bands, spatial


class GapCNN(nn.Module):
    """Stride, dilation, a residual sum and several nonlinearities before a global mean."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(8, 8, (3, 1), padding=(2, 0), dilation=(2, 1))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.erf(self.c2(h))
        h = h + torch.relu(self.c3(h))
        return self.fc(h.mean((2, 3)))


class Myrtle(nn.Module):
    """Average poolings inside the network (as Myrtle CNNs have), one with overlapping windows."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = nn.functional.avg_pool2d(torch.relu(self.c1(x)), 2)
        h = nn.functional.avg_pool2d(torch.erf(self.c2(h)), 3, stride=1, padding=1)
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)))


def _banded(monkeypatch, kfn, *args, fraction=1.0, **options):
    """``kfn(*args)`` with the memory available set so that one pair's position pairs need
    several bands (the budget is half of ``fraction`` of their size); returns the kernels and
    the splits used."""
    live = max(kfn._function(mode, True)[0].live_arrays for mode in (True, False))
    whole = kfn._pair_entries() * 8 * live
    monkeypatch.setattr(tiling, "available_memory", lambda: int(whole * fraction))
    used = []
    plan = bands.Split.plan

    def spy(*a):
        split = plan(*a)
        used.append(split)
        return split

    monkeypatch.setattr(bands.Split, "plan", staticmethod(spy))
    try:
        out = kfn(*args, progress=False, **options)
    finally:
        monkeypatch.undo()
    return out, used


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_banded_kernels_equal_the_whole(monkeypatch, cross, fraction):
    """With half and a quarter of the position pairs' memory: square bands of both groups' rows,
    more of them with less memory."""
    torch.manual_seed(0)
    kfn = ntkcompile.compile(GapCNN(), W_std=1.3, b_std=0.2)
    x = torch.randn(4, 3, 30, 6, dtype=torch.float64)
    y = torch.randn(3, 3, 30, 6, dtype=torch.float64) if cross else None
    args = (x,) if y is None else (x, y)
    whole = kfn(*args, progress=False)
    banded, used = _banded(monkeypatch, kfn, *args, fraction=fraction)
    rows = kfn._program.readout.positions[0]
    firsts = {b[0]["readout"] for b in used[0].boxes}
    assert len(firsts) > 1 and {b[1]["readout"] for b in used[0].boxes} == firsts
    assert len(used[0].boxes) == len(firsts) ** 2 and len(firsts) >= (2 if fraction == 1.0 else 3)
    assert sorted(firsts)[0][0] == 0 and sorted(firsts)[-1][1] == rows
    for name in ("nngp", "ntk"):
        a, b = getattr(banded, name), getattr(whole, name)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (name, float((a - b).abs().max()))
    if not cross:
        assert torch.equal(banded.ntk, banded.ntk.T)


@pytest.mark.parametrize("cross", [False, True])
def test_banded_average_poolings_equal_the_whole(monkeypatch, cross):
    """Against itself the banded kernel runs as a cross kernel of the inputs with themselves
    (average pooling's banded same-input variances are exact at one side's rows): the oracle is
    then the cross kernel of ``x`` against itself (``tiling.evaluate(kfn, x, x, ...)``: ``kfn(x, x)``
    is ``kfn(x)``), whose entries of an input with itself are not pinned to ``c = 1``."""
    torch.manual_seed(2)
    kfn = ntkcompile.compile(Myrtle(), W_std=1.3, b_std=0.1, input_shape=(3, 48, 6))
    x = torch.randn(3, 3, 48, 6, dtype=torch.float64)
    y = torch.randn(2, 3, 48, 6, dtype=torch.float64) if cross else x
    whole = kfn._kernels(*tiling.evaluate(kfn, x, y, ("nngp", "ntk"), None, False, None, False, False))
    for fraction in (1.0, 0.4):
        banded, used = _banded(monkeypatch, kfn, *((x, y) if cross else (x,)), fraction=fraction)
        assert len(used[0].boxes) > 1 and used[0].cross
        for name in ("nngp", "ntk"):
            a, b = getattr(banded, name), getattr(whole, name)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (fraction, name, float((a - b).abs().max()))


def test_bands_bound_the_work_per_pair():
    """The split's largest band holds a fraction of the position pairs of the whole map."""
    kfn = ntkcompile.compile(GapCNN())
    kfn(torch.randn(1, 3, 64, 6, dtype=torch.float64), progress=False)
    whole = kfn._pair_entries()
    split = bands.Split.plan(kfn, 8, whole * 8 / 4)
    assert split.entries * 4 <= whole and len(split.boxes) > 4
    covered = sorted({b[0]["readout"] for b in split.boxes})
    assert covered[0][0] == 0 and covered[-1][1] == kfn._program.readout.positions[0]
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


@pytest.mark.parametrize("geom", [
    ConvGeometry.make((3, 3), 1, 1, 1, (9, 5)),
    ConvGeometry.make((3, 2), 2, (1, 0), 1, (11, 5)),
    ConvGeometry.make((3, 3), 1, 2, 2, (9, 5)),
    ConvGeometry.make((5,), 3, 2, 1, (17,)),
])
def test_banded_stencils_and_poolings_are_the_whole_ones_at_the_band_rows(geom):
    """Output rows ``[1, P-1)`` of the first position group and ``[0, 2)`` of the second, from
    the input rows of their footprints.  When input and output have one shape, both take the
    hull of the two (the box of rows of that shape), and the output rows at the box's edges
    are not exact (nothing reads them); the adjoint of seeds on the band's rows lands inside
    the box, exactly."""
    torch.manual_seed(1)
    S, P = tuple(geom.in_shape), tuple(geom.out_shape)
    a = torch.randn(2, 3, *S, *S, dtype=torch.float64)
    d = torch.randn(2, 3, *P, *P, dtype=torch.float64)
    k = len(S)
    band, rows = [], [(1, P[0] - 1), (0, 2)]
    for r in rows:
        start, end = bands._footprint(*r, geom)
        need = (max(0, start), min(S[0], end))
        band.append({S: need, P: r} if S != P else {S: (min(need[0], r[0]), max(need[1], r[1]))})
    (i1, j1), (i2, j2) = band[0][S], band[1][S]
    (o1, p1), (o2, p2) = band[0][P], band[1][P]
    in_box = (slice(None), slice(None), slice(i1, j1)) + (slice(None),) * (k - 1) + (slice(i2, j2),)
    out_rows = (slice(None), slice(None), slice(*rows[0])) + (slice(None),) * (k - 1) + (slice(*rows[1]),)
    in_band = (slice(None), slice(None), slice(rows[0][0] - o1, rows[0][1] - o1)) + (slice(None),) * (k - 1) \
        + (slice(rows[1][0] - o2, rows[1][1] - o2),)
    out_box = (slice(None), slice(None), slice(o1, p1)) + (slice(None),) * (k - 1) + (slice(o2, p2),)
    banded = bands.stencil_pair(a[in_box], geom, band)
    assert banded.shape[2] == p1 - o1 and banded.shape[2 + k] == p2 - o2
    assert torch.allclose(banded[in_band], spatial.stencil_pair(a, geom)[out_rows], rtol=0, atol=1e-14)
    seeds = torch.zeros_like(d)
    seeds[out_rows] = d[out_rows]
    whole = spatial.stencil_pair_adjoint(seeds, geom, (2, 3))
    back = bands.stencil_pair_adjoint(seeds[out_box], geom, (2, 3), band)
    assert torch.allclose(back, whole[in_box], rtol=0, atol=1e-14)
    rest = whole.clone()
    rest[in_box] = 0
    assert float(rest.abs().max()) == 0.0          # nothing lost beyond the box
    # an average pooling with the same windows (every pair of taps of the two groups)
    pooled = bands.pool_pair(a[in_box], geom, band)
    assert torch.allclose(pooled[in_band], spatial.pool_pair(a, geom)[out_rows], rtol=0, atol=1e-14)
    whole = spatial.pool_pair_adjoint(seeds, geom, (2, 3))
    back = bands.pool_pair_adjoint(seeds[out_box], geom, (2, 3), band)
    assert torch.allclose(back, whole[in_box], rtol=0, atol=1e-14)


def _refused(monkeypatch, model, x):
    kfn = ntkcompile.compile(model)
    kfn(x[:1], progress=False)
    monkeypatch.setattr(tiling, "available_memory", lambda: kfn._pair_entries() * 8)
    with pytest.raises(KernelMemoryError) as info:
        kfn(x, progress=False)
    monkeypatch.undo()
    return str(info.value)


def test_models_bands_do_not_cover_are_refused_with_the_reason(monkeypatch):
    x = torch.randn(2, 3, 16, 4, dtype=torch.float64)
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 1))
    message = _refused(monkeypatch, pooled, x)
    assert "cannot be split into bands of positions" in message and "maxpool" in message.lower(), message
    head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    message = _refused(monkeypatch, head, x)
    assert "layers after the pooling" in message


class NormalizedImages(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 1)

    def forward(self, x):
        x = x / x.flatten(1).norm(dim=1)[:, None, None, None]
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_a_non_finite_band_is_diagnosed_band_by_band(monkeypatch):
    """An all-zero image normalized before the first layer: the banded kernel is NaN, and the
    diagnosis re-runs the bands with checking code (not the whole pair, which would not fit)."""
    x = torch.randn(3, 3, 24, 4, dtype=torch.float64)
    x[1] = 0.0
    kfn = ntkcompile.compile(NormalizedImages())
    kfn(x[:1], progress=False)
    with pytest.raises(ntkcompile.NonFiniteKernelError) as e:
        _banded(monkeypatch, kfn, x)
    assert "before the first layer" in str(e.value) and "all-zero row" in str(e.value)


def test_out_arrays_work_in_bands(monkeypatch, tmp_path):
    """A memmap output, written tile by tile with each tile's pairs computed in bands."""
    import numpy as np
    torch.manual_seed(3)
    kfn = ntkcompile.compile(GapCNN(), b_std=0.1)
    x = torch.randn(5, 3, 30, 6, dtype=torch.float64)
    whole = kfn(x, progress=False)
    mm = np.lib.format.open_memmap(tmp_path / "ntk.npy", mode="w+", dtype=np.float64, shape=(5, 5))
    _, used = _banded(monkeypatch, kfn, x, get=("ntk",), out={"ntk": mm})
    assert len(used[0].boxes) > 1
    assert np.allclose(np.load(tmp_path / "ntk.npy"), whole.ntk.numpy(), rtol=1e-12, atol=1e-14)


def test_banded_sequences_equal_the_whole(monkeypatch):
    """A 1-D CNN over long sequences (positions have one axis: the bands are its ranges)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, dilation=2),
                          nn.ReLU(), nn.AvgPool1d(3, stride=1), nn.Conv1d(8, 8, 3, padding=1), nn.GELU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 1))
    kfn = ntkcompile.compile(model, W_std=1.2, b_std=0.3)
    x, y = torch.randn(3, 2, 90, dtype=torch.float64), torch.randn(2, 2, 90, dtype=torch.float64)
    whole = kfn(x, y, progress=False)
    banded, used = _banded(monkeypatch, kfn, x, y, fraction=0.3)
    assert len(used[0].boxes) > 4
    for name in ("nngp", "ntk"):
        a, b = getattr(banded, name), getattr(whole, name)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (name, float((a - b).abs().max()))


def test_the_bands_of_one_tile_are_shared_out_over_threads(monkeypatch):
    """One pair of images is one tile: its bands are computed in two parts at once (one per
    thread), which sum to the whole kernel."""
    from ntkcompile import tiling
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(5)
        kfn = ntkcompile.compile(GapCNN(), b_std=0.1)
        x, y = torch.randn(1, 3, 90, 6, dtype=torch.float64), torch.randn(1, 3, 90, 6, dtype=torch.float64)
        whole = kfn(x, y, progress=False)
        units, real = [], tiling._in_parallel
        monkeypatch.setattr(tiling, "_in_parallel", lambda c, u, w: (units.append((list(u), w)), real(c, u, w))[1])
        banded, used = _banded(monkeypatch, kfn, x, y)
    finally:
        torch.set_num_threads(before)
    assert len(used[0].boxes) > 2
    assert units[-1] == ([((0, 0), 0), ((0, 0), 1)], 2)
    for name in ("nngp", "ntk"):
        assert torch.allclose(getattr(banded, name), getattr(whole, name), rtol=1e-12, atol=1e-14)
