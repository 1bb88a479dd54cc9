"""BatchNorm in training mode and batch statistics (ops/batchnorm.py, kernels/batchnorm_mc.py).

Oracles:

* batch statistics that are linear (``x - x.mean(0)`` of the input, ``h - h.mean(0)`` of a
  layer's output) against the plain MLP on inputs centered per batch: exact linear
  algebra, to 1e-12 (the centered layer's bias cancels, so the plain MLP has none);
* BatchNorm-ReLU MLPs against NTK4A's recursion, evaluated by deterministic quadrature
  in ``bn_oracle.py`` (written independently in numpy/scipy), within the reported
  standard errors;
* the Monte Carlo backward ``E[J^T D J]`` against Jacobians of the same samples by
  autograd (``torch.func.jacrev``), to 1e-12;
* slow: empirical NTKs of wide BatchNorm-ReLU MLPs (torch.func, whole batches), one
  batch and a cross kernel of two batches.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from helpers.bn_oracle import bn_relu_kernels
from helpers.convergence import convergence_sweep
from ntkcompile.errors import UnsupportedOpError
from ntkcompile.kernels import batchnorm_mc
from ntkcompile.ops.batchnorm import BatchNormSpec

D = 5


def _x(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _plain(bias=False):
    """The MLP that batch centering before ``a`` reduces to."""
    return nn.Sequential(nn.Linear(D, 16, bias=bias), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


class InputCentered(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _plain(bias=True)

    def forward(self, x):
        return self.net(x - x.mean(0))


class HiddenCentered(nn.Module):
    """``h - h.mean(0)`` after the first layer: its bias cancels."""

    def __init__(self, keepdim):
        super().__init__()
        self.keepdim, self.a, self.b, self.o = keepdim, nn.Linear(D, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x):
        h = self.a(x)
        h = h - h.mean(0, keepdim=self.keepdim)
        return self.o(torch.relu(self.b(torch.relu(h))))


class CNN(nn.Module):
    """Two 3x3 convolutions (the second strided, or SAME), relu, a mean over positions: with ``bn``,
    BatchNorm2d in training mode after each; with ``center``, the input centered over the batch."""

    def __init__(self, width=8, bn=False, center=False, stride=2):
        super().__init__()
        self.center = center
        self.c1 = nn.Conv2d(2, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, stride=stride, padding=1 if stride == 1 else 0)
        self.b1, self.b2 = (nn.BatchNorm2d(width), nn.BatchNorm2d(width)) if bn else (nn.Identity(), nn.Identity())
        self.o = nn.Linear(width, 1)

    def forward(self, x):
        if self.center:
            x = x - x.mean(0)
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.o(h.mean((2, 3)))


def test_a_cnn_on_inputs_centered_per_batch():
    """The batch as a fixed axis through convolutions (kernel 1 along the examples, stride and
    padding along the map) and a mean over positions: exactly the CNN on centered inputs."""
    x1, x2 = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 5, 5, dtype=torch.float64)
    kfn = ntkcompile.compile(CNN(center=True), input_shape=(2, 5, 5), b_std=0.2)
    plain = ntkcompile.compile(CNN(), input_shape=(2, 5, 5), b_std=0.2)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(kfn(x1), name), getattr(plain(x1 - x1.mean(0)), name),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(getattr(kfn(x1, x2), name), getattr(plain(x1 - x1.mean(0), x2 - x2.mean(0)), name),
                                   rtol=1e-12, atol=1e-14)


class Conv1x1(nn.Module):
    """``_bn_mlp(16, 2, affine=True, bias=True)`` as 1x1 convolutions and BatchNorm2d on 1x1 maps."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(D, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1)
        self.b2, self.o = nn.BatchNorm2d(16), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.o(h.mean((2, 3)))


