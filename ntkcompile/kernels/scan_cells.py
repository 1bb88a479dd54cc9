"""The recurrent cells of ``scan_mc``: one rule per cell (its gates in PyTorch's order,
its step and the step's backward), exactly as ``torch.nn`` computes them.

``a`` and ``g`` are (gates, S, B): input- and hidden-side pre-activations (biases
included); states are (S, B).  The backward of a step takes the gradient of its
state(s) and returns those of the gates' pre-activations (see ``_Rule``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["CELL_KINDS"]

@dataclass(frozen=True)
class _Rule:
    """``step(a, g, h_prev, c_prev) -> (h, c, saved)``;
    ``back(saved, h_prev, c_prev, dh, dc) -> (dpre_in, hid, dh_direct, dc_prev)``: the
    gradients of the gates' input-side pre-activations (gates, S, B), that of gate
    ``gated``'s hidden part where it differs (else ``None``), the part of ``dh_{t-1}``
    that is not ``W_hh^T (...)``, and ``dc_{t-1}``."""

    gates: tuple[str, ...]
    saved: int                      # (S, B) arrays kept per step for the backward
    step: Callable
    back: Callable
    gated: Optional[int] = None     # the gate whose hidden part is multiplied (GRU's n)


def _rnn_step(phi, dphi):
    def step(a, g, h_prev, c_prev):
        pre = a[0] + g[0]
        h = phi(pre)
        return h, None, (dphi(pre, h),)

    def back(saved, h_prev, c_prev, dh, dc):
        return (dh * saved[0]).unsqueeze(0), None, None, None

    return step, back


def _gru_step(a, g, h_prev, c_prev):
    r = torch.sigmoid(a[0] + g[0])
    z = torch.sigmoid(a[1] + g[1])
    n = torch.tanh(a[2] + r * g[2])
    return torch.lerp(n, h_prev, z), None, (r, z, n, g[2].clone())   # (1 - z) n + z h_prev


def _gru_back(saved, h_prev, c_prev, dh, dc):
    r, z, n, gn = saved
    dpn = dh * (1 - z) * (1 - n * n)
    dpz = dh * (h_prev - n) * z * (1 - z)
    dpr = dpn * gn * r * (1 - r)
    return torch.stack((dpr, dpz, dpn)), r * dpn, dh * z, None


def _lstm_step(a, g, h_prev, c_prev):
    i, f, o = (torch.sigmoid(a[k] + g[k]) for k in (0, 1, 3))
    gg = torch.tanh(a[2] + g[2])
    c = f * c_prev + i * gg
    tc = torch.tanh(c)
    return o * tc, c, (i, f, gg, o, tc)


def _lstm_back(saved, h_prev, c_prev, dh, dc):
    i, f, gg, o, tc = saved
    dc = dh * o * (1 - tc * tc) if dc is None else dc + dh * o * (1 - tc * tc)
    d = torch.stack((dc * gg * i * (1 - i), dc * c_prev * f * (1 - f),
                     dc * i * (1 - gg * gg), dh * tc * o * (1 - o)))
    return d, None, None, dc * f


_RULES: dict[str, _Rule] = {}


def _register(kind: str, rule: _Rule) -> None:
    if kind in _RULES:
        raise ValueError(f"cell kind {kind!r} is already registered")
    _RULES[kind] = rule


_register("rnn_tanh", _Rule(("h",), 1, *_rnn_step(torch.tanh, lambda pre, h: 1 - h * h)))
_register("rnn_relu", _Rule(("h",), 1, *_rnn_step(torch.relu, lambda pre, h: (pre > 0).to(pre.dtype))))
_register("gru", _Rule(("r", "z", "n"), 4, _gru_step, _gru_back, gated=2))
_register("lstm", _Rule(("i", "f", "g", "o"), 5 + 1, _lstm_step, _lstm_back))   # + the cell state c

CELL_KINDS = tuple(_RULES)
