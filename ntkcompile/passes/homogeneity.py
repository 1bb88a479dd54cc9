"""Positive homogeneity: when the kernels scale exactly with the inputs.

If every width vector of the program is a positively homogeneous function of
degree 1 of the input (``x -> s x`` scales it by ``s > 0``), then
``NNGP(s x, s x') = s^2 NNGP(x, x')`` and the NTK scales the same way: the NTK's
backward multipliers are derivatives, homogeneous of degree 0.  That holds for
networks built from linear maps (dense, convolutions, average pooling) and
nonlinearities ``a relu(x) + b relu(-x)`` (ReLU, leaky ReLU, abs) with constant
coefficients, and no biases, constants or moments (a LayerNorm is of degree 0
but its ``eps`` breaks exactness).  Scaling the inputs by a power of two then
changes every float of the computation by that power exactly, so the compiled
kernel evaluates such networks on inputs of any magnitude without overflow in
its intermediate products (``compiled.CompiledKernel``).
"""
from __future__ import annotations

from ..ir import Atom, ECall, ELin, EMul, ESlot, HAtom, SConst, Var, walk

# nonlinearities of the form a relu(x) + b relu(-x) (positively homogeneous of degree 1)
_HOMOGENEOUS = ("relu", "abs")


def _homogeneous_fn(fn) -> bool:
    return fn.name in _HOMOGENEOUS or fn.name.startswith("leaky_relu(")


def _expr_degree_one(expr) -> bool:
    def rule(e, ok):
        if isinstance(e, ESlot):
            return True
        if isinstance(e, ECall):
            return _homogeneous_fn(e.fn) and ok[0]
        if isinstance(e, ELin):
            return all(isinstance(c, SConst) for c, _ in e.terms) and all(ok)
        return False                      # constants, products (EMul: higher degree)
    return walk.fold(expr, rule, children=lambda e: tuple(x for _, x in e.terms) if isinstance(e, ELin)
                     else () if isinstance(e, EMul) else e.children())


def is_homogeneous(program) -> bool:
    """True if the kernels of ``program`` scale as ``s^2`` when the inputs scale by ``s > 0``.

    Linear atom kinds declare it (``Atom.homogeneous``: input layers, matmuls,
    convolutions, average pooling); an H-atom is checked through its expression;
    any other atom (a bias, a constant, a probe) and any coefficient that is not a
    constant (a moment) make the program not homogeneous.
    """
    if program.readout.has_bias:
        return False
    for n in program.nodes:
        if n is program.ONE:
            continue
        if isinstance(n, Var):
            if any(not isinstance(c, SConst) or a is program.ONE for c, a in n.terms):
                return False
        elif isinstance(n, HAtom):
            if not _expr_degree_one(n.expr):
                return False
        elif isinstance(n, Atom) and not getattr(n, "homogeneous", False):
            return False
    return True
