"""Joint Monte Carlo over a Tensor Program's coordinates for recurrent cells.

A gated cell (GRU, LSTM) makes its state a nonlinear function of ``O(T)`` Gaussian
G-vars, so its kernels have no low-dimensional quadrature.  The Master Theorem
(TP II Sec. 2-5, TP IIb) still describes them: every G-var is a coordinate random
variable with a Gaussian law given by the earlier H-vars.  We sample those
coordinates, ``alpha = 1..S``, *jointly for every input of a tile and every time
step*, so the kernels we return are Gram matrices of samples and therefore
symmetric positive semi-definite.

Per sample ``alpha`` (a coordinate of the width-``S`` program):

* input side: gate ``k`` gets ``a_k = W_ih[k] x + b_ih[k] beta_ih[k]`` with
  ``W_ih[k] x`` Gaussian over all ``(b, t)`` with covariance
  ``W_ih_std[k]^2 k_in`` (a pivoted Cholesky factor of ``k_in``: it may be
  singular); gates are independent (different rows of ``W_ih``);
* hidden side: ``g_k = W_hh[k] h_{t-1} + b_hh[k] beta_hh[k]``.  ``W_hh h`` is
  sampled *conditionally on the samples of h*: exactly in law as a width-``S``
  Gaussian matrix (entries ``N(0, W_hh_std[k]^2 / S)``) applied to the
  ``S``-vector of samples, i.e. with the plug-in covariance
  ``W_hh_std^2 h^T h' / S``, jointly over inputs and time;
* biases are one draw per coordinate, shared by every input and time step.

Backward, under the gradient independence assumption (TP II Sec. 4, TP IIb): the
scaled outside gradient ``dh`` (covariance ``dh_cov``) is sampled jointly, and
backpropagation through time runs per sample with ``W_hh^T`` replaced by an
*independent* copy ``W~_hh^T``, sampled the same way (conditionally on the
backward vectors it is applied to); elementwise derivatives are exact.  The NTK
of the cell's own parameters is then (TP II Sec. 5) the sum over gates ``k`` and
pairs of time steps ``s, t`` of

    W_ih_std[k]^2 E[dpre^in_k,s dpre^in'_k,t] k_in[s, t] + b_ih_std[k]^2 E[dpre^in dpre^in']
  + W_hh_std[k]^2 E[dpre^hid_k,s dpre^hid'_k,t] E[h_{s-1} h'_{t-1}] + b_hh_std[k]^2 E[dpre^hid dpre^hid']

with every ``E`` a sample average (``dpre^hid = dpre^in`` except for GRU's ``n``
gate, whose hidden part ``r * g_n`` has gradient ``r * dpre_n``).  These are the
Master Theorem's quantities with the plug-in covariance; their bias is ``O(1/S)``
and their spread ``O(1/sqrt(S))``.

Sampling ``W h`` (and ``W~^T d``) conditionally: two strategies, same law.

* ``"dense"``: materialize the ``(rows, dim)`` Gaussian matrix; each step is one
  matmul.  Memory ``rows * dim``; cost ``2 rows dim B`` per step.
* ``"basis"``: keep an orthonormal basis ``Q`` of the span of the vectors the
  matrix has been applied to and ``G = W Q`` (iid Gaussian columns, since ``Q``
  is orthonormal).  A new vector ``v = Q c + r`` gives ``W v = G c + W r``; the
  residual ``r`` (classical Gram-Schmidt, twice) spans new directions ``U``,
  re-orthogonalized against ``Q``, with fresh iid columns ``W U``.  The span of
  ``B (T - 1)`` vectors is all it ever needs: memory ``(rows + dim) B (T - 1)``.

``"auto"`` picks the one with fewer estimated flops (``plan``); the basis wins
unless ``B (T - 1)`` approaches ``S``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import KernelMemoryError
from ..resources import available_memory
from .quadrature import _RANK_RTOL, _eigh, _rank_from_eigenvalues
from .scan_cells import _RULES, CELL_KINDS, _Rule

__all__ = ["CELL_KINDS", "CellSpec", "ScanPlan", "plan", "scan_mc", "scan_mc_backward", "scan_mc_forward"]

_F64 = torch.float64
_BYTES = 8
# A residual direction whose singular value is below this fraction of the largest
# vector's norm is dropped: W applied to it would change g by that fraction at most.
_BASIS_RTOL = 1e-10
# Rough cost of one normal draw relative to one multiply-add of a float64 matmul
# (measured: randn is ~25x slower per number than a large GEMM's flop on 2 cores).
_RANDN_FLOPS = 25


# ---------------------------------------------------------------------- spec


def _per_gate(name: str, value, gates: int, positive: bool) -> tuple[float, ...]:
    vals = (value,) * gates if isinstance(value, (int, float)) else tuple(value)
    if len(vals) != gates:
        raise ValueError(f"CellSpec.{name} needs one value per gate ({gates}), got {value!r}")
    vals = tuple(float(v) for v in vals)
    if not all(math.isfinite(v) and v >= 0 for v in vals) or (positive and not all(v > 0 for v in vals)):
        raise ValueError(f"CellSpec.{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return vals


@dataclass(frozen=True)
class CellSpec:
    """A recurrent cell in NTK parametrization, exactly as ``torch.nn`` computes it.

    Attributes:
        kind: one of ``CELL_KINDS``: ``"rnn_tanh"``, ``"rnn_relu"`` (one gate),
            ``"gru"`` (gates r, z, n), ``"lstm"`` (gates i, f, g, o).
        W_ih, W_hh: per-gate ``W_std`` of the input and hidden weights; a number
            means the same for every gate.  ``W_ih > 0``, ``W_hh >= 0``.
        b_ih, b_hh: per-gate ``b_std`` of the biases (``0.0`` for ``bias=False``).
        reverse: run ``t = T-1 .. 0`` (the backward direction of a bidirectional
            layer); outputs stay indexed by input position.
    """

    kind: str
    W_ih: tuple[float, ...] = 1.0
    W_hh: tuple[float, ...] = 1.0
    b_ih: tuple[float, ...] = 0.0
    b_hh: tuple[float, ...] = 0.0
    reverse: bool = False

    def __post_init__(self):
        if self.kind not in _RULES:
            raise ValueError(f"unknown cell kind {self.kind!r}; valid kinds: {list(CELL_KINDS)}")
        n = len(self.gates)
        for name in ("W_ih", "W_hh", "b_ih", "b_hh"):
            object.__setattr__(self, name, _per_gate(name, getattr(self, name), n, name == "W_ih"))
        object.__setattr__(self, "reverse", bool(self.reverse))

    @property
    def gates(self) -> tuple[str, ...]:
        """Gate names in PyTorch's order (the row blocks of ``weight_ih``/``weight_hh``)."""
        return _RULES[self.kind].gates


