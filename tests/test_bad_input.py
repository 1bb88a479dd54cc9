"""The bad-input catalogue: every way a user could get a wrong number without being told,
and what ntkcompile does instead (README, "What ntkcompile does with bad input").

Each test is one entry of issue 9's list, reproduced as a user would write it; the
oracles are exact (closed forms, the arc-cosine recursion, homogeneity, the kernel of a
model without the problem) or the error itself (its type and what it names).
"""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import (InputShapeError, InvalidModelError, KernelMemoryError, NonFiniteKernelError,
                        UnsupportedOpError, WidthInferenceError)

D = 4


def _mlp(act=nn.ReLU, bias=True, d=D, n=8):
    return nn.Sequential(nn.Linear(d, n, bias=bias), act(), nn.Linear(n, n, bias=bias), act(),
                         nn.Linear(n, 1, bias=bias))


# -- every result is finite or the call raises ------------------------------------------------

class NormalizedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.relu(self.a(x / x.norm(dim=1, keepdim=True))))


def test_zero_row_normalized_before_the_first_layer_names_the_source_line():
    x = torch.randn(3, D, dtype=torch.float64)
    x[1] = 0.0
    with pytest.raises(NonFiniteKernelError) as e:
        ntkcompile.compile(NormalizedInput())(x)
    msg = str(e.value)
    assert "computed from x before the first layer" in msg and "x / x.norm(dim=1, keepdim=True)" in msg
    assert "all-zero row" in msg


def test_a_width_norm_is_refused_with_the_rms_form():
    class WidthNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

        def forward(self, x):
            h = self.a(x)
            return self.o(h / h.norm(dim=-1, keepdim=True))

    with pytest.raises(WidthInferenceError, match=r"grows like sqrt\(width\).*pow\(2\)\.mean"):
        ntkcompile.compile(WidthNorm())


def test_huge_inputs_of_a_homogeneous_net_stay_exact():
    """No biases, ReLU: NNGP(s x) = s^2 NNGP(x) exactly; 1e77-scale inputs overflowed k11*k22."""
    kfn = ntkcompile.compile(_mlp(bias=False), W_std=1.4)
    x = torch.randn(5, D, dtype=torch.float64)
    base = kfn(x)
    for e in (256, -300):                              # 1e77 and 1e-90: powers of two, exactly
        k = kfn(torch.ldexp(x, torch.tensor(e)))
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(torch.ldexp(getattr(k, name), torch.tensor(-2 * e)), getattr(base, name),
                                       rtol=1e-15, atol=0)
    with pytest.raises(NonFiniteKernelError, match="exceeds the range of float64"):
        kfn(x * 1e200)                                 # the kernel itself is ~1e400


def test_a_registered_function_that_returns_nan_is_caught():
    def partly_nan(t):
        return torch.where(t > 1.5, torch.full_like(t, float("nan")), torch.tanh(t))

    with pytest.raises(ValueError, match="(?i)returns nan"):
        ntkcompile.register_elementwise(partly_nan, "partly_nan")


# -- any depth ----------------------------------------------------------------------------

def test_depth_1000_relu_mlp_against_the_arccos_recursion():
    """No recursion over program depth (51 layers raised RecursionError); the kernels match the
    arc-cosine recursion written here in numpy to 1e-10, and in 40-digit arithmetic to
    2.5e-10.  He initialization (W_std^2 = 2, no bias): with a bias the correlations reach
    1 - c ~ 1e-12 and float64's arccos there limits any implementation's NTK to ~1e-7
    (measured against 40-digit arithmetic)."""
    L, W, b = 1000, math.sqrt(2.0), 0.0
    layers, d = [], D
    for _ in range(L):
        layers += [nn.Linear(d, 8, bias=False), nn.ReLU()]
        d = 8
    model = nn.Sequential(*layers, nn.Linear(8, 1, bias=False))
    x = torch.randn(3, D, dtype=torch.float64)
    k = ntkcompile.compile(model, W_std=W, b_std=b)(x)
    a = x.numpy()
    q = W**2 * a @ a.T / D + b**2                       # pre-activation covariance of layer 1
    ntk = q.copy()
    for _ in range(L):
        s = np.sqrt(np.outer(np.diag(q), np.diag(q)))
        c = np.clip(q / s, -1, 1)
        np.fill_diagonal(c, 1.0)
        th = np.arccos(c)
        relu = s * (np.sin(th) + (math.pi - th) * c) / (2 * math.pi)
        step = (math.pi - th) / (2 * math.pi)
        q_next = W**2 * relu + b**2
        ntk = q_next + W**2 * step * ntk
        q = q_next
    np.testing.assert_allclose(k.nngp.numpy(), q, rtol=1e-10)
    np.testing.assert_allclose(k.ntk.numpy(), ntk, rtol=1e-10)
    # and against the recursion in 40-digit arithmetic: the float64 one above rounds as ours
    # does, so this is the error itself (measured 2.8e-13 NNGP, 1.3e-10 NTK: arccos near
    # c = 1 amplifies c's rounding ~1/theta, over 1000 layers; a correlation biased by an ulp
    # doubled it)
    exact_q, exact_ntk = _arccos_recursion_40_digits(a, W**2, L)
    np.testing.assert_allclose(k.nngp.numpy(), exact_q, rtol=1e-12)
    np.testing.assert_allclose(k.ntk.numpy(), exact_ntk, rtol=2.5e-10)


