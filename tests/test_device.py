"""Kernels are computed on the inputs' device.

CI has no GPU, so device consistency is checked on PyTorch's ``meta`` device:
shapes and devices propagate but no values exist, and mixing a ``meta`` array
with a non-scalar CPU array raises.  Any helper that builds an array on the
CPU (the default device) instead of the inputs' device therefore fails here as
it would on CUDA.  Data-dependent branches have no value to test on ``meta``,
so the branch-free form used under ``torch.compile`` is selected, which is the
path that must also be device-clean for ``jit=True``.

``test_cuda_matches_cpu`` is the real check; it runs where CUDA is available.
"""
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile.kernels import quadrature, spatial
from ntkcompile.ops import elementwise
from models import ConvResNet


class ConvIntoGap(nn.Module):
    """The last conv feeds global pooling directly: its backward covariance is a
    constant that the adjoint stencil must turn into an array on the right device."""

    def __init__(self, c=2, n=8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, n, 3, padding=1), nn.Conv2d(n, n, 3, stride=2)
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        return self.out(self.c2(torch.relu(self.c1(x))).mean(dim=(2, 3)))


def _cases():
    return [
        ("relu_mlp", nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), (3,)),
        ("tanh_layernorm", nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Tanh(),
                                         nn.Linear(8, 1)), (3,)),
        ("conv_into_gap", ConvIntoGap(), (2, 5, 5)),
        ("conv_resnet", ConvResNet(2, 4), (2, 5, 5)),
        ("conv_pool_flatten", nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AvgPool1d(2), nn.Conv1d(4, 4, 2),
                                            nn.Tanh(), nn.Flatten(), nn.Linear(4, 1)), (2, 7)),
    ]


@pytest.mark.parametrize("name, model, shape", _cases(), ids=[c[0] for c in _cases()])
def test_generated_code_stays_on_the_input_device(name, model, shape, monkeypatch):
    for module in (quadrature, elementwise, spatial):
        monkeypatch.setattr(module, "compiling", lambda: True)
    kfn = ntkcompile.compile(model, W_std=1.3, b_std=0.2, input_shape=shape)
    x1 = torch.empty((4, *shape), dtype=torch.float64, device="meta")
    x2 = torch.empty((3, *shape), dtype=torch.float64, device="meta")
    nngp, ntk, _ = kfn._function(True, True)[0](x1)
    assert nngp.device.type == ntk.device.type == "meta" and ntk.shape == (4, 4)
    nngp, ntk, _ = kfn._function(False, True)[0](x1, x2)
    assert nngp.device.type == ntk.device.type == "meta" and ntk.shape == (4, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, model, shape", _cases(), ids=[c[0] for c in _cases()])
def test_cuda_matches_cpu(name, model, shape):
    torch.manual_seed(0)
    x = torch.randn(6, *shape, dtype=torch.float64)
    cpu = ntkcompile.compile(model, W_std=1.3, b_std=0.2, input_shape=shape)(x)
    gpu = ntkcompile.compile(model, W_std=1.3, b_std=0.2, input_shape=shape, device="cuda")(x)
    for a, b in ((cpu.nngp, gpu.nngp), (cpu.ntk, gpu.ntk)):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=0)
