"""Kernels of batch-coupled models (BatchNorm in training mode, ``h - h.mean(0)``).

The batch is one unit: ``kfn(x)`` is the kernel of the batch ``x``, ``kfn(x1, x2)`` the cross
kernel of two batches each normalized by its own statistics.  The model is lowered per
call's batch sizes with the batch as a fixed axis (``passes.lower.Lowering(..., batch=)``,
``ops/batchnorm.py``): one input holding both batches side by side, whose kernel over pairs
of positions (examples) is computed in one piece and cut to the block asked for.  Nothing
may split a batch: tiles, ``out=`` arrays and ``torch.distributed`` are refused.
"""
from __future__ import annotations

import torch

from . import tiling
from .errors import KernelMemoryError


def evaluate(kfn, x1, x2, get, tile_size, out, resume, distributed):
    """``kfn(x1, x2)`` of a batch-coupled model (``x1`` one batch, ``x2`` another, each normalized
    by its own statistics) as ``tiling.evaluate`` returns it: the kernels, their Monte Carlo
    standard errors and the worst error estimate of each kind."""
    if tile_size is not None or out is not None or resume or distributed:
        raise ValueError(
            f"{kfn.model_name} couples the examples of a batch (BatchNorm in training mode, or batch "
            "statistics such as h - h.mean(0)): kfn(x) is the kernel of the batch x as one unit, "
            "kfn(x1, x2) the cross kernel of two batches each normalized by its own statistics. "
            "tile_size, batch_size, out=, resume= and distributed= would split a batch; call it on "
            "whole batches instead")
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    sizes = (n1,) if x2 is None else (n1, n2)
    if min(sizes) < 2 and any(getattr(n, "batch_statistics", False) for n in kfn._program.nodes):
        raise ValueError(f"BatchNorm in training mode needs batches of at least 2 examples (got {list(sizes)}): "
                         "the variance of one example is 0")
    kfn._use_sizes(sizes)
    want_ntk = "ntk" in get
    fn = kfn._function(True, want_ntk)[0]
    try:
        tiling._fit_memory(kfn, 1, fn.live_arrays, False, bandable=False)
    except KernelMemoryError as e:
        raise KernelMemoryError(
            f"a batch-coupled kernel of {' + '.join(map(str, sizes))} examples is one unit, whose work grows "
            f"like (examples)^4 (every pair of output examples times every pair of examples): {e}. Use "
            "smaller batches") from e
    x = (x1 if x2 is None else torch.cat([x1, x2])).unsqueeze(0)
    with torch.no_grad():
        values, stderr, errors = tiling._replicates(fn, (x,), kfn)
    block = (lambda k: k[0, 0]) if x2 is None else (lambda k: k[0, 0, :n1, n1:])  # noqa: E731
    outputs, se = {}, {}
    for name in get:
        k = block(values[name])
        if x2 is None:
            k = 0.5 * (k + k.T)       # a Gram over the same samples: symmetric up to rounding
        if not bool(torch.isfinite(k).all()):
            raise tiling._non_finite(kfn, name, True, want_ntk, (x,), 0, x1, x2)
        outputs[name] = k.to(kfn.dtype)
        if name in stderr:
            se[name] = block(stderr[name])
    return outputs, se, tiling.worst_errors(errors)