def _arccos_recursion_40_digits(a, w2, depth):
    """NNGP and NTK of a bias-free relu MLP (``w2 = W_std^2``) on the rows of ``a``, in mpmath."""
    import mpmath as mp

    with mp.workdps(40):
        x = [[mp.mpf(float(v)) for v in row] for row in a]
        n, d = len(x), len(x[0])
        q = [[w2 * mp.fsum(x[i][s] * x[j][s] for s in range(d)) / d for j in range(n)] for i in range(n)]
        ntk = [row[:] for row in q]
        for _ in range(depth):
            qn = [[None] * n for _ in range(n)]
            for i in range(n):
                for j in range(n):
                    s = mp.sqrt(q[i][i] * q[j][j])
                    th = mp.acos(min(max(q[i][j] / s, -1), 1))
                    qn[i][j] = w2 * s * (mp.sin(th) + (mp.pi - th) * mp.cos(th)) / (2 * mp.pi)
                    ntk[i][j] = qn[i][j] + w2 * (mp.pi - th) / (2 * mp.pi) * ntk[i][j]
            q = qn
        return np.array(q, dtype=np.float64), np.array(ntk, dtype=np.float64)


# -- bounded memory -------------------------------------------------------------------------

def test_an_output_larger_than_memory_is_refused_before_allocating():
    kfn = ntkcompile.compile(_mlp())
    x = torch.randn(200_000, D)
    with pytest.raises(KernelMemoryError, match=r"out=.*memmap") as e:
        kfn(x)
    assert isinstance(e.value, MemoryError)


