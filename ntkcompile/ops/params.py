"""Width-sized parameters used directly: ``h + self.offset``, ``W h + self.b_hh``, ``h * self.gain``.

A trainable ``nn.Parameter`` whose shape broadcasts along the width axis only (``(n,)``,
``(1, n)``, ``(C, 1, 1)`` for a feature map) is a vector of the width:

* **added** (``h + self.offset``, ``gh = F.linear(h, self.W) + self.b``): a bias of its
  own, ``b_std * beta`` with ``beta ~ N(0, 1)`` whatever its stored values (as a
  Linear's bias), ``b_std`` from ``std[qualified parameter name]``, else ``std[its
  module]`` (``""`` for the root module), else the default ``b_std``; shared by every
  position of the vector it is added to, and by every use (one ``ir.Bias``);
* **multiplied** (``h * self.gain``): a trainable elementwise gain, like a
  normalization's (``ops/norm.py``, ``Affine``): taken at its stored value, which must
  be one number ``c`` for all coordinates (``torch.ones``: ``c = 1``), and trained as
  stored (no NTK rescaling), so ``y = c h`` and it adds ``E[(dy h)(dy' h')]`` to the
  NTK.  A gain of varying values is refused (its limit depends on the distribution of
  its entries), and so is a gain used twice or also added.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import WidthInferenceError
from ..passes.lower import Fixed, Width, module_of
from .norm import Affine, GProbe


def trainable_shape(lw, node, w: Width, other):
    """``(qualified name, shape)`` of ``other`` when it is a trainable parameter used directly
    with ``w``, its shape padded with leading 1s to the rank of ``node``'s value (which has
    ``w``'s axes), else None."""
    if not (isinstance(other, Fixed) and other.node.op == "get_attr"):
        return None
    try:
        p = lw.gm.get_parameter(other.node.target)
    except AttributeError:
        return None
    out = tuple(lw.shape(node))
    if not p.requires_grad or p.dim() > len(out) or len(w.axes) != len(out):
        return None
    return other.node.target, (1,) * (len(out) - p.dim()) + tuple(p.shape)


def bare_parameter(lw, node, w: Width, other) -> Optional[str]:
    """The qualified name of ``other`` when it is a trainable parameter that broadcasts along
    the width axis of ``w`` only (a vector of the width), else None."""
    found = trainable_shape(lw, node, w, other)
    if found is None or any(size != (w.size if role == "w" else 1) for size, role in zip(found[1], w.axes)):
        return None
    return found[0]


def _use(lw, node, name, how):
    before = lw.uses.setdefault(name, how)
    if before != how or how == "gain" and name in lw.biases:
        raise lw.unsupported(node, f"the parameter '{name}' used both as a gain (multiplied) and otherwise")


def parameter_bias(lw, node, w: Width, name: str):
    """The bias atom of the bare parameter ``name`` added to ``w`` (None if its ``b_std`` is 0)."""
    _use(lw, node, name, "bias")
    return lw.bias_atom(name, module_of(name) if "." in name else "", w.positions, node)


def parameter_gain(lw, node, w: Width, name: str) -> Width:
    """``w * self.gain`` for a bare parameter of constant entries ``c``: ``c w`` plus the
    probe that reads the gain's NTK term off (``ops/norm.py``)."""
    _use(lw, node, name, "gain")
    if any(isinstance(p, Affine) and p.name == name for p in lw.b.params):
        raise lw.unsupported(node, f"the gain '{name}' used twice (its NTK term needs one vector it multiplies)")
    values = lw.gm.get_parameter(name).detach().flatten()
    if not bool(torch.all(values == values[0])):
        raise lw.error(node, f"'{name}' multiplies a width vector with entries that are not all equal: a "
                       "trainable gain is taken at its stored value, which must be one number for all "
                       "coordinates (e.g. torch.ones); the limit of a gain of other values depends on the "
                       "distribution of its entries", WidthInferenceError)
    if len(w.vec.pieces) != 1:
        raise lw.unsupported(node, f"the gain '{name}' multiplying a concatenation")
    bb = lw.b
    aff = bb.param(Affine, name=name, gain=True, shift=False, xhat=w.vec.pieces[0][1])
    probe = bb.single(bb.atom_var(bb.make(GProbe, aff)))
    vec = bb.lincomb([(bb.sconst(float(values[0])), w.vec), (bb.sconst(1.0), probe)])
    return lw.width(node, vec, w.size, w.positions, layout=w.layout)
