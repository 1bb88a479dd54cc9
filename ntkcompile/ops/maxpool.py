"""Max pooling over fixed positions: ``nn.MaxPool1d/2d``, ``F.max_pool1d/2d``,
``nn.AdaptiveMaxPool1d/2d(1)``, ``F.adaptive_max_pool*d(x, 1)`` and ``x.amax(dims)`` over
every position axis of a feature map.

``y_p = phi(max_{k in window p} g_k)`` with ``g`` a G-var with positions and ``phi`` the
nondecreasing nonlinearity (or none) between them: ``maxpool(phi(g)) = phi(maxpool(g))``,
so the usual ``maxpool(relu(conv(x)))`` is one ``GMaxPool`` atom of the convolution's
G-var.  Its kernels come from the joint Monte Carlo evaluator of ``kernels/maxpool_mc.py``
(no quadrature reaches the 2 x window-size dimensions of a pair): sampled jointly over
the inputs of a tile, so cross kernels are blocks of the kernel of both batches together
(``joint``), and reported with the replicates' standard errors.  The backward is the a.e.
derivative, the argmax selection.  Refused: a non-monotone nonlinearity before the
pooling (its max is not ``phi`` of the max), ``dilation``, ``ceil_mode``, pooling of a
non-Gaussian vector that is not ``phi(g)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KernelMemoryError, WidthInferenceError
from ..ir import ECall, ESlot, HAtom, node
from ..ir.nodes import OfArg
from ..kernels import maxpool_mc
from ..kernels.planner import ADJOINT, register, register_sampled
from ..passes.lower import Width, rule
from ..resources import available_memory
from .elementwise import OF_ATOM
from .positions import map_positions


@dataclass(frozen=True)
class MaxPoolSpec:
    """Windows (``kernel``, ``stride``, ``padding``) on ``in_shape`` and the monotone
    nonlinearity ``phi`` before them (an ``ir.Elementwise``, or None)."""
    kernel: tuple
    stride: tuple
    padding: tuple
    in_shape: tuple
    out_shape: tuple
    phi: tuple = ()           # nondecreasing ir.Elementwise, applied in this order

    def functions(self):
        """``(phi, phi')`` as torch functions of the window's max (identity for no ``phi``)."""
        def fn(t):
            for e in self.phi:
                t = e.fn(t)
            return t

        def deriv(t):
            with torch.enable_grad():
                u = t.detach().requires_grad_(True)
                return torch.autograd.grad(fn(u).sum(), u)[0]
        return fn, deriv

    def _starts(self):
        """Per output position (C order), the window's first input position per axis."""
        grids = np.meshgrid(*[np.arange(q) * s - p for q, s, p in zip(self.out_shape, self.stride, self.padding)],
                            indexing="ij")
        return [g.reshape(-1) for g in grids]

    def offsets(self, idx):
        """The index within its window (C order) of each flat input position ``idx`` ``(..., nQ)``."""
        starts = [torch.as_tensor(s, device=idx.device) for s in self._starts()]
        coords, rest = [], idx
        for n in reversed(self.in_shape):
            coords.append(rest % n)
            rest = rest // n
        coords.reverse()
        off = torch.zeros_like(idx)
        for c, s, k in zip(coords, starts, self.kernel):
            off = off * k + (c - s)
        return off

    def placement(self, like):
        """``A`` ``(nQ K, nP)``: window offset -> input position (zero rows in the padding)."""
        nQ, K, nP = math.prod(self.out_shape), math.prod(self.kernel), math.prod(self.in_shape)
        A = np.zeros((nQ, K, nP))
        starts = self._starts()
        for q in range(nQ):
            for kk, off in enumerate(np.ndindex(*self.kernel)):
                pos = [starts[d][q] + off[d] for d in range(len(off))]
                if all(0 <= p < n for p, n in zip(pos, self.in_shape)):
                    A[q, kk, np.ravel_multi_index(pos, self.in_shape)] = 1.0
        return torch.as_tensor(A.reshape(nQ * K, nP), dtype=like.dtype, device=like.device)


@node
class GMaxPool(OfArg):
    """``phi(maxpool(arg))`` of a Gaussian Vec ``arg`` with positions (``spec``)."""
    spec: object
    arg: object
    uid: int = -1
    joint = True

    @property
    def joint_rows(self) -> int:
        """Rows of one input in a joint sample (its positions)."""
        return math.prod(self.spec.in_shape)

    def joint_plan(self, inputs: int, samples: int) -> None:
        """Raise ``KernelMemoryError`` if ``inputs`` sampled together do not fit in half the
        memory available: the samples (``samples x inputs x positions``, three arrays) and the
        backward's Gram over (input, window, offset) (three arrays)."""
        rows = inputs * math.prod(self.spec.out_shape) * math.prod(self.spec.kernel)
        need = 8 * (3 * samples * inputs * self.joint_rows + 2 * samples * rows + 3 * rows * rows)
        have = (available_memory() or 2 ** 34) // 2
        if need > have:
            raise KernelMemoryError(f"max pooling's joint Monte Carlo over {inputs} inputs needs about "
                                    f"{need / 2 ** 30:.2f} GiB, more than {have / 2 ** 30:.2f} GiB")

    def positions(self, positions_of):
        return self.spec.out_shape

    def describe(self, show):
        phi = "".join(f"{e.name} o " for e in reversed(self.spec.phi))
        return (f"{phi}maxpool{self.spec.kernel}/{self.spec.stride} ({show(self.arg)})    "
                "# H-var of each window's G-vars, joint Monte Carlo")

    def backward_label(self, show):
        return f"argmax^T d{show(self)}"

    def check(self, program):
        pos = program.positions(self.arg)
        problems = [] if tuple(pos) == tuple(self.spec.in_shape) else [
            f"max-pools a vector with positions {pos} with windows for {self.spec.in_shape}"]
        if not all(v.gaussian for _, v in self.arg.pieces):
            problems.append("max-pools a vector that is not Gaussian")
        return problems


# -- lowering ----------------------------------------------------------------------

def _monotone(e) -> bool:
    """``phi`` nondecreasing, checked on a fine grid (max and phi commute)."""
    t = torch.linspace(-60.0, 60.0, 240_001, dtype=torch.float64)
    with torch.no_grad():
        v = e.fn(t)
    return bool(torch.isfinite(v).all()) and bool((v[1:] - v[:-1] >= -1e-12 * (1 + v.abs().max())).all())


def gaussian_and_phi(lw, node, x, label="max pooling", monotone=True):
    """``(g, phi)`` with ``x = phi(g)``, ``g`` a Gaussian Vec (``phi = ()``: ``x = g``) and ``phi``
    one nonlinearity (nondecreasing with ``monotone``); ``label`` names the op for errors."""
    b = lw.b
    if all(v.gaussian for _, v in x.vec.pieces):
        return x.vec, ()
    pieces = x.vec.pieces
    if len(pieces) == 1 and len(pieces[0][1].terms) == 1:
        c, a = pieces[0][1].terms[0]
        one = getattr(c, "value", None) == 1.0
        if one and isinstance(a, HAtom) and len(a.gargs) == 1 and isinstance(a.expr, ECall) \
                and isinstance(a.expr.arg, ESlot):
            if monotone and not _monotone(a.expr.fn):
                raise lw.unsupported(node, f"{label} after {a.expr.fn.name}, which is not monotone "
                                     "(the max of phi(g) is then not phi of the max)")
            return b.single(a.gargs[0]), (a.expr.fn,)
    raise lw.unsupported(node, f"{label} of a vector that is not a layer's output or one nonlinearity of one "
                         "(e.g. right after conv/linear or conv/linear -> relu)")


def max_pool(lw, node, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, label="max pooling"):
    if not isinstance(x, Width) or not x.positions or x.pool:
        raise lw.unsupported(node, f"{label} of a tensor that is not a feature map")
    if x.axes != ("n", "w") + tuple(range(len(x.positions))):
        raise lw.unsupported(node, f"{label} of a width vector laid out as {x.axes}")
    nd = len(x.positions)
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd  # noqa: E731
    kernel, stride = tup(kernel_size), tup(stride if stride not in (None, (), []) else kernel_size)
    padding, dilation = tup(padding), tup(dilation)
    if ceil_mode or any(d != 1 for d in dilation):
        raise lw.unsupported(node, f"{label} with ceil_mode or dilation")
    with torch.no_grad():
        pool = F.max_pool1d if nd == 1 else F.max_pool2d
        out_shape = tuple(pool(torch.zeros(1, 1, *x.positions), kernel, stride, padding).shape[2:])
    g, phi = gaussian_and_phi(lw, node, x)
    spec = MaxPoolSpec(kernel, stride, padding, tuple(x.positions), out_shape, phi)
    atom = lw.b.make(GMaxPool, spec, g)
    return lw.width(node, lw.b.single(lw.b.atom_var(atom)), x.size, out_shape)


@rule(nn.MaxPool1d, nn.MaxPool2d)
def _max_pool_module(lw, node, m, x):
    if getattr(m, "return_indices", False):
        raise lw.unsupported(node, "max pooling with return_indices")
    return max_pool(lw, node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@rule(F.max_pool1d, F.max_pool2d)
def _max_pool_function(lw, node, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                       return_indices=False):
    if return_indices:
        raise lw.unsupported(node, "max pooling with return_indices")
    return max_pool(lw, node, x, kernel_size, stride, padding, dilation, ceil_mode)


def global_max(lw, node, x, label):
    """The max over every position: one window covering the map, then no positions."""
    y = max_pool(lw, node, x, tuple(x.positions), 1, 0, label=label)
    return map_positions(lw, node, y, {}, "the one position of a global max", {k: False for k in range(len(y.positions))})


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
def _adaptive_module(lw, node, m, x):
    return _adaptive(lw, node, x, m.output_size, getattr(m, "return_indices", False))


@rule(F.adaptive_max_pool1d, F.adaptive_max_pool2d)
def _adaptive_function(lw, node, x, output_size, return_indices=False):
    return _adaptive(lw, node, x, output_size, return_indices)


def _adaptive(lw, node, x, output_size, return_indices):
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    if return_indices or any(s not in (1, None) for s in size) or not isinstance(x, Width):
        raise lw.unsupported(node, f"adaptive max pooling to {output_size} (only to size 1)")
    # one window covering the map: torch's (N, C, 1, 1) as it is
    return max_pool(lw, node, x, tuple(x.positions), 1, 0, label="adaptive max pooling")


@rule(torch.amax, "amax")
def _amax(lw, node, x, dim=(), keepdim=False):
    if not isinstance(x, Width):
        raise lw.unsupported(node, "amax of a value that is not a width vector")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    roles = [x.axes[d % len(x.axes)] for d in dims] if dims else list(x.axes)     # no dims: every axis
    if "w" in roles or "n" in roles:
        raise lw.error(node, "a max over the width (or batch) axis of a width vector: the largest of n "
                       "coordinates grows like sqrt(2 log n) and has no finite infinite-width limit",
                       WidthInferenceError)
    if sorted(roles) != list(range(len(x.positions))) or keepdim:
        raise lw.unsupported(node, "amax over some of the positions, or with keepdim (only over all of them)")
    return global_max(lw, node, x, "amax over positions")


def _of_maxpool(lw, node, fn, x, atom):
    """``fn`` after the pooling: ``fn(max) `` is the pooling of ``fn`` when ``fn`` is
    nondecreasing (``relu(max_pool2d(conv(x), 2))``, PyTorch's MNIST example)."""
    if not _monotone(fn):
        raise lw.unsupported(node, f"{fn.name} after max pooling: not monotone, so it is not the pooling "
                             "of its values, and the pooled vector is not Gaussian")
    spec = replace(atom.spec, phi=atom.spec.phi + (fn,))
    return lw.width(node, lw.b.single(lw.b.atom_var(lw.b.make(GMaxPool, spec, atom.arg))), x.size, x.positions)


OF_ATOM[GMaxPool] = _of_maxpool


# -- planning ---------------------------------------------------------------------

_forward = register_sampled(
    GMaxPool,
    lambda pl, a, k_in, stream: pl.call(
        maxpool_mc.forward, k_in, pl.static(a.spec, "maxpool"), pl.pairs, pl.mc, pl.joint_samples, pl.errors,
        stream, note=(f"E[y y'] of {pl.label(a)}", f"joint Monte Carlo over the tile ({pl.joint_samples} "
                      "coordinates per replicate)")),
    "two different max poolings combined (a residual sum of poolings, or a pooling combined with another vector)")


@register(ADJOINT, GMaxPool)
def _maxpool_adjoint(pl, u, w):
    if u is not w:
        return None
    if pl.steps:
        raise NotImplementedError("a readout at every position after max pooling")
    d = yield from pl.D(u, u)
    if d is None:
        return None
    sim = yield from _forward(pl, u)
    return pl.call(maxpool_mc.backward, sim, pl.tensor(d), pl.pairs, pl.static(u.spec, "maxpool"),
                   note=(f"backward of {pl.label(u)}", "argmax selection over the forward's samples"))