# ------------------------------------------------------- Gaussian matrices


class _Dense:
    """A ``(rows, dim)`` matrix with iid ``N(0, var)`` entries, materialized."""

    def __init__(self, rows, dim, cap, var, gen, device):
        self.W = torch.randn(rows, dim, generator=gen, dtype=_F64, device=device).mul_(math.sqrt(var))

    def __call__(self, X: Tensor) -> Tensor:
        return self.W @ X


class _Basis:
    """The same matrix, sampled only on the span of what it is applied to.

    ``Q`` (dim, r) is an orthonormal basis of that span and ``G = W Q`` (rows, r);
    since ``Q`` is orthonormal, ``G``'s columns are iid ``N(0, var I)`` and
    independent of ``W``'s action on the complement, so extending ``G`` by fresh
    columns for new directions keeps the joint law exact.
    """

    def __init__(self, rows, dim, cap, var, gen, device):
        self.Q = torch.empty(dim, cap, dtype=_F64, device=device)
        self.G = torch.empty(rows, cap, dtype=_F64, device=device)
        self.r, self.std, self.gen = 0, math.sqrt(var), gen

    def __call__(self, X: Tensor) -> Tensor:
        Q = self.Q[:, : self.r]
        c = Q.T @ X
        R = X - Q @ c
        c2 = Q.T @ R                       # second Gram-Schmidt pass: R stays orthogonal to Q
        R -= Q @ c2
        c += c2
        scale = float(X.norm(dim=0).max())
        if scale > 0 and self.r < self.Q.shape[1]:
            U, s, _ = torch.linalg.svd(R, full_matrices=False)
            k = min(int((s > _BASIS_RTOL * scale).sum()), self.Q.shape[1] - self.r)
            if k:
                U = U[:, :k]
                U -= Q @ (Q.T @ U)          # re-orthogonalize: R's orthogonality is relative to |X|
                U = torch.linalg.qr(U).Q
                self.Q[:, self.r : self.r + k] = U
                self.G[:, self.r : self.r + k] = torch.randn(
                    self.G.shape[0], k, generator=self.gen, dtype=_F64, device=X.device).mul_(self.std)
                self.r += k
                c = torch.cat((c, U.T @ R))
        return self.G[:, : self.r] @ c


