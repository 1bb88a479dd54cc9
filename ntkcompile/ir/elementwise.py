"""The record of one elementwise nonlinearity: the function and its Gaussian moments.

A one-argument H-var ``phi(g)`` (TP II Sec. 3) needs, for the forward pass, the
V-transform ``E phi(z1) phi(z2)`` of the 2x2 covariance ``[[k11, k12], [k12, k22]]``
and, for the backward pass (Sec. 4), ``E phi'(z1) phi'(z2)``; a LayerNorm or a
residual cross term may also need the first moments ``E phi(z)``, ``E phi'(z)``.
A missing moment (``None``) means "evaluate by quadrature", which is accurate
for ``smooth`` functions, and for piecewise smooth ones whose ``breaks`` are known
(the quadrature is then split there).  The entries themselves, with the torch names
each one is found under, are in ``ntkcompile/ops/activations.py``.

Conventions every closed form follows: inputs are broadcastable float64
tensors; ``c = k12 / sqrt(k11 k22)`` is clamped into ``[-1, 1]`` and taken as 0
where ``k11 k22 = 0``; a variance of exactly 0 means ``z = 0`` exactly (for a
kinked function the value there is torch's own ``phi(0)``).

Jumps.  For ``phi`` with jumps of sizes ``s_t = phi(t+) - phi(t-)``, Stein's lemma
(``E[g phi(h)] = Cov(g, h) E[phi'(h)]``, Gaussian integration by parts) needs the
*distributional* derivative ``phi' = phi'_ae + sum_t s_t delta(x - t)``:
``E[phi'(z)] = E[phi'_ae(z)] + sum_t s_t p_z(t)`` with ``p_z`` the density of ``z``.
The moments stored here (``dmean``, ``dvt``) and ``prime()`` are those of the
almost-everywhere derivative ``phi'_ae``; the planner adds the delta terms where it
applies Stein's lemma (``kernels.nonlinear``).  That split is also what the
backward pass needs (``prime``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import Tensor

Moment2 = Callable[[Tensor, Tensor, Tensor], Tensor]
Moment1 = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Elementwise:
    """One elementwise nonlinearity ``phi`` and its Gaussian moments.

    Attributes:
        name: unique, human readable, includes parameters (``"leaky_relu(0.1)"``).
        fn: ``phi`` as an elementwise, broadcasting torch function.
        vt: ``(k11, k12, k22) -> E[phi(z1) phi(z2)]`` (the V-transform), or None.
        dvt: ``(k11, k12, k22) -> E[phi'(z1) phi'(z2)]``, or None.
        mean: ``k -> E[phi(z)]``, ``z ~ N(0, k)``, or None.
        dmean: ``k -> E[phi'(z)]`` (for ``phi`` with jumps, of the a.e. derivative), or None.
        deriv: ``phi'`` (a.e.) as a torch function; None means autograd of ``fn``.
        smooth: False for kinks and jumps, where quadrature converges slowly.
        jumps: True if ``phi`` itself jumps (step, sign): Stein's lemma with the
            almost-everywhere derivative is then wrong.  With ``breaks`` known the
            planner adds the jumps' delta terms; without, expectations that would
            use Stein's lemma go to the joint evaluator (approximate).
        breaks: every point where ``phi`` is not smooth (its jumps and kinks),
            sorted, or None if unknown.  Quadrature is split there (exact on each
            smooth piece), and the jump sizes are measured from ``fn`` on both
            sides of each break.
        vt_angle: ``(k11, k12, k22, theta) -> E[phi(z1) phi(z2)]`` given
            ``theta = arccos(c)``, for the arc-cosine family; the planner computes
            ``theta`` once per pair of inputs and shares it between ``phi`` and
            ``phi'`` (relu and step), or None.
        dvt_angle: ``dvt`` in the same form, or None.
        piecewise: ``phi`` as a ``kernels.piecewise.Piecewise`` when it is a piecewise
            polynomial (relu, step, hardtanh, clamp, ...): expressions of one Gaussian
            built from such functions then have exact moments (``kernels.piecewise_expr``).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    vt: Optional[Moment2] = None
    dvt: Optional[Moment2] = None
    mean: Optional[Moment1] = None
    dmean: Optional[Moment1] = None
    deriv: Optional[Callable[[Tensor], Tensor]] = None
    smooth: bool = True
    jumps: bool = False
    breaks: Optional[Tuple[float, ...]] = None
    vt_angle: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None
    dvt_angle: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None
    piecewise: Optional[object] = None

    def derivative(self, x: Tensor) -> Tensor:
        """``phi'(x)`` for a tensor of any shape; the result carries no graph."""
        import torch

        if self.deriv is not None:
            return self.deriv(x.detach())
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            y = self.fn(xg)
            if not y.requires_grad:  # piecewise constant (comparisons): phi' = 0 a.e.
                return torch.zeros_like(x)
            (grad,) = torch.autograd.grad(y, xg, torch.ones_like(y), allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad.detach()

    def prime(self) -> "Elementwise":
        """``phi'`` as an entry of its own, whose closed forms are ``phi``'s ``dvt``/``dmean``.

        The a.e. derivative of a kinked function jumps where ``phi`` has a kink; it
        can only jump at ``phi``'s breaks, so it shares them.

        Why the backward pass uses the a.e. derivative, with no delta terms (TP II
        Sec. 4): through ``y = phi(g)`` the backward vector is ``dg = phi'(g) * dy``
        with the derivative that backpropagation applies to each coordinate of the
        finite network.  The coordinates of ``g`` have a density, so almost surely
        none sits at a jump and ``phi'(g_a) = phi'_ae(g_a)``: the network is
        differentiable in its parameters with probability 1 and its gradient (hence
        its NTK, a sum of products of gradients) uses ``phi'_ae`` only.  So
        ``D^g = D^y E[phi'_ae(z1) phi'_ae(z2)]`` (``dvt``), and a multiplier's first
        moment is ``E[phi'_ae(z)]`` (``dmean``).  Delta terms come only from Gaussian
        integration by parts of a *forward* quantity, ``E[z1 phi(z2)] = Cov E[phi'(z2)]``,
        where ``phi'`` means the distributional derivative of the function being
        integrated; for an atom ``phi'_ae(h)`` (e.g. ``E[g relu'(h)]``, with
        ``relu' = step``) that function is ``phi'_ae`` itself, whose jumps sit at
        ``phi``'s kinks: the planner measures them from this entry's ``fn``.
        """
        d = _PRIMES.get(self)       # keyed by the entry itself: names may be reused by user entries
        if d is None:
            d = Elementwise(name=self.name + "'", fn=self.derivative, vt=self.dvt, mean=self.dmean,
                            smooth=self.smooth, jumps=not self.smooth, breaks=self.breaks,
                            vt_angle=self.dvt_angle,
                            piecewise=None if self.piecewise is None else self.piecewise.derivative())
            _PRIMES[self] = d
        return d


_PRIMES: dict = {}
