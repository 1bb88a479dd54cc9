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