_STRATEGIES = {"dense": _Dense, "basis": _Basis}


# ---------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ScanPlan:
    """What ``scan_mc`` will do for one call, decided before allocating.

    Attributes:
        strategy: ``"dense"`` or ``"basis"`` (see the module docstring).
        bytes: estimated peak memory of the call.
        flops: estimated floating-point work (normal draws weighted as flops).
    """

    strategy: str
    bytes: int
    flops: float


def _costs(rule: _Rule, B: int, T: int, S: int, backward: bool, strategy: str) -> tuple[int, float]:
    """Estimated peak bytes and flops (a normal draw counted as ``_RANDN_FLOPS``)."""
    G, n, steps = len(rule.gates), B * T, max(T - 1, 0)
    cap = min(S, B * steps)
    arrays = S * n * (G + 2 + rule.saved)                      # a, H, the states, the rule's arrays
    grams = n * n * (10 if backward else 5)                    # k_in and its factor, Grams, NTK terms
    flops = n ** 3 + G * S * n * n * 2 + S * n * n * 2         # factor (full rank), a = Z L^T, h Gram
    if backward:
        arrays += S * n * (G + 2)                              # dh, dpre per gate, GRU's gated dpre
        flops += (G + 1) * S * n * n * 2                       # per-gate Grams
    # W_hh is (G S, S) forward; W~_hh^T is (S, G S) backward; one of them alive at a time.
    if strategy == "dense":
        mats = G * S * S
        pass_flops = [2 * G * S * S * B * steps + _RANDN_FLOPS * G * S * S] * 2
    else:
        mats = (G + 1) * S * cap
        ranks = sum(min(cap, B * t) for t in range(steps))
        # projections (two Gram-Schmidt passes) in R^dim, G r, the residual's SVD, fresh columns
        pass_flops = [(4 * dim + 2 * rows) * B * ranks + dim * B * B * steps + _RANDN_FLOPS * rows * cap
                      for dim, rows in ((S, G * S), (G * S, S))]
    return _BYTES * (arrays + grams + mats), flops + sum(pass_flops[: 2 if backward else 1])


