"""Empirical NTK of a finite network, computed with ``torch.func``.

For a network ``f(x; theta)`` with ``out`` outputs and trainable parameters
``theta`` the empirical NTK is

    Theta(x, x')_{ij} = sum_p  d f_i(x) / d theta_p  *  d f_j(x') / d theta_p.

At infinite width in NTK parametrization it converges to ``NTK(x, x') * delta_ij``
(TP II Sec. 5, Thm. 7.2), and its relative Frobenius distance to the limit decays
like ``width^(-1/2)`` (TP II Fig. 1). The limit's ``N1 x N2`` factor is compared
with the *per-output factor*

    (1/out) * sum_o  J_o(x1) J_o(x2)^T,

the mean of the ``(o, o)`` diagonal blocks, which is what ``empirical_ntk``
returns (for a scalar output it is just ``J(x1) J(x2)^T``). ``empirical_ntk_full``
returns every block.

Memory: the Jacobian is never materialized for all parameters at once. The
parameters are split into groups (one large tensor, or several small ones) and the
inputs into chunks, so that one Jacobian block ``(examples, out, group size)``
stays under ``_BLOCK_BYTES``; each pair of blocks is contracted into the kernel
and dropped. Everything runs in float64 on a float64 copy of the model.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["empirical_ntk", "empirical_ntk_full", "empirical_outputs"]

# Upper bound on one Jacobian block; at most two are alive at once.
_BLOCK_BYTES = 2**29


class _Net:
    """A float64 functional view of ``model``: the module plus its tensors."""

    def __init__(self, model: nn.Module, per_example: bool, vmap_ok: bool = True):
        floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        # Copy only when a cast is needed; the original is never written to,
        # because buffers are passed as clones (see __call__).
        if any(t.dtype != torch.float64 for t in floats):
            model = copy.deepcopy(model).to(torch.float64)
        if per_example:
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    raise ValueError(
                        f"module {name!r} is a BatchNorm in training mode, which couples "
                        "the examples of a batch; call model.eval() or pass "
                        "per_example=False to differentiate whole batches"
                    )
        self.module = model
        self.params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.per_example = per_example
        # Rows independent but no vmap rule (torch's fused RNNs): chunks of examples are
        # differentiated as small batches instead of one example at a time.
        self.one_at_a_time = per_example and vmap_ok

    def input(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, device=self.device)
        return x.to(torch.float64) if x.is_floating_point() else x

    def __call__(self, group: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(out,)`` of one example, or ``(N, out)`` of a whole batch."""
        # Buffers are cloned inside the transformed function: train-mode
        # BatchNorm updates its running stats in place, which torch.func
        # refuses on captured tensors.
        tensors = {n: b.clone() for n, b in self.buffers.items()}
        tensors.update(self.frozen)
        tensors.update(self.params)
        tensors.update(group)
        if self.one_at_a_time:
            return functional_call(self.module, tensors, (x.unsqueeze(0),)).reshape(-1)
        return functional_call(self.module, tensors, (x,)).reshape(x.shape[0], -1)

    def jacobian(self, group: dict[str, Tensor], x: Tensor) -> list[Tensor]:
        """Per-parameter Jacobians of the group, each flattened to ``(N, out, numel)``."""
        if self.one_at_a_time:
            jac = vmap(jacrev(self), in_dims=(None, 0))(group, x)
        else:
            jac = jacrev(self)(group, x)
        return [j.flatten(2) for j in jac.values()]


def _groups(params: dict[str, Tensor], bytes_per_entry: int) -> Iterator[dict[str, Tensor]]:
    """Consecutive parameter groups whose Jacobian entries fit in one block."""
    group: dict[str, Tensor] = {}
    size = 0
    for name, p in params.items():
        if group and (size + p.numel()) * bytes_per_entry > _BLOCK_BYTES:
            yield group
            group, size = {}, 0
        group[name] = p
        size += p.numel()
    if group:
        yield group


def _spans(n: int, c: int) -> list[slice]:
    return [slice(s, min(s + c, n)) for s in range(0, n, c)]


def _contract(a: list[Tensor], b: list[Tensor], full: bool) -> Tensor:
    """``sum_p a[n, i, p] b[m, j, p]``: ``(n, m, i, j)`` if full, else the mean over ``i = j``."""
    (na, out), nb = a[0].shape[:2], b[0].shape[0]
    if full:
        k = sum(ja.reshape(na * out, -1) @ jb.reshape(nb * out, -1).T for ja, jb in zip(a, b))
        return k.reshape(na, out, nb, out).permute(0, 2, 1, 3)
    return sum(ja.reshape(na, -1) @ jb.reshape(nb, -1).T for ja, jb in zip(a, b)) / out


