"""Codegen: the kernel plan as Python source, compiled once, called many times.

``kernels.master.Planner`` emits one line per quantity (a covariance, a
V-transform, a quadrature) into a ``Source``; ``Source.build`` compiles it into
a function ``kernel(x1, x2) -> (nngp, ntk, errors)`` (``errors``: ``(kind, 0-d tensor)``
pairs, Monte Carlo standard errors and quadrature error estimates).  The generated text is
what ``kfn.code`` shows.  Every helper the lines call lives in ``RUNTIME``.
"""
from __future__ import annotations

import re

import opt_einsum
import torch

from .kernels import quadrature as quad
from .kernels import spatial as _sp


def _t(x, like):
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _cf(fn, like, *ks):
    """Call a closed form with tensor arguments (constants become 0-d tensors)."""
    return fn(*[_t(k, like) for k in ks])


def _cov_matrix(entries, like):
    """Stack a DxD nested list of broadcastable entries into ``(*batch, D, D)``."""
    flat = [_t(e, like) for row in entries for e in row]
    flat = torch.broadcast_tensors(*flat)
    d = len(entries)
    return torch.stack(flat, dim=-1).reshape(*flat[0].shape, d, d)


def _angle(like, k11, k12, k22):
    """``arccos`` of the clamped correlation: shared by the arc-cosine closed forms."""
    return quad.angle(_t(k11, like), _t(k12, like), _t(k22, like))


def _quad_error(value, coarse, scale, smooth):
    """Error estimate of a quadrature at ``n`` nodes from the same rule at ``n/2``.

    ``d = max|Q_n - Q_{n/2}| / max E|f g|`` is about the error of ``Q_{n/2}``,
    relative to the size of the integrand (``scale``, from a coarse rule: the
    expectation itself may vanish by symmetry).  For a smooth integrand the
    trapezoidal rule converges exponentially, so the error of ``Q_n`` is about
    ``d^2 / C`` with ``C >= 1`` (measured C = 30 to 250 for tanh nets): ``d^2`` is
    returned; with a kink (algebraic convergence) ``d`` itself.  A 0-d tensor, so
    that ``jit=True`` traces it.
    """
    d = (value - coarse).abs().max() / scale.abs().max().clamp_min(1e-300)
    return d * d if smooth else d