def plan(cell: CellSpec, B: int, T: int, samples: int, backward: bool = True,
         strategy: str = "auto", max_bytes: Optional[int] = None) -> ScanPlan:
    """Choose the sampling strategy of a ``scan_mc`` call and check its memory.

    ``strategy="auto"`` takes the strategy with fewer estimated flops among those
    that fit.  Raises ``KernelMemoryError`` (a ``MemoryError``) when none does:
    ``max_bytes`` defaults to half the memory available now (as ``tiling`` allows
    itself).  With ``n = B T`` inputs x steps and ``G`` gates, peak memory is about
    ``8 S n (2 G + 4 + saved)`` bytes for the sampled arrays (``saved`` = 1 RNN,
    4 GRU, 6 LSTM), ``80 n^2`` for the Gram matrices, and ``8 (G + 1) S min(S, n)``
    (basis) or ``8 G S^2`` (dense) for the hidden matrix: at ``S = 4096``,
    ``n = 3200`` an LSTM needs about 3.2 GB, a GRU 2.5 GB; ``S = 4096``, ``n = 320``
    about 0.3 GB.
    """
    rule = _RULES[cell.kind]
    if strategy != "auto" and strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: 'auto', {', '.join(map(repr, _STRATEGIES))}")
    budget = max_bytes if max_bytes is not None else (available_memory() or 2**34) // 2
    options = sorted((_costs(rule, B, T, samples, backward, s)[::-1] + (s,))
                     for s in (_STRATEGIES if strategy == "auto" else (strategy,)))
    for flops, need, name in options:
        if need <= budget:
            return ScanPlan(name, int(need), float(flops))
    flops, need, name = options[0]
    raise KernelMemoryError(
        f"scan_mc for a {cell.kind} cell over {B} inputs x {T} steps with {samples} samples "
        f"({name} strategy{', with backward' if backward else ''}) needs about {need / 2**30:.2f} GiB, "
        f"more than the {budget / 2**30:.2f} GiB budget; use fewer samples or fewer inputs per tile "
        f"(memory grows like samples * inputs * steps).")


# ----------------------------------------------------------------- sampling


# Pivoted Cholesky steps before a covariance counts as high-rank: each step reads the
# factor so far (n r), so r steps cost n r^2 / 2 memory-bound multiply-adds; beyond a
# few hundred, LAPACK's eigendecomposition (~10 n^3 flops at full speed) is faster.
_PIVOTED_MAX_RANK = 256


def _factor(cov: Tensor) -> Tensor:
    """``L`` (n x r) with ``L L^T = cov`` (PSD, maybe singular) up to ``_RANK_RTOL``.

    Low rank (the usual case: a first layer's input covariance over ``n = B T`` rows
    has rank at most ``input_size + 1``, an embedding's the vocabulary): pivoted
    Cholesky, which stops at the numerical rank ``r`` and costs ``n r^2``.  For a PSD
    remainder ``R``, ``|R_ij| <= sqrt(R_ii R_jj)``, so stopping when every remaining
    diagonal entry is under ``_RANK_RTOL * max(diag)`` bounds every entry's error.
    Above ``_PIVOTED_MAX_RANK`` (a stacked layer's sampled states): an eigendecomposition
    of the support, clamped, top rank kept.  Zero rows (a last-step readout's ``dh_cov``
    is zero outside ``B`` of ``B T`` rows) get zero rows of ``L``.
    """
    cov = 0.5 * (cov + cov.T)
    n = cov.shape[0]
    d = cov.diagonal().clone().clamp_min_(0.0)
    tol = _RANK_RTOL * float(d.max()) if n else 0.0
    L = cov.new_zeros(n, min(n, 64))
    r = 0
    while r < n:
        i = int(torch.argmax(d))
        pivot = float(d[i])
        if pivot <= tol or pivot <= 0.0:
            return L[:, :r]
        if r == _PIVOTED_MAX_RANK:
            return _eigh_factor(cov)
        if r == L.shape[1]:
            L = torch.cat([L, L.new_zeros(n, min(n, 2 * r) - r)], dim=1)
        column = cov[:, i] - L[:, :r] @ L[i, :r]
        column /= math.sqrt(pivot)
        L[:, r] = column
        d.sub_(column * column).clamp_min_(0.0)
        d[i] = 0.0
        r += 1
    return L[:, :r]


