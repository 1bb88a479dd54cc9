"""Shims over torch versions (torch >= 2.2 is supported)."""
from __future__ import annotations

import torch


def compiling() -> bool:
    """True while torch.compile traces (torch >= 2.3: torch.compiler; 2.2: torch._dynamo).

    Runtime helpers take branch-free paths then: a data-dependent branch breaks the graph.
    """
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:
        from torch import _dynamo
        fn = _dynamo.is_compiling
    return bool(fn())


def eager(fn):
    """``fn`` run as plain Python inside torch.compile'd code (a graph break there): for the
    runtime helpers whose estimator needs data-dependent steps (the N-D quasi-Monte Carlo's
    rank test, its C pass), which a traced graph would replace by another estimator."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:
        from torch import _dynamo
        disable = _dynamo.disable
    return disable(fn)
