"""Learned positional embeddings: a trainable parameter of one width vector per position.

``h = self.emb(x) + self.pos`` with ``self.pos`` of shape ``(T, n)`` (or ``(1, T, n)``) added
to a sequence ``(N, T, n)``: in the limit the rows are independent bias vectors, one per
position, ``b_std * beta_s`` with ``beta_s ~ N(0, I)`` whatever the stored values (as a
Linear's bias; ``b_std`` from ``std[parameter name]``, else ``std[its module]``, else the
default).  So ``E[P_s P'_t] = b_std^2 [s = t]`` for any two inputs, and the NTK term is
``b_std^2 sum_s D_ss`` (each position's vector is its own parameter; a bias shared by all
positions sums over every pair instead).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Param, node
from ..ir.nodes import Atom
from ..kernels import spatial
from ..kernels.planner import COVARIANCE, NTK_TERMS, SAME_INPUT, register
from ..passes.lower import Width, module_of
from .params import trainable_shape


@dataclass(frozen=True, eq=False)
class PosEmbedding(Param):
    """One trainable width vector per position, ``b_std`` each (the positions' shape)."""
    b_std: float
    positions: tuple

    def describe(self) -> str:
        return f"positional embedding  b_std={self.b_std:g}, positions={self.positions}"


@node
class GPosEmb(Atom):
    """The positional embedding ``param`` at every position: Gaussian, independent across positions."""
    param: object
    uid: int = -1
    gaussian = True
    read_off = True

    def positions(self, positions_of):
        return self.param.positions

    def describe(self, show):
        return f"P[{self.param.name}]    # G (a vector per position)"


def positional_parameter(lw, node, w: Width, other):
    """The qualified name of ``other`` when it is a trainable parameter with a width vector per
    position of ``w`` (shape ``(*P, n)`` in ``w``'s layout without the batch axis), else None."""
    found = trainable_shape(lw, node, w, other) if w.positions else None
    want = [1 if r == "n" else w.size if r == "w" else w.positions[r] for r in w.axes]
    return found[0] if found is not None and list(found[1]) == want else None


def add_positional(lw, node, w: Width, name: str, cw: float, cp: float) -> Width:
    """``cw * w + cp * self.pos`` for the positional embedding ``name``."""
    _, b_std = lw.std_for(name, module_of(name) if "." in name else "")
    bb = lw.b
    if b_std == 0.0:
        return lw.width(node, bb.lincomb([(bb.sconst(cw), w.vec)]), w.size, w.positions)
    param = next((p for p in bb.params if isinstance(p, PosEmbedding) and p.name == name), None)
    if param is None:
        param = bb.param(PosEmbedding, name=name, b_std=b_std, positions=tuple(w.positions))
    elif param.positions != tuple(w.positions):
        raise lw.unsupported(node, f"the positional embedding '{name}' added to sequences of different lengths")
    atom = bb.single(bb.atom_var(bb.make(GPosEmb, param)))
    vec = bb.lincomb([(bb.sconst(cw), w.vec), (bb.sconst(cp), atom)])
    return lw.width(node, vec, w.size, w.positions)


@register(COVARIANCE, GPosEmb)
def _posemb_cov(pl, a, b, pair):
    if not (isinstance(a, GPosEmb) and isinstance(b, GPosEmb)):      # other parameters are independent
        raise NotImplementedError(f"the covariance of a positional embedding and a {type(b).__name__}")
    b2 = a.param.b_std ** 2
    if pair in SAME_INPUT or (pair == "x" and pl.diag):
        return b2                        # the same position: b_std^2 at every one
    return pl.call(spatial.eye_pairs, b2, a.param.positions, pl.like)


@register(NTK_TERMS, PosEmbedding)
def _posemb_ntk(pl, param, atoms):
    terms = []
    for u in atoms:
        d = yield from pl.D(u, u)
        if d is not None:
            terms.append(pl.plan.mul(param.b_std ** 2, pl.call(spatial.same_position_sum, pl.tensor(d), pl.dbatch,
                                                                param.positions, pl.diag)))
    return terms
