"""Tiles of one kernel spread over processes with torch.distributed (gloo on CPU): two
processes against the single-process result, in memory and into shared memmap files."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ntkcompile


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _inputs():
    return torch.randn(37, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _worker(rank, world, store, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        kfn = ntkcompile.compile(_model(), W_std=1.3, b_std=0.2)
        x = _inputs()
        k = kfn(x, tile_size=8, distributed=True)                 # 15 tiles, every second one here
        cross = kfn(x[:20], x[20:], tile_size=8, distributed=True)
        out = {name: np.lib.format.open_memmap(os.path.join(folder, f"{name}.npy"), mode="r+")
               for name in ("nngp", "ntk")}
        kfn(x, tile_size=8, out=out, distributed=True)
        torch.save({"nngp": k.nngp, "ntk": k.ntk, "cross": cross.ntk}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_processes_compute_the_single_process_kernel(tmp_path):
    for name in ("nngp", "ntk"):
        np.lib.format.open_memmap(str(tmp_path / f"{name}.npy"), mode="w+", dtype=np.float64, shape=(37, 37))
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    kfn = ntkcompile.compile(_model(), W_std=1.3, b_std=0.2)
    x = _inputs()
    want, cross = kfn(x, tile_size=8), kfn(x[:20], x[20:], tile_size=8)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["nngp"], want.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["ntk"], want.ntk, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["cross"], cross.ntk, rtol=1e-12, atol=1e-12)
    for name in ("nngp", "ntk"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), getattr(want, name).numpy(), rtol=1e-12,
                                   atol=1e-12)


def test_distributed_needs_a_process_group():
    kfn = ntkcompile.compile(_model())
    with pytest.raises(RuntimeError, match="init_process_group"):
        kfn(_inputs(), distributed=True)