def _eigh_factor(cov: Tensor) -> Tensor:
    on = torch.nonzero(cov.diagonal() > 0).squeeze(1)
    evals, evecs = _eigh(cov[on][:, on])
    rank = _rank_from_eigenvalues(evals)
    L = cov.new_zeros(cov.shape[0], rank)
    L[on] = evecs[:, evecs.shape[1] - rank:] * evals[evals.shape[0] - rank:].sqrt()
    return L


def _flat(k: Tensor) -> Tensor:
    """(B, B, T, T) indexed [b, b', s, t] -> (T B, T B) indexed [(s, b), (t, b')]."""
    B, _, T, _ = k.shape
    return k.permute(2, 0, 3, 1).reshape(T * B, T * B)


def _unflat(m: Tensor, B: int, T: int) -> Tensor:
    return m.reshape(T, B, T, B).permute(1, 3, 0, 2)


def _gaussian(L: Tensor, S: int, T: int, B: int, gen) -> Tensor:
    """``S`` joint draws of ``N(0, L L^T)`` over (t, b): shape (S, T, B)."""
    z = torch.randn(S, L.shape[1], generator=gen, dtype=_F64, device=L.device)
    return (z @ L.T).reshape(S, T, B)


def _gram(X: Tensor) -> Tensor:
    """(S, T, B) samples -> ``(1/S) X^T X`` over (t, b): (T B, T B)."""
    S = X.shape[0]
    X = X.reshape(S, -1)
    return X.T @ X / S


def _check(name, k, shape):
    if not torch.is_tensor(k) or tuple(k.shape) != shape or not k.is_floating_point():
        raise ValueError(f"scan_mc: {name} must be a float tensor of shape {shape}, got "
                         f"{tuple(k.shape) if torch.is_tensor(k) else type(k).__name__}")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"scan_mc: {name} has NaN or inf entries")


def scan_mc(cell: CellSpec, k_in: Tensor, dh_cov: Optional[Tensor] = None, *, samples: int,
            seed: int = 0, strategy: str = "auto", max_bytes: Optional[int] = None) -> dict[str, Tensor]:
    """Kernels of one recurrent layer by joint Monte Carlo over its G-vars.

    Args:
        cell: the cell (``CellSpec``).
        k_in: ``(B, B, T, T)``, ``k_in[b, b', s, t] = E[Z^{x_{b,s}} Z^{x_{b',t}}]``, the
            per-coordinate covariance of the input sequence (``<x_{b,s}, x_{b',t}>/d``
            for a fixed input; a lower layer's ``h`` when stacked).  PSD, maybe singular.
        dh_cov: ``(B, B, T, T)``, the covariance of the scaled outside gradient into
            the state sequence (a readout of the last step: ``W_std_out^2`` at
            ``[:, :, T-1, T-1]``, zero elsewhere), or ``(R, R, B, B, T, T)`` for ``R``
            backward passes together (``scan_mc_backward``).  ``None``: forward only.
        samples: ``S``, the number of coordinates sampled (the width of the program).
        seed: seeds the ``torch.Generator`` of every draw; results are
            deterministic for a given ``(samples, seed, strategy)``.
        strategy: ``"auto"``, ``"dense"`` or ``"basis"`` (same law; ``plan``).
        max_bytes: memory budget; ``KernelMemoryError`` beyond it (``plan``).

    Returns:
        float64 tensors, positions indexed by input order (also for ``reverse``):

        * ``"h"``: ``(B, B, T, T)``, ``(1/S) sum_alpha h_{b,s} h_{b',t}``, the state Gram;
        * ``"mean"``: ``(B, T)``, ``(1/S) sum_alpha h_{b,t}``;
        * with ``dh_cov``, ``"ntk"``: ``(B, B)``, the NTK contribution of the cell's
          own parameters summed over all pairs of time steps (module docstring);
        * with ``dh_cov``, ``"dx"``: ``(B, B, T, T)``, the covariance of the scaled
          gradient into the input sequence, ``sum_k W_ih_std[k]^2 E[dpre^in_k,s dpre^in'_k,t]``.

        A last-step readout ``f = v.h_{T-1}/sqrt(n)`` has NNGP ``W_v^2 h[:, :, T-1, T-1]``
        and NTK ``W_v^2 h[:, :, T-1, T-1] + ntk`` (``dh_cov`` as above).
    """
    if not torch.is_tensor(k_in) or k_in.ndim != 4:
        raise ValueError("scan_mc: k_in must be a (B, B, T, T) tensor")
    if dh_cov is not None:           # before the forward pass is sampled, not after
        B, T = k_in.shape[0], k_in.shape[2]
        R = dh_cov.shape[0] if torch.is_tensor(dh_cov) and dh_cov.ndim == 6 else None
        _check("dh_cov", dh_cov, (B, B, T, T) if R is None else (R, R, B, B, T, T))
    out, fwd = scan_mc_forward(cell, k_in, samples=samples, seed=seed, strategy=strategy, max_bytes=max_bytes,
                               backward=dh_cov is not None)
    if dh_cov is not None:
        out.update(scan_mc_backward(fwd, dh_cov))
    return out


