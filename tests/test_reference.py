"""Against neural-tangents 0.6.5 reference kernels (tests/fixtures/neural_tangents).

Every case runs through both frontends: torch.fx on the module, and torch.export
(``compile`` of the ``ExportedProgram``, in torch's default IR and in the core ATen
IR of ``run_decompositions()``, which older torch versions produce), and both must
give the same kernels to 1e-12.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

import ntkcompile
from conftest import DEVICE, REFERENCE_DIR
from models import Erf, ResidualMLP, mlp


def _layernorm_mlp(d, n):
    ln = lambda: nn.LayerNorm(n, eps=1e-12, elementwise_affine=False)  # neural-tangents' eps
    return nn.Sequential(nn.Linear(d, n), ln(), nn.ReLU(), nn.Linear(n, n), ln(), Erf(), nn.Linear(n, 1))


CASES = {
    "mlp_relu": (lambda d: mlp(d, 32, nn.ReLU), 1.5, 0.05),
    "mlp_erf": (lambda d: mlp(d, 32, Erf, depth=3), 1.2, 0.1),
    "mlp_gelu_nobias": (lambda d: mlp(d, 32, nn.GELU, bias=False), 1.0, 0.0),
    "resnet_mlp": (lambda d: ResidualMLP(d, 32), 1.0, 0.1),
    "layernorm_mlp": (lambda d: _layernorm_mlp(d, 32), 1.3, 0.2),
}


def _load(case):
    path = os.path.join(REFERENCE_DIR, case + ".npz")
    if not os.path.exists(path):
        pytest.fail(f"reference fixture missing: {path}")
    z = np.load(path)
    return {k: z[k] for k in z.files}


FRONTENDS = ["fx", "export"]


def _compile(model, frontend, x, **kw):
    """``compile`` through torch.fx (the module) or torch.export (its ExportedProgram)."""
    if frontend != "fx":
        model = torch.export.export(model, (x[:3].float(),))
        if frontend == "export_core":
            model = model.run_decompositions()
    return ntkcompile.compile(model, device=DEVICE, **kw)


def _assert_frontends_agree(build, x1, x2, **kw):
    """fx, export and export in core ATen: equal kernels to 1e-12 (relative to the largest entry)."""
    ks = {f: (lambda k: (k(x1, x2), k(x1)))(_compile(build(), f, x1, **kw)) for f in ("fx", "export", "export_core")}
    for f in ("export", "export_core"):
        for got, want in zip(ks[f], ks["fx"]):
            for name in ("nngp", "ntk"):
                a, b = getattr(got, name), getattr(want, name)
                assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()), (f, name)


def _rel(a, b):
    assert a.device.type == torch.device(DEVICE).type
    return np.linalg.norm(a.cpu().numpy() - b) / np.linalg.norm(b)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_neural_tangents(case, frontend):
    ref = _load(case)
    build, W_std, b_std = CASES[case]
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    kfn = _compile(build(x1.shape[1]), frontend, x1, W_std=W_std, b_std=b_std)
    k12, k11 = kfn(x1, x2), kfn(x1)
    assert k12.nngp.dtype == torch.float64 and k12.nngp.shape == (x1.shape[0], x2.shape[0])
    assert _rel(k12.nngp, ref["nngp_12"]) <= 1e-8
    assert _rel(k12.ntk, ref["ntk_12"]) <= 1e-8
    assert _rel(k11.nngp, ref["nngp_11"]) <= 1e-8
    assert _rel(k11.ntk, ref["ntk_11"]) <= 1e-8


@pytest.mark.parametrize("case", sorted(CASES))
def test_frontends_agree(case):
    ref = _load(case)
    build, W_std, b_std = CASES[case]
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    _assert_frontends_agree(lambda: build(x1.shape[1]), x1, x2, W_std=W_std, b_std=b_std)


@pytest.mark.parametrize("case", ["mlp_relu", "resnet_mlp"])
def test_width_equal_to_input_dimension(case):
    """A hidden width equal to the input dimension must not confuse width inference."""
    ref = _load(case)
    build, W_std, b_std = CASES[case]
    x1 = torch.from_numpy(ref["x1"])
    d = x1.shape[1]
    model = mlp(d, d, nn.ReLU) if case == "mlp_relu" else ResidualMLP(d, d)
    k = ntkcompile.compile(model, W_std=W_std, b_std=b_std, device=DEVICE)(x1)
    assert _rel(k.ntk, ref["ntk_11"]) <= 1e-8


def _cnn_gap(c):
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1))


class _CnnFlatten(nn.Module):
    def __init__(self, c, h, w):
        super().__init__()
        self.conv = nn.Conv2d(c, 16, 3, stride=2)
        ho, wo = (h - 3) // 2 + 1, (w - 3) // 2 + 1
        self.out = nn.Linear(16 * ho * wo, 1)

    def forward(self, x):
        return self.out(torch.special.erf(self.conv(x)).flatten(1))


def _cnn_case(case, x1):
    c, h, w = x1.shape[1:]
    return (lambda: _cnn_gap(c), 1.4, 0.1) if case == "cnn_gap" else (lambda: _CnnFlatten(c, h, w), 1.1, 0.3)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("case", ["cnn_gap", "cnn_flatten"])
def test_cnn_matches_neural_tangents(case, frontend):
    ref = _load(case)
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    build, W_std, b_std = _cnn_case(case, x1)
    kfn = _compile(build(), frontend, x1, W_std=W_std, b_std=b_std)
    k12, k11 = kfn(x1, x2), kfn(x1)
    assert _rel(k12.nngp, ref["nngp_12"]) <= 1e-8
    assert _rel(k12.ntk, ref["ntk_12"]) <= 1e-8
    assert _rel(k11.nngp, ref["nngp_11"]) <= 1e-8
    assert _rel(k11.ntk, ref["ntk_11"]) <= 1e-8
    # layout analysis: all position pairs only where global pooling needs them
    assert ("stencil_pair(" in kfn.code) == (case == "cnn_gap")


@pytest.mark.parametrize("case", ["cnn_gap", "cnn_flatten"])
def test_cnn_frontends_agree(case):
    ref = _load(case)
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    build, W_std, b_std = _cnn_case(case, x1)
    _assert_frontends_agree(build, x1, x2, W_std=W_std, b_std=b_std)