def _ntk(model, x1, x2, chunk, per_example, full) -> Tensor:
    vmap_ok = not any(isinstance(m, nn.RNNBase) for m in model.modules())
    if per_example is None:
        per_example = True
    if chunk is not None and (not per_example or int(chunk) < 1):
        raise ValueError(
            "chunk must be a positive number of examples, and only applies with "
            f"per_example=True; got chunk={chunk!r}, per_example={per_example}"
        )
    net = _Net(model, per_example, vmap_ok)
    x1 = net.input(x1)
    x2 = None if x2 is None else net.input(x2)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    with torch.no_grad():
        out = net({}, x1[0] if net.one_at_a_time else x1).shape[-1]

    shape = (n1, n2, out, out) if full else (n1, n2)
    K = torch.zeros(shape, dtype=torch.float64, device=net.device)
    if not net.params:
        return K
    entry = 8 * out
    examples = chunk or (max(n1, n2) if per_example else n1 + n2)
    for group in _groups(net.params, entry * examples):
        if not per_example:
            j1 = net.jacobian(group, x1)
            K += _contract(j1, j1 if x2 is None else net.jacobian(group, x2), full)
            continue
        per_ex = entry * sum(p.numel() for p in group.values())
        c = chunk or max(1, _BLOCK_BYTES // per_ex)
        rows = _spans(n1, c)
        for i, si in enumerate(rows):
            ja = net.jacobian(group, x1[si])
            if x2 is None:  # symmetric: blocks j <= i, mirrored
                for sj in rows[:i]:
                    k = _contract(ja, net.jacobian(group, x1[sj]), full)
                    K[si, sj] += k
                    K[sj, si] += k.transpose(0, 1).transpose(2, 3) if full else k.T
                k = _contract(ja, ja, full)  # symmetrized so that K == K^T exactly
                K[si, si] += (k + (k.transpose(0, 1).transpose(2, 3) if full else k.T)) / 2
            else:
                for sj in _spans(n2, c):
                    K[si, sj] += _contract(ja, net.jacobian(group, x2[sj]), full)
    return K


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    chunk: int | None = None,
    per_example: bool | None = None,
) -> Tensor:
    """Empirical NTK factor ``(1/out) sum_o J_o(x1) J_o(x2)^T``, shape ``(N1, N2)``, float64.

    ``J_o(x)`` is the ``(N, #params)`` Jacobian of output ``o`` with respect to
    every parameter with ``requires_grad`` (for an ``ntk_parametrize``-d model,
    the N(0, 1) tensors). For a scalar output this is the empirical NTK itself;
    for ``out > 1`` outputs it is the mean of the diagonal ``(o, o)`` blocks,
    which converges to the ``N1 x N2`` factor of the limit ``NTK (x) I_out``.
    Outputs of any shape are flattened per example.

    Args:
        model: the network; it is not modified (a float64 copy is used).
        x1, x2: inputs with the example axis first; ``x2=None`` means ``x1``
            (the result is then exactly symmetric).
        chunk: examples per Jacobian block; default chosen so that one block is
            at most 512 MiB.
        per_example: differentiate each example on its own (``vmap``). Pass
            ``False`` for models that couple the examples of a batch
            (BatchNorm in training mode): then ``x1`` and ``x2`` are each one
            batch, and the whole ``(N, out)`` output is differentiated.  Default
            (``None``): ``True``.  Models holding torch's fused recurrent modules
            (``nn.RNN``/``GRU``/``LSTM`` have no ``vmap`` rule) are then
            differentiated in chunks of examples as small batches (they do not
            couple examples), with the same memory bound.
    """
    return _ntk(model, x1, x2, chunk, per_example, full=False)


def empirical_ntk_full(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    chunk: int | None = None,
    per_example: bool | None = None,
) -> Tensor:
    """Every block ``J_i(x1) J_j(x2)^T`` of the empirical NTK: shape ``(N1, N2, out, out)``.

    Same arguments as ``empirical_ntk``; ``empirical_ntk`` equals the mean of
    this tensor's ``[:, :, o, o]`` slices.
    """
    return _ntk(model, x1, x2, chunk, per_example, full=True)


def empirical_outputs(model: nn.Module, x: Tensor) -> Tensor:
    """The model's outputs on ``x`` in float64, flattened per example: ``(N, out)``."""
    net = _Net(model, per_example=False)
    with torch.no_grad():
        return net({}, net.input(x))