def scan_mc_forward(cell: CellSpec, k_in: Tensor, *, samples: int, seed: int = 0, strategy: str = "auto",
                    max_bytes: Optional[int] = None, backward: bool = True):
    """``scan_mc`` in two halves: ``(out, handle)`` with the forward results (``"h"``,
    ``"mean"``), and a handle that ``scan_mc_backward(handle, dh_cov)`` turns into
    ``"ntk"`` and ``"dx"`` once the gradient's covariance is known (a stacked layer's
    comes from the layers above, whose forward needs this one's).  Together they are
    exactly ``scan_mc(cell, k_in, dh_cov)`` (the same draws, in the same order), with the
    forward pass sampled once.  ``backward`` only sizes the memory check (``plan``)."""
    if not isinstance(cell, CellSpec):
        raise TypeError(f"scan_mc: cell must be a CellSpec, got {type(cell).__name__}")
    if not torch.is_tensor(k_in) or k_in.ndim != 4:
        raise ValueError("scan_mc: k_in must be a (B, B, T, T) tensor")
    B, T = k_in.shape[0], k_in.shape[2]
    _check("k_in", k_in, (B, B, T, T))
    S = int(samples)
    if S < 1 or T < 1 or B < 1:
        raise ValueError(f"scan_mc: need samples, inputs and steps >= 1, got S={S}, B={B}, T={T}")
    chosen = plan(cell, B, T, S, backward, strategy, max_bytes)
    k_in = k_in.to(_F64)
    if cell.reverse:            # the backward direction is the forward cell on reversed time
        k_in = k_in.flip(2, 3)
    out, fwd = _forward(_RULES[cell.kind], cell, k_in, S, seed, _STRATEGIES[chosen.strategy])
    if cell.reverse:
        out = {k: v.flip(-1) if k == "mean" else v.flip(2, 3) for k, v in out.items()}
    return out, fwd