def test_batchnorm2d_of_1x1_maps_is_batchnorm1d():
    """The same covariances, so the same samples: equal to the last bit."""
    x1, x2 = _x(8, 0), _x(6, 1)
    maps = ntkcompile.compile(Conv1x1(), input_shape=(D, 1, 1), b_std=0.3, joint_samples=512)
    vectors = ntkcompile.compile(_bn_mlp(16, 2, affine=True, bias=True), input_shape=(D,), b_std=0.3,
                                 joint_samples=512)
    for args in ((x1,), (x1, x2)):
        a, b = maps(*[t[:, :, None, None] for t in args]), vectors(*args)
        for name in ("nngp", "ntk", "ntk_stderr"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def _assert_kernels(got, want):
    """Equal up to rounding, amplified where a correlation is 1 (an example with itself):
    ``relu'``'s kernel ``(pi - arccos c) / 2 pi`` turns ``c = 1 - 1e-16`` into ``1e-9``."""
    for name, tol in (("nngp", 1e-12), ("ntk", 1e-7)):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=tol, atol=tol)


@pytest.mark.parametrize("model, bias", [(InputCentered(), True), (HiddenCentered(True), False),
                                         (HiddenCentered(False), False)], ids=["input", "hidden-keepdim", "hidden"])
def test_batch_centering_is_the_mlp_on_inputs_centered_per_batch(model, bias):
    """Before this, ``x - x.mean(0)`` compiled and its kernel changed with the tiling (issue 10).
    Centering after the first layer cancels its bias: the plain MLP has none there."""
    x1, x2 = _x(6, 0), _x(4, 1)
    kfn = ntkcompile.compile(model, input_shape=(D,), b_std=0.4)
    plain = ntkcompile.compile(_plain(bias), input_shape=(D,), b_std=0.4)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    _assert_kernels(kfn(x1), plain(c1))
    _assert_kernels(kfn(x1, x2), plain(c1, c2))
    _assert_kernels(kfn(x2, x1), plain(c2, c1))


def test_a_batch_is_never_split():
    kfn = ntkcompile.compile(InputCentered(), input_shape=(D,))
    x = _x(6, 0)
    for kwargs in ({"tile_size": 2}, {"out": torch.zeros(6, 6), "get": "ntk"}):
        with pytest.raises(ValueError, match="couples the examples of a batch"):
            kfn(x, **kwargs)
    with pytest.raises(ValueError, match="couples the examples of a batch"), pytest.warns(DeprecationWarning):
        kfn(x, batch_size=2)
    with pytest.raises(ValueError, match="minibatch"):
        ntkcompile.simulate(kfn, x, torch.zeros(6, 1), lr=0.1, steps=2, batch_size=3)


def _bn_mlp(width, depth, affine=False, bias=False, functional=False, d=D):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), nn.BatchNorm1d(width, affine=affine), nn.ReLU()]
        d = width
    net = nn.Sequential(*layers, nn.Linear(d, 1, bias=bias))
    if functional:
        return _Functional(net)
    return net