def _record_estimate(errors, value, rule, degree, smooth, floor):
    """Append the error estimate of ``value = rule(degree, False)`` to ``errors``:
    ``rule(n, absolute)`` evaluates the same expectation with ``n`` nodes per
    dimension (of ``|integrand|`` when ``absolute``), here at ``n/2`` for the
    change and at ``n/4`` (at least ``floor``) for the integrand's size."""
    coarse = rule(degree // 2, False)
    scale = rule(max(floor, degree // 4), True)
    errors.append(("quad", _quad_error(value, coarse, scale, smooth)))


def _q1(f, var, like, degree, errors, smooth=True):
    """1-D expectation; its error estimate (``_quad_error``) is appended to ``errors``."""
    var = _t(var, like)

    def rule(n, absolute):
        return quad.expect_1d((lambda z: f(z).abs()) if absolute else f, var, n)

    value = rule(degree, False)
    _record_estimate(errors, value, rule, degree, smooth, floor=8)
    return value


def _q2(f, g, like, k11, k12, k22, degree, errors, smooth=True):
    """2-D expectation and its error estimate (the extra rules cost about 30% more)."""
    ks = (_t(k11, like), _t(k12, like), _t(k22, like))

    def rule(n, absolute):
        if absolute:
            return quad.expect_2d(lambda z: f(z).abs(), lambda z: g(z).abs(), *ks, n)
        return quad.expect_2d(f, g, *ks, n)

    value = rule(degree, False)
    _record_estimate(errors, value, rule, degree, smooth, floor=8)
    return value


def _qn(f, entries, like, errors, samples, seed, smooth=True):
    """N-D expectation; a Monte Carlo standard error, or for the tensor-product
    quadrature (rank <= 3) the same estimate as ``_q2`` (half the nodes per
    dimension), is appended to ``errors``."""
    cov = _cov_matrix(entries, like)
    value, stderr = quad.expect_nd(f, cov, mc_samples=samples, seed=seed)
    if stderr is not None:
        errors.append(("mc", stderr.max()))
        return value
    rank = quad.numerical_rank(cov)
    if rank > 0:
        def rule(n, absolute):
            fn = (lambda z: f(z).abs()) if absolute else f
            return quad.expect_nd(fn, cov, degree=max(2, n), mc_samples=samples, seed=seed)[0]

        _record_estimate(errors, value, rule, quad.default_degree(rank), smooth, floor=2)
    return value


def _full(x, like, shape):
    """``x`` as an array of exactly ``shape`` (constants and broadcast terms expanded)."""
    if torch.is_tensor(x) and tuple(x.shape) == tuple(shape):
        return x
    return torch.broadcast_to(_t(x, like), shape).clone()


RUNTIME = {
    "torch": torch,
    "cf": _cf,
    "const": _t,
    "angle": _angle,
    "q1": _q1,
    "q2": _q2,
    "qn": _qn,
    "full": _full,
    **{name: getattr(_sp, name) for name in (
        "patches", "positions", "stencil_same", "stencil_pair",
        "stencil_pair_adjoint", "stencil_same_adjoint", "lift1", "lift2", "spatial_sum",
        "global_mean", "aligned_mean", "diagonal_mean", "identity_pairs", "pair_indices",
        "pack", "unpack", "liftp", "with_diagonal_packed", "with_diagonal_aligned", "pool_pair",
        "pool_same", "pool_pair_adjoint", "liftf")},
}


_ASSIGN = re.compile(r"^(k\d+|p\d+|t\d+) = ")
_NAME = re.compile(r"\b(k\d+|p\d+|t\d+)\b")


def _free_dead(lines, returns):
    """Insert ``del`` after the last use of every temporary: peak memory is then the
    live set of (N1, N2, ...) arrays, not every intermediate of the program."""
    last = {}
    for i, line in enumerate(lines):
        for name in _NAME.findall(line.split("  #")[0]):
            last[name] = i
    keep = set(_NAME.findall(returns))
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _ASSIGN.match(line)
        assigned = m.group(1) if m else None
        dead = sorted(n for n, j in last.items() if j == i and n not in keep and n != assigned)
        if dead:
            out.append("del " + ", ".join(dead))
    return out


class Source:
    """Accumulates generated lines; binds Python objects to names for the namespace."""

    def __init__(self):
        self.lines: list = []
        self.namespace = dict(RUNTIME)
        self._bound: dict = {}
        self._count = 0
        self._assigned: dict = {}     # expression -> name (common subexpressions)

    def bind(self, obj, prefix):
        key = id(obj)
        if key not in self._bound:
            name = f"{prefix}{len(self._bound)}"
            self._bound[key] = (name, obj)
            self.namespace[name] = obj
        return self._bound[key][0]

    def fresh(self, prefix="t"):
        self._count += 1
        return f"{prefix}{self._count}"

    def emit(self, line, comment=None):
        self.lines.append(f"{line}  # {comment}" if comment else line)

    def assign(self, expr, prefix="t", comment=None):
        if expr in self._assigned:
            return self._assigned[expr]
        name = self.fresh(prefix)
        self.emit(f"{name} = {expr}", comment)
        self._assigned[expr] = name
        return name

    def contract(self, equation, operands, shapes, prefix="k"):
        """Emit the contraction ``equation`` of ``operands`` along a path fixed now.

        The path is opt_einsum's (``optimal`` up to 4 operands, else ``greedy``),
        planned on ``shapes`` (nominal batch sizes; a path does not depend on them in
        any way that matters here).  Each pairwise step becomes one ``torch.einsum``
        line, with opt_einsum's cost estimate as a comment, so the generated code is
        plain torch that ``torch.compile`` traces.  Returns the name of the result.
        """
        if len(operands) != len(shapes):
            raise ValueError(f"{equation}: {len(operands)} operands but {len(shapes)} shapes")
        strategy = "optimal" if len(operands) <= 4 else "greedy"
        _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=strategy)
        names = list(operands)
        for step, (inds, _, eq, _, _) in enumerate(info.contraction_list):
            args = [names.pop(i) for i in inds]     # opt_einsum's order: indices descending
            last = step == len(info.contraction_list) - 1
            note = f"opt_einsum {equation!r} step {step + 1}/{len(info.contraction_list)}, " \
                   f"{float(info.opt_cost):.2g} flops at nominal sizes" if last else None
            names.append(self.assign(f"torch.einsum({eq!r}, {', '.join(args)})", prefix, note))
        return names[0]

    def text(self, signature, returns):
        body = "\n".join("    " + ln for ln in _free_dead(self.lines, returns) + [f"return {returns}"])
        return f"def {signature}:\n{body}\n"

    def build(self, signature, returns, fname):
        src = self.text(signature, returns)
        ns = dict(self.namespace)
        exec(compile(src, f"<ntkcompile:{fname}>", "exec"), ns)
        return ns[fname], src