def scan_mc_backward(handle, dh_cov: Tensor) -> dict[str, Tensor]:
    """``"ntk"`` ``(B, B)`` and ``"dx"`` ``(B, B, T, T)`` of the forward pass ``handle``
    (from ``scan_mc_forward``; each handle feeds one backward pass) for the gradient
    covariance ``dh_cov`` ``(B, B, T, T)``, indexed by input position as in ``scan_mc``.

    Several backward passes of one network (a readout at every step: one per output
    step) are run together when ``dh_cov`` is ``(R, R, B, B, T, T)``, the joint covariance
    of the ``R`` gradients: ``dh_cov[r, r', b, b', s, t] = E[dh^r_{b,s} dh^r'_{b',t}]``.  Then
    ``"ntk"`` is ``(R, R, B, B)``, ``sum_{s,t}`` over the layer's parameters of the products
    of the two passes' gradients, and ``"dx"`` ``(R, R, B, B, T, T)``."""
    if not isinstance(handle, _Forward):
        raise TypeError(f"scan_mc_backward: expected the handle of scan_mc_forward, got {type(handle).__name__}")
    B, T = handle.B, handle.T
    seeded = torch.is_tensor(dh_cov) and dh_cov.ndim == 6
    R = dh_cov.shape[0] if seeded else 1
    _check("dh_cov", dh_cov, (R, R, B, B, T, T) if seeded else (B, B, T, T))
    dh_cov = dh_cov.to(_F64)
    if not seeded:
        dh_cov = dh_cov[None, None]
    need = 8 * _BYTES * (R * B * T) ** 2
    budget = (available_memory() or 2**34) // 2
    if R > 1 and need > budget:
        raise KernelMemoryError(
            f"scan_mc's backward for {R} outputs per input over {B} inputs x {T} steps needs about "
            f"{need / 2**30:.2f} GiB of Gram matrices, more than the {budget / 2**30:.2f} GiB budget; "
            "use fewer inputs per tile (tile_size=) or fewer output positions")
    if handle.cell.reverse:
        dh_cov = dh_cov.flip(-2, -1)
    out = _backward(handle, dh_cov)
    if handle.cell.reverse:
        out["dx"] = out["dx"].flip(-2, -1)
    if not seeded:
        out = {k: v[0, 0] for k, v in out.items()}
    return out


def _forward(rule: _Rule, cell: CellSpec, k_in, S, seed, Matrix):
    B, T, dev = k_in.shape[0], k_in.shape[2], k_in.device
    G = len(rule.gates)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    col = lambda v: torch.tensor(v, dtype=_F64, device=dev)[:, None, None]   # per gate, broadcast (G, S, B)
    W_ih, W_hh, b_ih, b_hh = map(col, (cell.W_ih, cell.W_hh, cell.b_ih, cell.b_hh))

    # Biases: one draw per coordinate, shared by all inputs and times.
    beta_ih = b_ih * torch.randn(G, S, 1, generator=gen, dtype=_F64, device=dev)
    beta_hh = b_hh * torch.randn(G, S, 1, generator=gen, dtype=_F64, device=dev)
    # Input side, jointly over (t, b), independent gates: (G, S, T, B).
    K = _flat(k_in)
    L = _factor(K)
    a = torch.empty(G, S, T, B, dtype=_F64, device=dev)
    for k in range(G):
        a[k] = _gaussian(L, S, T, B, gen).mul_(cell.W_ih[k]).add_(beta_ih[k, :, :, None])
    del L

    cap = B * max(T - 1, 0)
    Whh = Matrix(G * S, S, min(cap, S), 1.0 / S, gen, dev)
    H = torch.empty(S, T, B, dtype=_F64, device=dev)
    h, c = torch.zeros(S, B, dtype=_F64, device=dev), torch.zeros(S, B, dtype=_F64, device=dev)
    states, saved = [], []                      # (h_prev, c_prev) and the rule's arrays, per step
    for t in range(T):
        g = beta_hh.expand(G, S, B) if t == 0 else Whh(h).view(G, S, B) * W_hh + beta_hh
        states.append((h, c))
        h, c, keep = rule.step(a[:, :, t], g, h, c)
        H[:, t] = h
        saved.append(keep)
    del a, Whh, g
    gram = _gram(H)
    out = {"h": _unflat(gram, B, T), "mean": H.mean(0).T.contiguous()}
    state = _Forward(rule, cell, gen, Matrix, K, gram, states, saved, S, B, T, cap, W_hh)
    return out, state


class _Forward:
    """What ``_backward`` needs from ``_forward``: the generator (its draws continue), the
    states and the rule's saved arrays per step, the Grams."""

    def __init__(self, rule, cell, gen, Matrix, K, gram, states, saved, S, B, T, cap, W_hh):
        self.rule, self.cell, self.gen, self.Matrix, self.K, self.gram = rule, cell, gen, Matrix, K, gram
        self.states, self.saved, self.S, self.B, self.T, self.cap, self.W_hh = states, saved, S, B, T, cap, W_hh
        self.used = False


