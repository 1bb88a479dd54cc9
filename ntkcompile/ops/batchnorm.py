"""BatchNorm in training mode and hand-written batch means: ops that couple a batch.

BatchNorm in training mode normalizes every coordinate by statistics over the batch:
``xhat_i = (u_i - mean_j u_j) / sqrt(var_j u_j + eps)``, ``i, j`` examples of one batch.
In the infinite-width limit (TP II App. E.4; NTK4A's Batchnorm notebook) the coordinates
of the batch's G-vars ``(g_1, ..., g_B)`` are jointly Gaussian, and ``xhat`` is a
coordinatewise nonlinearity of all ``B`` of them: an H-var of ``B`` G-vars.  So the batch
is one unit.  A batch-coupled model is lowered with the batch as a fixed axis
(``Lowering(..., batch=sizes)``): one call's inputs are one input whose positions are the
examples of its batches (``kfn(x1, x2)``: ``x1`` and ``x2`` side by side, each normalized by
its own statistics), the readout is read at every position, and the kernels are the
position pairs of that input, ``(B1 + B2) x (B1 + B2)``, of which a call returns its block.

* ``GBatchNorm`` is ``post(gamma xhat + beta)`` of ``u = pre(g)``, ``g`` a Gaussian vector
  over the positions, ``pre``/``post`` elementwise nonlinearities before and after
  (``relu(bn(linear(x)))``, or ``bn(relu(linear(x)))``), ``gamma = 1``, ``beta = 0`` at
  PyTorch's initialization.  Its kernels come from a joint Monte Carlo over the positions
  (``kernels/batchnorm_mc.py``), with the replicates' standard errors.
* Backward: ``y_p`` depends on every ``g_k`` of its batch through
  ``J_pk = post'(xhat_p) (delta_pk - 1/B - xhat_p xhat_k / B) / s pre'(g_k)``, so the
  gradient covariance into ``g`` is ``E[J^T D J]`` for every pair of output examples (the
  readout's seeds), ``D`` the covariance at ``y``: NTK4A's ``Delta`` propagation.  A bias
  before the normalization gets no gradient (``sum_k J_pk = 0``).
* The affine parameters, per channel and shared by the batch: ``beta`` adds
  ``sum_{p,q} D_pq E[post'_p post'_q]`` to the NTK, ``gamma`` the same with ``post' xhat``.
* ``h - h.mean(0)`` (or ``keepdim=True``) is a fixed linear map of the positions, the mean
  over each batch: exact, and Gaussian (``GPosMap``).  Statistics of the input itself
  (``x - x.mean(0)`` before the first layer) are computed per batch by ``BatchPrep``.

BatchNorm2d normalizes each channel over the examples and the positions of a feature map:
the map's positions follow the examples' (``(B, H, W)``; convolutions act with kernel 1 along
the examples, ``ops/conv.py``), and the batch's G-vars are those of every example and position.

Refused, each with its own message: nonlinearities with jumps around it, a normalized
vector combined with another vector before a nonlinearity, more than one nonlinearity
before it, batches of one example; and, in a batch-coupled model, every op whose rule is
not marked ``batch_safe`` (``passes.lower.BATCH_SAFE``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..ir import Param, node
from ..ir.nodes import OfArg
from ..kernels import batchnorm_mc
from ..kernels.planner import ADJOINT, NTK_TERMS, register, register_sampled
from ..passes.lower import Width
from .elementwise import OF_ATOM
from .maxpool import gaussian_and_phi
from .positions import map_positions


@dataclass(frozen=True)
class BatchNormSpec:
    """One BatchNorm's batches (``sizes``, side by side on the position axis), ``eps`` and the
    elementwise nonlinearities ``pre`` (before it) and ``post`` (after it), in order."""
    sizes: tuple
    eps: float
    pre: tuple = ()
    post: tuple = ()
    example_shape: tuple = ()    # the positions of each example (a feature map's (H, W))

    def chain(self, which):
        """``(f, f')`` of the ``pre`` or ``post`` chain as torch functions."""
        fns = getattr(self, which)

        def fn(t):
            for e in fns:
                t = e.fn(t)
            return t

        def deriv(t):
            if not fns:
                return torch.ones_like(t)
            with torch.enable_grad():
                u = t.detach().requires_grad_(True)
                return torch.autograd.grad(fn(u).sum(), u)[0]
        return fn, deriv


@dataclass(frozen=True, eq=False)
class BatchAffine(Param):
    """The per-channel gain and/or shift of a training-mode BatchNorm (PyTorch's init 1 and
    0, trained as stored, like ``ops.norm.Affine``)."""
    gain: bool
    shift: bool

    def describe(self) -> str:
        kinds = "+".join(k for k, on in (("gain", self.gain), ("shift", self.shift)) if on)
        return f"batchnorm affine {kinds} (PyTorch init, unscaled)"


@node
class GBatchNorm(OfArg):
    """``post(BatchNorm(pre(arg)))`` over the batches on the positions of ``arg`` (``spec``)."""
    spec: Any
    arg: Any
    param: Any = None          # a BatchAffine, or None
    uid: int = -1
    batch_statistics = True      # needs batches of 2 or more examples (CompiledKernel)

    def positions(self, positions_of):
        return positions_of(self.arg)

    def describe(self, show):
        post = "".join(f"{e.name} o " for e in reversed(self.spec.post))
        pre = "".join(f"{e.name} o " for e in reversed(self.spec.pre))
        affine = "" if self.param is None else f"{self.param.name} affine o "
        return (f"{post}{affine}batchnorm{list(self.spec.sizes)} o {pre}({show(self.arg)})    "
                "# H-var of the batch's G-vars, joint Monte Carlo")

    def backward_label(self, show):
        return f"J^T d{show(self)}"

    def check(self, program):
        problems = []
        pos = tuple(program.positions(self.arg))
        if pos != (sum(self.spec.sizes),) + tuple(self.spec.example_shape):
            problems.append(f"normalizes a vector with positions {pos} over batches {self.spec.sizes}")
        if not all(v.gaussian for _, v in self.arg.pieces):
            problems.append("normalizes a vector that is not Gaussian")
        return problems


# -- lowering ----------------------------------------------------------------------

def _no_jumps(lw, node, fns, where):
    for e in fns:
        if getattr(e, "jumps", False):
            raise lw.error(node, f"{e.name} {where} a training-mode BatchNorm is not compiled: it jumps, and the "
                           "backward through the batch statistics would need its jump terms")


def batch_norm_train(lw, node, x, name, eps, weight, bias):
    """``BatchNorm(x)`` with batch statistics (shared by the module, ``F.batch_norm`` and ATen's)."""
    if lw.batch is None:
        raise lw.batch_coupled(node, "BatchNorm in training mode")
    if not isinstance(x, Width) or x.axes != (0, "w") + tuple(range(1, len(x.positions))):
        raise lw.error(node, "BatchNorm in training mode of a tensor whose channels are not its second axis "
                       "(only (N, C) vectors and (N, C, *positions) feature maps are normalized per channel)")
    for p, init in ((weight, 1.0), (bias, 0.0)):
        if p is not None and not torch.all(p.detach() == init):
            raise lw.error(node, f"the affine parameters of '{name}' are not at PyTorch's initialization "
                           "(gain 1, shift 0); the kernel at initialization assumes them")
    g, pre = gaussian_and_phi(lw, node, x, "a training-mode BatchNorm", monotone=False)
    _no_jumps(lw, node, pre, "before")
    b = lw.b
    param = None
    if weight is not None or bias is not None:
        param = b.param(BatchAffine, name=name, gain=weight is not None, shift=bias is not None)
    atom = b.make(GBatchNorm, BatchNormSpec(lw.batch, float(eps), tuple(pre), (), tuple(x.positions[1:])), g, param)
    return lw.width(node, b.single(b.atom_var(atom)), x.size, x.positions, layout=x.layout)


def _of_batchnorm(lw, node, fn, x, atom):
    """A nonlinearity after the normalization joins its ``post`` chain."""
    _no_jumps(lw, node, (fn,), "after")
    spec = replace(atom.spec, post=atom.spec.post + (fn,))
    out = lw.b.make(GBatchNorm, spec, atom.arg, atom.param)
    return lw.width(node, lw.b.single(lw.b.atom_var(out)), x.size, x.positions, layout=x.layout)


OF_ATOM[GBatchNorm] = _of_batchnorm


def batch_mean(lw, node, x, keepdim):
    """``h.mean(0)`` of a batch-coupled model: each example gets its own batch's mean (a fixed
    map of the positions), broadcast back over the batch whether or not ``keepdim``."""
    sizes = lw.batch
    if x.axes != (0, "w"):
        raise lw.error(node, "a mean over the batch axis of a feature map or a sequence is not compiled")
    users = list(node.users)
    if not users or not all(u.op in ("call_function", "call_method") and
                            getattr(u.target, "__name__", u.target) in ("sub", "add", "rsub") for u in users):
        raise lw.error(node, "a batch mean used other than subtracted from (or added to) the batch, "
                       "h - h.mean(0), is not compiled (a batch variance or standard deviation written by hand "
                       "included): normalize with nn.BatchNorm1d or F.batch_norm(h, None, None, training=True)")
    M = np.zeros((sum(sizes), sum(sizes)))
    start = 0
    for s in sizes:
        M[start:start + s, start:start + s] = 1.0 / s
        start += s
    return map_positions(lw, node, x, {0: M}, "mean over the batch", {0: True})


# -- planning ---------------------------------------------------------------------

_forward = register_sampled(
    GBatchNorm,
    lambda pl, a, k_in, stream: pl.call(
        batchnorm_mc.forward, k_in, pl.static(a.spec, "batchnorm"), pl.mc, pl.joint_samples, pl.errors, stream,
        note=(f"E[y y'] of {pl.label(a)}", f"joint Monte Carlo over the batch ({pl.joint_samples} coordinates "
              "per replicate)")),
    "two different training-mode BatchNorms combined (a residual sum), or one combined with another vector")


@register(ADJOINT, GBatchNorm)
def _batchnorm_adjoint(pl, u, w):
    if u is not w:
        return None
    d = yield from pl.D(u, u)
    if d is None:
        return None
    sim = yield from _forward(pl, u)
    return pl.call(batchnorm_mc.backward, sim, pl.tensor(d), pl.static(u.spec, "batchnorm"), len(pl.plan.seeds),
                   note=(f"backward of {pl.label(u)}", "E[J^T D J] over the forward's samples"))


@register(NTK_TERMS, BatchAffine)
def _batch_affine_ntk(pl, param, atoms):
    """``sum_{p,q} D_pq E[a_p a_q]`` with ``a = post'`` (shift) or ``post' xhat`` (gain)."""
    terms = []
    for u in atoms:
        d = yield from pl.D(u, u)
        if d is None:
            continue
        sim = yield from _forward(pl, u)
        for kind, on in (("gain", param.gain), ("shift", param.shift)):
            if on:
                terms.append(pl.call(batchnorm_mc.affine, sim, pl.tensor(d), kind,
                                     note=(f"{kind} of {param.name}", "over the forward's samples")))
    return terms

