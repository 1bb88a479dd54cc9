"""Average pooling over fixed positions: inside the network and global (before the readout).

* ``nn.AvgPool1d/2d``, ``F.avg_pool1d/2d``: a fixed average over windows of
  positions, a ``GPool`` atom.  It is a linear map, Gaussian exactly when its
  argument is, and mixes *all* pairs of positions of two windows:
  ``E[y_s y'_t] = (1/|K|^2) sum_{k,l} E[x_{s+k} x'_{t+l}]``; the backward
  reads the gradient of its argument off through the adjoint average.
* Global average pooling (``nn.AdaptiveAvgPool{1,2}d(1)``, a mean over all
  positions) before the readout: the readout sees the mean over all position
  pairs, and its backward covariance is ``W_std^2 / P^2`` at every pair.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ..ir import ANY, ConvGeometry, node
from ..ir.builder import holds_probe
from ..ir.nodes import Atom
from ..kernels import spatial
from ..kernels.planner import ADJOINT, COVARIANCE, MEAN, READOUT_POOLS, SAME_INPUT, register
from ..passes.lower import Width, rule


@node
class GPool(Atom):
    """Average pooling of ``arg`` (a Vec with positions) over the windows ``geom``."""
    geom: object              # ir.ConvGeometry (kernel, stride, padding)
    arg: object
    uid: int = -1
    consumes = True
    read_off = True
    mixes_positions = True
    homogeneous = True

    @property
    def gaussian(self):      # of a normalization's probe: not for nonlinearities (ir.builder.holds_probe)
        return all(v.gaussian for _, v in self.arg.pieces) and not holds_probe(self)

    @property
    def cov_group(self):
        return ANY            # a pooling of anything: not provably independent of anything

    def children(self):
        return (self.arg,)

    @property
    def window_geometry(self):
        """The windows its outputs read (``kernels.bands``: the rows a band needs)."""
        return self.geom

    def positions(self, positions_of):
        return self.geom.out_shape

    def describe(self, show):
        kind = "G" if self.gaussian else "linear in H-vars"
        return f"avgpool{self.geom.kernel}/{self.geom.stride} ({show(self.arg)})    # {kind}"

    def backward_label(self, show):
        return f"avgpool^T d{show(self)}"

    def check(self, program):
        pos = program.positions(self.arg)
        if tuple(pos) != tuple(self.geom.in_shape):
            return [f"pools a vector with positions {pos} with windows for {self.geom.in_shape}"]
        return []


def _avg_pool(lw, node, x, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    if not isinstance(x, Width) or not x.positions:
        raise lw.unsupported(node, "average pooling of a tensor without positions")
    if ceil_mode or divisor_override is not None or (not count_include_pad and padding):
        raise lw.unsupported(node, "average pooling with ceil_mode, divisor_override or "
                             "count_include_pad=False and padding")
    try:
        geom = ConvGeometry.make(kernel_size, stride if stride else kernel_size, padding, 1, x.positions)
    except ValueError as e:
        raise lw.unsupported(node, f"this pooling ({e})") from e
    atom = lw.b.make(GPool, geom, x.vec)
    return lw.width(node, lw.b.single(lw.b.atom_var(atom)), x.size, geom.out_shape)


@rule(nn.AvgPool1d, nn.AvgPool2d)
def _avg_pool_module(lw, node, m, x):
    return _avg_pool(lw, node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                     getattr(m, "divisor_override", None))


@rule(F.avg_pool1d, F.avg_pool2d)
def _avg_pool_function(lw, node, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True, divisor_override=None):
    return _avg_pool(lw, node, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def global_pool(lw, node, x):
    """The mean over all positions of a feature map: only a readout may follow it."""
    return lw.width(node, x.vec, x.size, (), "gap", x.positions)


def _adaptive(lw, node, x, output_size):
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    if any(s not in (1, None) for s in size) or not isinstance(x, Width) or not x.positions:
        raise lw.unsupported(node, f"adaptive average pooling to {output_size} (only to size 1)")
    return global_pool(lw, node, x)


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive_module(lw, node, m, x):
    return _adaptive(lw, node, x, m.output_size)


@rule(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def _adaptive_function(lw, node, x, output_size):
    return _adaptive(lw, node, x, output_size)


# -- planning -------------------------------------------------------------------

@register(COVARIANCE, GPool)
def _pool_cov(pl, a, b, pair):
    """``E[pool(u) pool(v)']``: the average over all position pairs of two windows."""
    if not (isinstance(a, GPool) and isinstance(b, GPool) and a.geom == b.geom):
        raise NotImplementedError(
            "average pooling whose output is combined with other vectors (a residual sum or "
            "product with an unpooled branch, or two different poolings)")
    inner_pair = pair if pair not in SAME_INPUT else "f" + pair[1]
    inner = yield from pl.cov(a.arg, b.arg, inner_pair)
    if inner is None:
        return None
    if isinstance(inner, float):
        raise NotImplementedError("average pooling of a vector constant over positions")
    how = spatial.pool_same if pair in SAME_INPUT else spatial.pool_pair
    side = (int(pair[1]),) if pair != "x" else ()      # whose band, when banded (kernels.bands)
    return pl.call(how, inner, pl.static(a.geom, "geom"), *side)


@register(MEAN, GPool)
def _pool_mean(pl, a, side):
    """The pooled mean field."""
    m = yield from pl.mean(a.arg, side)
    return None if m is None else pl.call(spatial.stencil_same, m, pl.static(a.geom, "geom"))


@register(ADJOINT, GPool)
def _pool_adjoint(pl, u, w):
    """``B = pool^T dP``: two poolings covary through ``D``."""
    if u.geom != w.geom:
        raise NotImplementedError("two different average poolings of one vector")
    d = yield from pl.D(u, w)
    return None if d is None else pl.call(spatial.pool_pair_adjoint, pl.tensor(d),
                                          pl.static(u.geom, "geom"), pl.dbatch)


def _gap_cov(pl, core):
    return pl.call(spatial.global_mean, core, pl.p.readout.positions, pl.batch)


def _gap_adjoint(pl):
    r = pl.p.readout      # v / P at every position (at a band's rows only when banded: kernels.bands)
    return pl.call(spatial.mean_seeds, r.W_std ** 2 / math.prod(r.positions) ** 2, r.positions, pl.like)


register(READOUT_POOLS, "gap", (_gap_cov, _gap_adjoint))
