"""Kernels written tile by tile into disk-backed arrays resume after an interruption
(``out=`` numpy memmaps, ``resume=True``; ``tiling._Journal``).  Oracle: the kernel
computed in one uninterrupted call, bit for bit."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import tiling


def _model():
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _memmaps(tmp_path, n, tag=""):
    return {name: np.lib.format.open_memmap(str(tmp_path / f"{name}{tag}.npy"), mode="w+", dtype=np.float64,
                                             shape=(n, n)) for name in ("nngp", "ntk")}


def test_an_interrupted_kernel_resumes_to_the_same_result(tmp_path, monkeypatch):
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kfn = ntkcompile.compile(_model(), W_std=1.3, b_std=0.2)
    want = kfn(x, tile_size=8)
    out = _memmaps(tmp_path, 40)
    real, calls = tiling._write, []

    def killed(arr, rows, cols, block):     # the process dies while writing the 4th or 5th tile
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt
        real(arr, rows, cols, block)

    monkeypatch.setattr(tiling, "_write", killed)
    monkeypatch.setattr(tiling._Journal, "EVERY", 0.0)       # record every tile
    with pytest.raises(KeyboardInterrupt):
        kfn(x, out=out, tile_size=8)
    journal = json.loads((tmp_path / "nngp.npy.tiles.json").read_text())
    done = {tuple(t) for t in journal["done"]}
    tiles = {(i, j) for i in range(0, 40, 8) for j in range(i, 40, 8)}
    # tiles finish in any order (one per core at a time): 3 or 4 of the 15 were written whole
    assert journal["layout"]["tile"] == 8 and done < tiles and len(done) in (3, 4)
    computed = []
    monkeypatch.setattr(tiling, "_write", lambda *a: (computed.append(1), real(*a)))
    got = kfn(x, out=out, resume=True)                   # the journal's tile side, the rest of the tiles
    rest = tiles - done
    assert len(computed) == sum(2 if i == j else 4 for i, j in rest)   # a tile off the diagonal: and its transpose
    for name in ("nngp", "ntk"):
        assert np.array_equal(np.asarray(out[name]), getattr(want, name).numpy())
        assert np.array_equal(np.asarray(getattr(got, name)), getattr(want, name).numpy())
    assert len(json.loads((tmp_path / "nngp.npy.tiles.json").read_text())["done"]) == 15


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kfn = ntkcompile.compile(_model())
    out = _memmaps(tmp_path, 12)
    kfn(x, out=out, tile_size=4)
    with pytest.raises(ValueError, match="another computation"):
        kfn(x, out=out, tile_size=6, resume=True)
    with pytest.raises(ValueError, match="memmaps"):
        kfn(x, out={"nngp": torch.empty(12, 12), "ntk": torch.empty(12, 12)}, resume=True)
    with pytest.raises(ValueError, match="out="):
        kfn(x, resume=True)
