"""The torch.export frontend (``ntkcompile/export.py``, ``ntkcompile/ops/aten.py``).

Oracle: the torch.fx frontend on the same module (its kernels are checked against
neural-tangents, closed forms and finite networks elsewhere); both must agree to
1e-12.  Also: saved and loaded programs, the automatic export of modules torch.fx
cannot trace, and the errors of ATen ops without a rule.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from ntkcompile import TraceError, UnsupportedOpError
from ntkcompile.ops import aten as aten_rules
from ntkcompile.passes.lower import FUNCTION_RULES
from models import AffineLayerNormMLP, ConcatMLP, ConvResNet, PooledCNN, SharedLinear

W_STD, B_STD = 1.3, 0.2


def _close(k, ref, tol=1e-12):
    for name in ("nngp", "ntk"):
        a, b = getattr(k, name), getattr(ref, name)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()), name


def _both(model, x, example=None, **kw):
    """Kernels of ``model`` on ``x`` through torch.fx and through torch.export."""
    ep = torch.export.export(model, ((x if example is None else example)[:3].float(),))
    kw = {"W_std": W_STD, "b_std": B_STD, **kw}
    return ntkcompile.compile(ep, **kw)(x), ntkcompile.compile(model, **kw)(x)


@pytest.mark.parametrize("build, shape", [
    (lambda: SharedLinear(5, 8), (5,)),
    (lambda: AffineLayerNormMLP(5, 8), (5,)),
    (lambda: ConcatMLP(5, 8), (5,)),
    (lambda: ConvResNet(3, 8), (3, 6, 6)),
    (lambda: PooledCNN(3, 8), (3, 6, 6)),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 9, 1)).eval(), (2, 3, 3)),
], ids=["shared", "layernorm_affine", "concat", "conv_resnet", "pooled_cnn", "batchnorm_cnn"])
def test_exported_programs_match_the_fx_frontend(build, shape):
    x = torch.randn(4, *shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # quadrature estimates at 32 nodes
        got, want = _both(build(), x, quadrature_degree=32)
    _close(got, want)


def test_saved_and_loaded_program_with_a_new_batch_size(tmp_path):
    """``torch.export.save``/``load``; a static batch of 3 in ``x.reshape(3, -1)`` reads the batch
    from the input, so the kernel runs on batches of any size."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(12, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.o(torch.relu(self.a(x.reshape(x.shape[0], -1)))).view(x.shape[0], 2) * 0.5

    model = Flat()
    torch.export.save(torch.export.export(model, (torch.randn(3, 3, 4),)), tmp_path / "m.pt2")
    ep = torch.export.load(tmp_path / "m.pt2")
    kfn = ntkcompile.compile(ep, W_std=W_STD, b_std=B_STD)
    assert kfn.input_shape == (3, 4) and kfn.model_name == "Flat"
    x1, x2 = torch.randn(7, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    _close(kfn(x1, x2), ntkcompile.compile(model, W_std=W_STD, b_std=B_STD)(x1, x2))


def test_std_overrides_name_the_modules_of_an_exported_program():
    model = SharedLinear(5, 8)
    x = torch.randn(4, 5, dtype=torch.float64)
    std = {"b": (0.7, 0.3)}
    got, want = _both(model, x, std=std)
    _close(got, want)
    with pytest.raises(ValueError, match="std names a module 'nope'"):
        ntkcompile.compile(torch.export.export(model, (x.float(),)), std={"nope": (1.0, 1.0)})


class ShapeBranch(nn.Module):
    """Python control flow on shapes: torch.fx cannot trace it, torch.export can."""

    def __init__(self, d=12, n=16):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, 1)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        h = torch.relu(self.a(x))
        if h.shape[-1] > 4:
            h = torch.tanh(self.b(h))
        return self.o(h)


class Straight(ShapeBranch):
    def forward(self, x):
        return self.o(torch.tanh(self.b(torch.relu(self.a(x.reshape(x.shape[0], -1))))))


def test_modules_fx_cannot_trace_are_exported_automatically():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(ShapeBranch())
    torch.manual_seed(0)
    model = ShapeBranch()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    want = ntkcompile.compile(Straight(), W_std=W_STD, b_std=B_STD)(x)
    lazy = ntkcompile.compile(model, W_std=W_STD, b_std=B_STD)          # exported on the first call
    assert "no Tensor Program yet" in lazy.program
    _close(lazy(x), want)
    eager = ntkcompile.compile(model, W_std=W_STD, b_std=B_STD, input_shape=(3, 4))
    _close(eager(x), want)
    assert "tanh" in eager.program


class ShapeBranchCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        if x.shape[1] > 2:
            h = torch.cumsum(h, dim=-1)
        return self.o(h)


def test_errors_of_exported_graphs_name_the_aten_op_node_and_source_line():
    with pytest.raises(UnsupportedOpError) as e:
        ntkcompile.compile(ShapeBranchCumsum(), input_shape=(6,))
    msg = str(e.value)
    assert "aten.cumsum" in msg and "node 'cumsum'" in msg
    assert "torch.cumsum(h, dim=-1)" in msg and "test_export.py" in msg


def test_training_mode_layers_are_refused_in_exported_programs():
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 1))
    with pytest.raises(UnsupportedOpError, match="training mode"):
        ntkcompile.compile(torch.export.export(bn.train(), (torch.randn(2, 1, 4, 4),)))
    drop = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    with pytest.raises(UnsupportedOpError, match="Dropout is active"):
        ntkcompile.compile(torch.export.export(drop, (torch.randn(2, 3),)))


def test_transposed_convolutions_are_refused():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 1)
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x):
            h = torch.ops.aten.convolution(self.a(x), self.weight, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)
            return self.o(h.flatten(1))

    ep = torch.export.export(Up(), (torch.randn(2, 1, 6, 6),))
    with pytest.raises(UnsupportedOpError, match="transposed convolution"):
        ntkcompile.compile(ep)


# Every nonlinearity registered under an ATen name, against its torch-level form.
ACTIVATIONS = {
    "relu": torch.relu, "relu6": F.relu6, "gelu": lambda h: F.gelu(h, approximate="tanh"), "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "erf": torch.erf, "special_erf": torch.special.erf, "special_ndtr": torch.special.ndtr,
    "silu": F.silu, "mish": F.mish, "elu": lambda h: F.elu(h, 0.7), "selu": torch.selu, "celu": F.celu,
    "leaky_relu": lambda h: F.leaky_relu(h, 0.2), "softplus": lambda h: F.softplus(h, beta=2.0),
    "hardtanh": lambda h: F.hardtanh(h, -0.5, 2.0), "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "abs": torch.abs, "sign": torch.sign, "sgn": torch.sgn, "sin": torch.sin, "cos": torch.cos, "exp": torch.exp,
    "atan": torch.atan, "log_sigmoid": F.logsigmoid,
}


def test_every_aten_nonlinearity_rule_is_tested():
    registered = {n for n in aten_rules._ACTIVATIONS
                  if getattr(getattr(torch.ops.aten, n, None), "default", None) in FUNCTION_RULES}
    assert registered == set(ACTIVATIONS), registered ^ set(ACTIVATIONS)


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.a, self.o = fn, nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(self.fn(self.a(x)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_aten_nonlinearities_match_their_torch_forms(name):
    x = torch.randn(3, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # quadrature estimates of kinked functions
        got, want = _both(_Act(ACTIVATIONS[name]), x, quadrature_degree=32)
    _close(got, want)


def test_core_aten_selu_is_recognised_from_elu_with_scale():
    model = _Act(torch.selu)
    ep = torch.export.export(model, (torch.randn(2, 3),)).run_decompositions()
    assert any(n.target is torch.ops.aten.elu.default for n in ep.graph.nodes)
    x = torch.randn(3, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _close(ntkcompile.compile(ep, quadrature_degree=32)(x), ntkcompile.compile(model, quadrature_degree=32)(x))


def test_compile_refuses_other_objects():
    with pytest.raises(TypeError, match="nn.Module or a torch.export.ExportedProgram"):
        ntkcompile.compile(lambda x: x)


def test_export_failure_keeps_both_reasons():
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

        def forward(self, x):
            h = self.a(x)
            return self.o(torch.relu(h) if h.sum() > 0 else h)

    with pytest.raises(TraceError) as e:
        ntkcompile.compile(DataBranch(), input_shape=(3,))
    assert "torch.fx could not trace DataBranch" in str(e.value)
    assert "torch.export could not export it either" in str(e.value)
