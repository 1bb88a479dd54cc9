"""Closed-form values (TP II) and quadrature against closed forms, at the kernel level."""
import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

import ntkcompile
from models import mlp


def test_tp2_two_layer_relu_value():
    """TP II: NTK(x, x) = (3/4)|x|^2/d + 7/4 (W_std = b_std = 1, no readout bias)."""
    d = 7
    model = nn.Sequential(nn.Linear(d, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 1, bias=False))
    x = torch.randn(9, d, dtype=torch.float64) * torch.linspace(0.1, 3.0, 9)[:, None]
    ntk = ntkcompile.compile(model, W_std=1.0, b_std=1.0)(x).ntk
    expected = 0.75 * (x * x).sum(1) / d + 1.75
    assert torch.allclose(ntk.diag(), expected, rtol=1e-10, atol=0)


# Pointwise functions whose closed forms are bypassed: the same math through a
# function with no registered moments, so the planner must use quadrature.
def _erf_q(x):
    return torch.special.erf(x)


def _gelu_q(x):
    return torch.nn.functional.gelu(x)


def _sin_q(x):
    return torch.sin(x)


for _f in (_erf_q, _gelu_q, _sin_q):
    torch.fx.wrap(_f.__name__)
    ntkcompile.register_elementwise(_f, _f.__name__ + "[quadrature]")


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("closed, quad", [
    (lambda x: torch.special.erf(x), lambda x: _erf_q(x)),
    (lambda x: torch.nn.functional.gelu(x), lambda x: _gelu_q(x)),
    (lambda x: torch.sin(x), lambda x: _sin_q(x)),
], ids=["erf", "gelu", "sin"])
def test_quadrature_agrees_with_closed_form(closed, quad):
    class Net(nn.Module):
        def __init__(self, fn, d=4, n=16):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, 1)
            self.fn = fn

        def forward(self, x):
            return self.o(self.fn(self.b(self.fn(self.a(x)))))

    x1, x2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    k_closed = ntkcompile.compile(Net(closed), W_std=1.3, b_std=0.2)
    # Pre-activation variances here reach ~5, where erf' is narrow on the
    # Gauss-Hermite scale: measured error 5e-5 at degree 64, 1e-7 at 128, 9e-13 at 256.
    k_quad = ntkcompile.compile(Net(quad), W_std=1.3, b_std=0.2, quadrature_degree=256)
    assert "quadrature" in k_quad.program and "closed form" in k_closed.program
    for a, b in ((k_closed(x1, x2), k_quad(x1, x2)), (k_closed(x1), k_quad(x1))):
        for name in ("nngp", "ntk"):
            ka, kb = getattr(a, name), getattr(b, name)
            assert torch.linalg.norm(ka - kb) / torch.linalg.norm(ka) <= 1e-8


def _arccos_relu_mlp(x1, x2, depth, W_std, b_std):
    """Independent numpy recursion for a ReLU MLP (Cho & Saul arc-cosine, Jacot et al.)."""
    x1, x2 = x1.numpy(), x2.numpy()
    d = x1.shape[1]
    q1 = W_std**2 * (x1 * x1).sum(1) / d + b_std**2
    q2 = W_std**2 * (x2 * x2).sum(1) / d + b_std**2
    k = W_std**2 * x1 @ x2.T / d + b_std**2
    ntk = k.copy()
    for _ in range(depth):
        s = np.sqrt(np.outer(q1, q2))
        c = np.clip(k / s, -1, 1)
        theta = np.arccos(c)
        k_new = W_std**2 * s * (np.sin(theta) + (np.pi - theta) * c) / (2 * np.pi) + b_std**2
        dot = W_std**2 * (np.pi - theta) / (2 * np.pi)
        ntk = k_new + ntk * dot
        k = k_new
        q1, q2 = W_std**2 * q1 / 2 + b_std**2, W_std**2 * q2 / 2 + b_std**2
    return k, ntk


@pytest.mark.parametrize("depth", [1, 3, 10])
def test_deep_relu_mlp_against_arccos_recursion(depth):
    x1, x2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    k = ntkcompile.compile(mlp(5, 8, nn.ReLU, depth=depth), W_std=1.4, b_std=0.3)(x1, x2)
    nngp, ntk = _arccos_relu_mlp(x1, x2, depth, 1.4, 0.3)
    np.testing.assert_allclose(k.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-12)


def _shift_matrices(in_hw, k, stride, pad):
    """``S_k[s, u] = 1`` where output position ``s`` reads input position ``u`` at tap ``k``."""
    H, W = in_hw
    oh, ow = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    mats = []
    for dh in range(k):
        for dw in range(k):
            S = np.zeros((oh * ow, H * W))
            for i in range(oh):
                for j in range(ow):
                    u, v = i * stride + dh - pad, j * stride + dw - pad
                    if 0 <= u < H and 0 <= v < W:
                        S[i * ow + j, u * W + v] = 1.0
            mats.append(S)
    return mats, (oh, ow)


def test_linear_conv_into_global_pool_against_dense_recursion():
    """conv(pad 1) -> conv(stride 2) -> global mean -> Linear, with biases everywhere.

    Oracle: the forward NNGP/NTK recursion of neural-tangents' form written with
    dense shift matrices in numpy, ``K' = W^2/|K| sum_k S_k K S_k^T + b^2`` and
    ``Theta' = W^2/|K| sum_k S_k Theta S_k^T + K'``.  (The last conv feeds the
    pooling directly, so its backward covariance is a constant; that case once
    crashed on the bias term.)
    """
    Ws, bs, C, n = 1.3, 0.2, 2, 8
    model = nn.Sequential(nn.Conv2d(C, n, 3, padding=1), nn.Conv2d(n, n, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, 1))
    x = np.random.default_rng(0).standard_normal((3, C, 5, 5))
    got = ntkcompile.compile(model, W_std=Ws, b_std=bs)(torch.from_numpy(x))
    S1, hw1 = _shift_matrices((5, 5), 3, 1, 1)
    S2, _ = _shift_matrices(hw1, 3, 2, 0)
    flat = x.reshape(3, C, -1)
    nngp, ntk = np.zeros((3, 3)), np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            K0 = flat[a].T @ flat[b] / C
            K1 = Ws ** 2 / 9 * sum(S @ K0 @ S.T for S in S1) + bs ** 2
            T1 = K1
            K2 = Ws ** 2 / 9 * sum(S @ K1 @ S.T for S in S2) + bs ** 2
            T2 = Ws ** 2 / 9 * sum(S @ T1 @ S.T for S in S2) + K2
            nngp[a, b] = Ws ** 2 * K2.mean() + bs ** 2
            ntk[a, b] = Ws ** 2 * T2.mean() + Ws ** 2 * K2.mean() + bs ** 2
    np.testing.assert_allclose(got.nngp.numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(got.ntk.numpy(), ntk, rtol=1e-12)