def _backward(fwd: _Forward, dh_cov) -> dict[str, Tensor]:
    if fwd.used:
        raise RuntimeError("internal error: a forward pass of scan_mc feeds one backward pass")
    fwd.used = True
    rule, cell, gen, Matrix, K, gram = fwd.rule, fwd.cell, fwd.gen, fwd.Matrix, fwd.K, fwd.gram
    states, saved, S, B, T, cap, W_hh = fwd.states, fwd.saved, fwd.S, fwd.B, fwd.T, fwd.cap, fwd.W_hh
    G, dev = len(rule.gates), gram.device
    fwd.states = fwd.saved = None
    out = {}
    # R backward passes together (one per output step of a per-step readout): the
    # passes are columns (r, b) next to each other, through the same W~_hh^T
    R = dh_cov.shape[0]
    if R > 1:
        tile = lambda x: None if x is None else x.repeat(*([1] * (x.ndim - 1)), R)  # noqa: E731
        states = [tuple(map(tile, st)) for st in states]
        saved = [tuple(map(tile, sv)) for sv in saved]
    RB = R * B
    joint = dh_cov.permute(4, 0, 2, 5, 1, 3).reshape(T * RB, T * RB)      # [(t, r, b), (t', r', b')]
    dh_ext = _gaussian(_factor(joint), S, T, RB, gen)
    del joint
    Wt = Matrix(S, G * S, min(R * cap, G * S), 1.0 / S, gen, dev)   # W~_hh^T, independent of W_hh
    d_in = torch.empty(G, S, T, RB, dtype=_F64, device=dev)
    d_gated = None if rule.gated is None else torch.empty(S, T, RB, dtype=_F64, device=dev)
    rec, dc = None, None
    for t in reversed(range(T)):
        dh = dh_ext[:, t] if rec is None else dh_ext[:, t] + rec
        h_prev, c_prev = states[t]
        din, gated, direct, dc = rule.back(saved[t], h_prev, c_prev, dh, dc)
        d_in[:, :, t] = din
        if t > 0:       # dh_{-1} would feed the constant initial state: not needed
            d_hid = din
            if gated is not None:
                d_gated[:, t] = gated
                d_hid = din.clone()
                d_hid[rule.gated] = gated
            rec = Wt((d_hid * W_hh).reshape(G * S, RB))
            if direct is not None:
                rec += direct
        elif gated is not None:
            d_gated[:, t] = gated
    del saved, states, Wt, dh_ext

    # Per-gate Grams (T R B, T R B) of dpre; the W_ih terms sum into sum(dx * k_in).
    Hp = torch.zeros_like(gram).view(T, 1, B, T, 1, B)
    Hp[1:, :, :, 1:] = gram.view(T, 1, B, T, 1, B)[:-1, :, :, :-1]     # E[h_{s-1} h'_{t-1}], h_{-1} = 0
    K = K.view(T, 1, B, T, 1, B)
    n = T * RB
    dx, hid, bias = (torch.zeros(n, n, dtype=_F64, device=dev) for _ in range(3))
    for k in range(G):
        m = _gram(d_in[k])
        dx += cell.W_ih[k] ** 2 * m
        bias += cell.b_ih[k] ** 2 * m
        if k == rule.gated:
            m = _gram(d_gated)
        hid += cell.W_hh[k] ** 2 * m
        bias += cell.b_hh[k] ** 2 * m
    six = lambda m: m.view(T, R, B, T, R, B)  # noqa: E731
    terms = six(dx) * K + six(hid) * Hp + six(bias)
    out["ntk"] = terms.sum((0, 3)).permute(0, 2, 1, 3)                       # (R, R, B, B)
    out["dx"] = six(dx).permute(1, 4, 2, 5, 0, 3)                            # (R, R, B, B, T, T)
    return out
