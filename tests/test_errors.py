"""Bad input gets a specific, readable error."""
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import (GIACheckError, InputShapeError, NonFiniteInputError, TraceError,
                        UnsupportedOpError, WidthInferenceError)


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        h = torch.cumsum(h, dim=-1)   # no Tensor Program rule
        return self.o(h)


def test_unsupported_op_names_op_node_source_and_how_to_register():
    with pytest.raises(UnsupportedOpError) as e:
        ntkcompile.compile(Cumsum())
    msg = str(e.value)
    assert "cumsum" in msg                       # the op
    assert "node 'cumsum'" in msg                # the node
    assert "torch.cumsum(h, dim=-1)" in msg      # the user's source line
    assert "register_elementwise" in msg and "ntkcompile/ops/" in msg and "docs/architecture.md" in msg
    assert isinstance(e.value, NotImplementedError)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.o(h)


def test_data_dependent_control_flow():
    """Branching on tensor values: neither torch.fx nor torch.export (the fallback) captures it.
    Without an input shape the export waits for the first call."""
    kfn = ntkcompile.compile(Branchy())
    with pytest.raises(TraceError, match="control flow") as e:
        kfn(torch.randn(4, 3))
    assert "torch.export could not export it either" in str(e.value)
    with pytest.raises(TraceError, match="control flow"):
        ntkcompile.compile(Branchy(), input_shape=(3,))


def test_nan_and_inf_inputs():
    kfn = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"x1 contains NaN or inf \(rows \[2\]\)"):
        kfn(x)
    y = torch.randn(2, 3)
    y[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x2"):
        kfn(torch.randn(2, 3), y)


def test_wrong_input_shape():
    kfn = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    with pytest.raises(InputShapeError, match=r"compiled for inputs of shape \(N, 3\)"):
        kfn(torch.randn(4, 5))
    with pytest.raises(InputShapeError):
        kfn(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="get must name"):
        kfn(torch.randn(4, 3), get=("ntk", "foo"))


class ReadoutReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.o(torch.relu(self.o(torch.relu(self.a(x)))))


class WidthAverage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)

    def forward(self, x):
        return torch.relu(self.a(x)).mean(-1, keepdim=True)


class SquashedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return torch.sigmoid(self.o(torch.relu(self.a(x))))


@pytest.mark.parametrize("model, pattern", [
    (ReadoutReused(), "readout weight 'o' is also used inside the network"),
    (WidthAverage(), "not by a readout Linear"),
    (SquashedOutput(), "not by a readout Linear"),
])
def test_simple_gia_check(model, pattern):
    with pytest.raises(GIACheckError, match=pattern):
        ntkcompile.compile(model)


class AddsInput(nn.Module):
    """Hidden width equals the input dimension, and the input is added to a width vector."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.o(torch.relu(self.a(x)) + x)


def test_fixed_tensor_added_to_width_vector():
    with pytest.raises(WidthInferenceError, match="fixed-dimensional tensor"):
        ntkcompile.compile(AddsInput())


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    with pytest.raises(UnsupportedOpError, match="model.eval"):
        ntkcompile.compile(model)
    ntkcompile.compile(model.eval())   # eval mode is the identity


def test_bad_compile_arguments():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="does not have"):
        ntkcompile.compile(model, std={"9": (1.0, 0.0)})
    with pytest.raises(ValueError, match="W_std"):
        ntkcompile.compile(model, W_std=-1.0)
    with pytest.raises(ValueError, match="parameterization"):
        ntkcompile.compile(model, parameterization="standard")
    with pytest.raises(TypeError, match="nn.Module"):
        ntkcompile.compile(lambda x: x)


def test_modified_layernorm_parameters_are_refused():
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.mul_(2.0)
    model = nn.Sequential(nn.Linear(3, 8), ln, nn.Linear(8, 1))
    with pytest.raises(UnsupportedOpError, match="initialization"):
        ntkcompile.compile(model)


class PooledPlusUnpooled(nn.Module):
    """A pooled branch added to an unpooled one: not supported yet, refused at compile time."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 8, 2, stride=2)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = self.b(h) + nn.functional.avg_pool1d(h, 2)
        return self.out(h.mean(-1))


def test_unsupported_pooling_combination_fails_at_compile_time():
    with pytest.raises(UnsupportedOpError, match="average pooling whose output is combined"):
        ntkcompile.compile(PooledPlusUnpooled(), input_shape=(2, 8))


def test_training_mode_batchnorm_in_a_residual_sum_is_refused():
    """BatchNorm in training mode compiles (tests/ops/test_batchnorm_train.py); its output added
    to another vector before a nonlinearity (ResNet's relu(x + bn(conv(x)))) not yet."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn, self.o = nn.Linear(3, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.o(torch.relu(h + self.bn(self.b(h))))

    model = Block()
    with pytest.raises(UnsupportedOpError, match="couples the examples of a batch"):
        ntkcompile.compile(model, input_shape=(3,))
    ntkcompile.compile(model.eval(), input_shape=(3,))


def test_compile_does_not_modify_the_model():
    """Shape propagation runs on a copy: training-mode BatchNorm statistics stay untouched,
    through compiling and calling."""
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="heavy-tailed"):      # 3 input dimensions: 3 directions
        ntkcompile.compile(model, joint_samples=64)(torch.randn(6, 3), torch.randn(5, 3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