class _Functional(nn.Module):
    """The same network with ``F.batch_norm(..., training=True)`` and no running statistics."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        for m in self.net:
            x = F.batch_norm(x, None, None, training=True) if isinstance(m, nn.BatchNorm1d) else m(x)
        return x


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.batch_norm"])
def test_bn_relu_mlp_matches_the_ntk4a_recursion(depth, functional):
    """Within the reported standard errors: ``rms z`` over the 36 entries of the upper
    triangle is about 1 for honest error bars; 2.5 fails by chance with probability far
    below 1e-3 (the entries are correlated, so less often than independent ones).
    PyTorch's eps = 1e-5 against the recursion's 0 shifts entries by O(1e-5)."""
    x = _x(8, 3)
    kfn = ntkcompile.compile(_bn_mlp(32, depth, functional=functional), input_shape=(D,), b_std=0.0,
                             joint_samples=16384)
    got = kfn(x)
    nngp, ntk = bn_relu_kernels(x.numpy(), depth)
    for name, want in (("nngp", nngp), ("ntk", ntk)):
        k, se = getattr(got, name), getattr(got, f"{name}_stderr")
        z = ((k - torch.as_tensor(want)) / se).triu()
        rms = float((z.pow(2).sum() / 36).sqrt())
        assert rms < 2.5, (name, rms)
        assert float(se.max()) < 0.02 * float(k.abs().max())


@pytest.mark.parametrize("example_shape", [(), (2,)], ids=["vectors", "maps"])
def test_backward_moments_are_autograd_jacobians_of_the_samples(example_shape):
    """``E[J^T D J]`` of two batches (``relu`` before and ``tanh`` after the normalization; of
    vectors, and of maps of 2 positions normalized over examples and positions) against
    Jacobians of the same samples by ``torch.func.jacrev``: both evaluators (the fourth
    moments, and the structure ``J = diag(a) (I - U U^T) diag(b)``), with a non-symmetric ``D``
    (a pair of different output examples)."""
    sizes, per = (3, 4), math.prod(example_shape)
    Q = (sum(sizes),) + example_shape
    n = math.prod(Q)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = (A @ A.T / n).reshape(1, *Q, *Q)
    spec = BatchNormSpec(sizes, 1e-3, (SimpleNamespace(fn=torch.relu),), (SimpleNamespace(fn=torch.tanh),),
                         example_shape)
    sim = batchnorm_mc.forward(K, spec, (0, 5), 64, [], 0)
    d = torch.randn(2, 2, n, n, generator=g, dtype=torch.float64)   # pairs (s, t) of 2 output examples
    d[1, 0] = d[0, 1].T                                              # (t, s): transposed, reused
    d = d.reshape(4, n, n)

    def y(z):                              # one sample's outputs from its G-vars
        u, out, start = torch.relu(z), [], 0
        for b in sizes:
            c = u[start * per:(start + b) * per] - u[start * per:(start + b) * per].mean()
            out.append(torch.tanh(c / torch.sqrt((c * c).mean() + 1e-3)))
            start += b
        return torch.cat(out)

    L = batchnorm_mc._factor(K.reshape(n, n))
    z = torch.randn(64, L.shape[1], generator=torch.Generator().manual_seed(5 * 7919 + 104_729),
                    dtype=torch.float64) @ L.T
    J = torch.func.vmap(torch.func.jacrev(y))(z)                      # (S, n, n): [s, p, k]
    want = torch.einsum("spk,npq,sql->nkl", J, d, J) / 64
    got = batchnorm_mc.backward(sim, d.reshape(2, 2, *Q, *Q), spec, seeds=2).reshape(4, n, n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    batches = list(batchnorm_mc._batches(spec))
    for how in (batchnorm_mc._dense, batchnorm_mc._structured,
                lambda *a: batchnorm_mc._structured(*a, twins=[0, 2, 1, 3])):
        torch.testing.assert_close(how(sim["samples"], d, batches), want, rtol=1e-11, atol=1e-12)


def test_refusals():
    x = _x(8, 0)

    for tail in ([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)], [nn.Flatten(), nn.Linear(72, 1)],
                 [nn.MaxPool2d(3), nn.Flatten(), nn.Linear(8, 1)]):
        # ops whose rules know nothing of the batch axis: AdaptiveAvgPool2d returned one number
        # for the whole batch (it pooled the examples too) before they were refused
        model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), *tail)
        with pytest.raises(UnsupportedOpError, match=f"{type(tail[0]).__name__} in a batch-coupled model"):
            ntkcompile.compile(model, input_shape=(1, 5, 5))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn, self.o = nn.Linear(D, 16), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.o(torch.relu(self.bn(self.b(h)) + h))

    with pytest.raises(UnsupportedOpError):
        ntkcompile.compile(Residual(), input_shape=(D,))
    with pytest.raises(ValueError, match="at least 2 examples"):
        ntkcompile.compile(_bn_mlp(16, 1), input_shape=(D,))(x[:1])

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _bn_mlp(16, 1)

        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[3](torch.sign(h))

    with pytest.raises(UnsupportedOpError, match="jumps"):
        ntkcompile.compile(Step(), input_shape=(D,))


@pytest.mark.slow
@pytest.mark.parametrize("cross", [False, True], ids=["one batch", "two batches"])
def test_wide_bn_relu_mlps_converge(cross):
    """Empirical NTKs of 2-layer BatchNorm-ReLU MLPs (affine BatchNorm, biases before it: their
    gradient is 0) on batches of 8 (and 6), widths 256-4096, 3 seeds, converge with slope in
    [-0.7, -0.3] (measured -0.43 and -0.48).  Batches spanning fewer than 5 directions make
    ``1/sigma`` of the batch statistics heavy-tailed and the finite-width NTK's variance
    infinite (issue 10; ``kernels.batchnorm_mc._check_rank``)."""
    x1, x2 = _x(8, 0), (_x(6, 1) if cross else None)
    kfn = ntkcompile.compile(_bn_mlp(64, 2, affine=True, bias=True), input_shape=(D,), b_std=0.5,
                             joint_samples=65536)
    limit = kfn(x1, x2)
    assert float(limit.ntk_stderr.max()) < 0.005 * float(limit.ntk.abs().max())
    errors, slope = convergence_sweep(lambda n: _bn_mlp(n, 2, affine=True, bias=True), [256, 1024, 4096],
                                      [0, 1, 2], x1, x2, limit.ntk, 1.0, 0.5, per_example=False, log=print)
    assert -0.7 <= slope <= -0.3, (errors, slope)


@pytest.mark.slow
def test_full_batch_training_follows_simulate():
    """A 2-layer BatchNorm-ReLU MLP (training mode) trained by full-batch gradient descent on 8
    points (8 test points, their own batch; inputs of 10 dimensions, so each batch spans 7
    directions and the finite-width NTK has a finite variance) follows ``simulate`` from its
    own ``f_0``: the gap over 20 steps falls with slope in [-0.7, -0.3] (measured -0.43)."""
    from ntkcompile.harness import compare_widths

    def make(n):
        return _bn_mlp(n, 2, affine=True, bias=True, d=10)
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    kfn = ntkcompile.compile(make(64), input_shape=(10,), b_std=0.5, joint_samples=65536)
    rep = compare_widths(make, [256, 1024, 4096], x, y, xt, W_std=1.0, b_std=0.5, lr=0.1, steps=20,
                         seeds=(0, 1, 2, 3), kfn=kfn, progress=print)
    assert -0.7 <= rep.slope <= -0.3, (rep.mean_gaps, rep.slope)


def test_an_ntk_through_batch_statistics_of_fewer_than_3_directions_is_refused():
    """``E[1/sigma^2]`` diverges for a Gaussian in fewer than 3 dimensions: a batch of 3 (2
    directions after centering) has no finite NTK (``bn_oracle`` raises too); the NNGP is fine.
    4 examples span 3 directions: finite, with a warning about heavy tails."""
    kfn = ntkcompile.compile(_bn_mlp(16, 1), input_shape=(D,), joint_samples=256)
    with pytest.raises(ValueError, match="diverges"):
        kfn(_x(3, 0))
    with pytest.raises(ValueError):
        bn_relu_kernels(_x(3, 0).numpy(), 1)
    assert torch.isfinite(kfn(_x(3, 0), get="nngp").nngp).all()
    with pytest.warns(RuntimeWarning, match="heavy-tailed"):
        kfn(_x(4, 0))


def test_a_batch_too_large_for_memory_says_so(monkeypatch):
    """The work grows like (examples)^4; above the memory a ``KernelMemoryError`` names the
    batch, before anything is allocated."""
    from ntkcompile import resources
    from ntkcompile.errors import KernelMemoryError
    kfn = ntkcompile.compile(InputCentered(), input_shape=(D,))
    monkeypatch.setattr(resources, "available_memory", lambda: 2 ** 20)
    monkeypatch.setattr(ntkcompile.tiling, "available_memory", lambda: 2 ** 20)
    with pytest.raises(KernelMemoryError, match=r"30 \+ 20 examples is one unit"):
        kfn(_x(30, 0), _x(20, 1))


@pytest.mark.slow
def test_wide_batchnorm2d_cnns_converge():
    """Empirical NTKs of the BatchNorm2d CNN (training mode, 8 random 2x4x4 images as one
    batch), widths 128-1024, 3 seeds, against the kernel (measured errors 0.090, 0.099, 0.029,
    0.019, slope -0.86: a CNN's mean over positions averages the fluctuations)."""
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kfn = ntkcompile.compile(CNN(16, bn=True, stride=1), input_shape=(2, 4, 4), b_std=0.3, joint_samples=8192)
    limit = kfn(x)
    assert float(limit.ntk_stderr.max()) < 0.005 * float(limit.ntk.abs().max())
    errors, slope = convergence_sweep(lambda n: CNN(n, bn=True, stride=1), [128, 256, 512, 1024], [0, 1, 2], x, None,
                                      limit.ntk, 1.0, 0.3, per_example=False, log=print)
    assert slope <= -0.3 and errors[-1] < 0.04, (errors, slope)