def test_position_pairs_larger_than_memory_are_refused_where_bands_cannot_split_them():
    """Two 192x192 images through a global pooling and a hidden layer after it: every pair of
    positions, several GB per array for one pair of inputs, and the kernel is not a sum over
    positions (the head's nonlinearity acts on the pooled kernel), so the work cannot be split
    into bands of positions (``kernels.bands``; convolutions and average poolings before a
    global pooling and a readout are split, ``tests/kernels/test_bands.py``)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    kfn = ntkcompile.compile(model, input_shape=(3, 192, 192))
    with pytest.raises(KernelMemoryError, match="one pair of inputs needs.*cannot be split into bands.*after the"):
        kfn(torch.randn(2, 3, 192, 192))


def test_out_arrays_numpy_memmap(tmp_path):
    kfn = ntkcompile.compile(_mlp(), W_std=1.2, b_std=0.1)
    x = torch.randn(7, D, dtype=torch.float64)
    mm = np.lib.format.open_memmap(tmp_path / "ntk.npy", mode="w+", dtype=np.float64, shape=(7, 7))
    k = kfn(x, get="ntk", out=mm, tile_size=3)
    assert k.ntk is mm
    np.testing.assert_array_equal(np.load(tmp_path / "ntk.npy"), kfn(x, get="ntk").ntk.numpy())
    with pytest.raises(ValueError, match=r"shape \(7, 6\), expected \(7, 7\)"):
        kfn(x, get="ntk", out=np.zeros((7, 6)))


# -- constants and arguments ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, pattern", [
    (dict(std={"0": (float("nan"), 0.0)}), r"std\['0'\] W_std must be a finite number"),
    (dict(std={"0": (1.0, -0.5)}), r"std\['0'\] b_std must be a finite number >= 0"),
    (dict(quadrature_degree=3), r"quadrature_degree .* must be an integer >= 8, got 3"),
    (dict(mc_samples=1), r"mc_samples .* got 1"),
    (dict(device="not-a-device"), "device must name a torch device"),
    (dict(input_shape=(0, 3)), "input_shape must be the shape of one input"),
    (dict(quadrature_tol=-1.0), "quadrature_tol must be a positive number"),
])
def test_bad_compile_arguments_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ntkcompile.compile(_mlp(), **kwargs)


def test_model_constants_without_a_value_are_refused():
    with pytest.raises(InvalidModelError, match="eps must be a finite number"):
        ntkcompile.compile(nn.Sequential(nn.Linear(D, 8), nn.LayerNorm(8, eps=float("inf")), nn.Linear(8, 1)))

    class ByZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.o(self.a(x) / 0.0)

    with pytest.raises(InvalidModelError, match="division by the number 0"):
        ntkcompile.compile(ByZero())


def test_empty_batches_give_empty_kernels():
    kfn = ntkcompile.compile(_mlp())
    k = kfn(torch.zeros(0, D), torch.randn(3, D))
    assert k.nngp.shape == (0, 3) and k.ntk.shape == (0, 3)
    assert kfn(torch.zeros(0, D)).ntk.shape == (0, 0)


def test_two_tensor_inputs_are_refused_with_what_to_do():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(D, 8), nn.Linear(8, 1)

        def forward(self, x, y):
            return self.o(torch.relu(self.a(x + y)))

    with pytest.raises(UnsupportedOpError, match="exactly one\\s+input tensor.*Wrap the model"):
        ntkcompile.compile(TwoInputs(), input_shape=(D,))


def test_a_failed_first_call_does_not_fix_the_input_shape():
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    kfn = ntkcompile.compile(conv)
    with pytest.raises(InputShapeError, match=r"does not run on inputs of shape \(N, 6, 6\)"):
        kfn(torch.randn(2, 6, 6))                      # a transposed / wrong input
    k = kfn(torch.randn(3, 2, 6, 6))                   # the right one still works
    assert k.ntk.shape == (3, 3) and kfn.input_shape == (2, 6, 6)


def test_unsupported_ops_say_whether_registering_can_help():
    class Roll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(D, 8), nn.Linear(16, 1)

        def forward(self, x):
            return self.o(torch.repeat_interleave(self.a(x), 2, dim=1))

    with pytest.raises(UnsupportedOpError, match="changes the shape of its input, so it is not an elementwise"):
        ntkcompile.compile(Roll())


# -- accurate by default ----------------------------------------------------------------------

class LayerNormResidual(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.inp = nn.Linear(D, n)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(n), nn.Linear(n, n), nn.GELU(), nn.Linear(n, n))
                                     for _ in range(2)])
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class BatchNormResNet(nn.Module):
    def __init__(self, c=2, n=4):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(c, n, 3, padding=1), nn.BatchNorm2d(n)
        self.conv, self.bn1 = nn.Conv2d(n, n, 3, padding=1), nn.BatchNorm2d(n)
        self.out = nn.Linear(n, 1)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = h + torch.relu(self.bn1(self.conv(h)))
        return self.out(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("model, shape", [(LayerNormResidual(), (D,)), (BatchNormResNet(), (2, 4, 4)),
                                          (nn.Sequential(nn.Linear(D, 8), nn.Hardtanh(-0.5, 0.5), nn.Linear(8, 1)),
                                           (D,))],
                         ids=["layernorm_residual_mlp", "eval_batchnorm_resnet", "hardtanh"])
def test_ordinary_models_do_not_warn_at_default_settings(model, shape):
    x = torch.randn(3, *shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ntkcompile.compile(model, W_std=1.3, b_std=0.2, input_shape=shape)(x)
    assert k.quad_error is None or k.quad_error < 1e-4


# -- per-example statistics before the first layer (batch statistics: tests/ops/test_batchnorm_train.py) --

class Centered(nn.Module):
    """Centers its input per example (``dim=1``)."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.a, self.o = dim, nn.Linear(D, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.relu(self.a(x - x.mean(self.dim, keepdim=True))))


def test_per_example_statistics_before_the_first_layer_are_fine():
    x = torch.randn(5, D, dtype=torch.float64)
    got = ntkcompile.compile(Centered(1), input_shape=(D,))(x)
    plain = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))
    want = ntkcompile.compile(plain, input_shape=(D,))(x - x.mean(1, keepdim=True))
    torch.testing.assert_close(got.ntk, want.ntk, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-13, atol=1e-14)
