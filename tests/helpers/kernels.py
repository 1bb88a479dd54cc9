"""Two models' kernels compared entry by entry: the oracle of the tests that check an op
against another way of writing the same model (tests/ops)."""
import torch

import ntkcompile


def kernels(model, x, W_std=1.3, b_std=0.4, **kw):
    """``(nngp, ntk)`` of ``model`` on ``x`` against itself."""
    k = ntkcompile.compile(model, W_std=W_std, b_std=b_std, **kw)(x)
    return k.nngp, k.ntk


def close(a, b, tol=1e-12):
    """Every kernel of ``a`` equals ``b``'s within ``tol``, absolute and relative."""
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=tol, atol=tol), (u - v).abs().max()
