"""Tests of ntkcompile.parametrize against networks built by hand.

The oracle is always the plain functional form ``F.linear`` / ``F.conv*d`` with
``weight = W_std / sqrt(fan_in) * w`` and ``bias = b_std * beta``, where ``w`` and
``beta`` are the stored standard-normal tensors (TP II Sec. 1 conventions).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from types import SimpleNamespace

from torch.func import functional_call, jacrev

from ntkcompile.empirical import empirical_ntk

from ntkcompile.errors import UnsupportedOpError
from ntkcompile.parametrize import NTKScale, ntk_parametrize, ntk_scales


def _stored(module: nn.Module, name: str) -> torch.Tensor:
    """The stored N(0, 1) tensor behind ``module.<name>``."""
    return getattr(module.parametrizations, name).original


def _mlp(bias: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_matches_hand_built(bias):
    torch.manual_seed(0)
    net = ntk_parametrize(_mlp(bias), 1.7, 0.3)
    x = torch.randn(5, 4)
    h = x
    for m, fan_in in ((net[0], 4), (net[2], 7)):
        W = 1.7 / math.sqrt(fan_in) * _stored(m, "weight")
        b = 0.3 * _stored(m, "bias") if bias else None
        h = F.linear(h, W, b)
        if m is net[0]:
            h = torch.tanh(h)
    torch.testing.assert_close(net(x), h, rtol=1e-6, atol=1e-6)


CONVS = [
    (nn.Conv1d, F.conv1d, dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1), (2, 3, 11)),
    (nn.Conv2d, F.conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1), (2, 4, 7, 6)),
    (nn.Conv2d, F.conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, groups=2), (2, 4, 5, 5)),
    (nn.Conv3d, F.conv3d, dict(in_channels=2, out_channels=3, kernel_size=2, stride=(1, 2, 1)), (2, 2, 4, 4, 3)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls,fn,kw,shape", CONVS, ids=["conv1d", "conv2d_stride_pad", "conv2d_groups", "conv3d"])
def test_conv_forward_matches_hand_built(cls, fn, kw, shape, bias):
    torch.manual_seed(1)
    conv = ntk_parametrize(cls(**kw, bias=bias), 1.3, 0.7)
    k = kw["kernel_size"]
    ksize = math.prod(k) if isinstance(k, tuple) else k ** (len(shape) - 2)
    fan_in = kw["in_channels"] // kw.get("groups", 1) * ksize  # computed independently of the weight shape
    assert ntk_scales(conv)[""].fan_in == fan_in
    W = 1.3 / math.sqrt(fan_in) * _stored(conv, "weight")
    b = 0.7 * _stored(conv, "bias") if bias else None
    x = torch.randn(shape)
    expect = fn(x, W, b, stride=kw.get("stride", 1), padding=kw.get("padding", 0), groups=kw.get("groups", 1))
    torch.testing.assert_close(conv(x), expect, rtol=1e-6, atol=1e-6)


def test_draws_are_standard_normal_and_reproducible():
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 1))
    a = ntk_parametrize(model, generator=torch.Generator().manual_seed(5))
    b = ntk_parametrize(model, generator=torch.Generator().manual_seed(5))
    c = ntk_parametrize(model, generator=torch.Generator().manual_seed(6))
    w = _stored(a[0], "weight")
    # 120000 N(0, 1) draws: mean within 5 / sqrt(N), std within 1 %.
    assert abs(w.mean().item()) < 5 / math.sqrt(w.numel())
    assert abs(w.std().item() - 1) < 0.01
    assert abs(_stored(a[0], "bias").std().item() - 1) < 0.2  # 400 draws, not PyTorch's U(+-1/sqrt(300))
    for (n1, p1), (n2, p2), (_, p3) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and not torch.equal(p1, p3)
    torch.manual_seed(3)
    d = ntk_parametrize(model)
    torch.manual_seed(3)
    e = ntk_parametrize(model)
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters()))


def test_original_model_is_untouched():
    torch.manual_seed(0)
    model = _mlp(True)
    before = copy.deepcopy(model.state_dict())
    net = ntk_parametrize(model, 2.0, 1.0)
    assert net is not model
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "parametrizations")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not hasattr(model, "ntk_scales")


def test_std_overrides_hit_exactly_the_named_module():
    model = nn.Sequential(
        nn.Linear(3, 8),
        nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8, bias=False)),
        nn.Conv1d(1, 2, 3),
    )
    net = ntk_parametrize(model, 1.5, 0.1, std={"1.1": (2.0, 0.5), "2": (0.5, 0.0)})
    scales = ntk_scales(net)
    assert scales == {
        "0": NTKScale(1.5, 0.1, 3, True),
        "1.1": NTKScale(2.0, 0.5, 8, True),
        "1.3": NTKScale(1.5, 0.1, 8, False),
        "2": NTKScale(0.5, 0.0, 3, True),
    }
    # The scale actually applied in the forward pass, read off the module.
    for name, s in scales.items():
        m = net.get_submodule(name)
        torch.testing.assert_close(m.weight, s.W_std / math.sqrt(s.fan_in) * _stored(m, "weight"))
        if s.has_bias:
            torch.testing.assert_close(m.bias, s.b_std * _stored(m, "bias"))
    assert torch.count_nonzero(net[2].bias) == 0  # b_std = 0 zeroes the bias ...
    assert net[2].parametrizations.bias.original.requires_grad  # ... which stays a parameter


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(std={"3": (1.0, 0.0)}), "names no module"),
        (dict(std={"0.weight": (1.0, 0.0)}), "names no module"),
        (dict(std={"1": (1.0, 0.0)}), "ReLU"),
        (dict(std={"0": (0.0, 0.0)}), "W_std"),
        (dict(std={"0": (1.0, -0.5)}), "b_std"),
        (dict(std={"0": 1.0}), "pair"),
        (dict(W_std=-1.0), "W_std"),
        (dict(W_std=0.0), "W_std"),
        (dict(W_std=float("nan")), "W_std"),
        (dict(b_std=-0.1), "b_std"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ntk_parametrize(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), **kwargs)


@pytest.mark.parametrize(
    "module,typename",
    [
        (nn.Embedding(10, 4, max_norm=1.0), "Embedding"),
        (nn.LSTM(4, 4, proj_size=2), "LSTM"),
        (nn.MultiheadAttention(4, 2), "MultiheadAttention"),
        (nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d"),
        (nn.PReLU(), "PReLU"),
    ],
)
def test_unsupported_modules_raise_naming_the_module(module, typename):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.add_module("odd", module)
    with pytest.raises(NotImplementedError, match=rf"'odd'.*{typename}"):
        ntk_parametrize(model)


def test_embedding_rows_are_W_std_times_standard_normal():
    """Rows ``W_std * w`` without a fan-in factor (ops/embedding.py's convention); the
    padding row is zero and SGD keeps it zero (its gradient is zero)."""
    torch.manual_seed(2)
    net = ntk_parametrize(nn.Sequential(nn.Embedding(10, 6, padding_idx=3), nn.Linear(6, 1)), 1.7, 0.2)
    w = _stored(net[0], "weight").detach()
    assert ntk_scales(net)["0"] == NTKScale(1.7, 0.2, 1, False)
    torch.testing.assert_close(net[0].weight, 1.7 * w, rtol=0, atol=0)
    assert float(w[3].abs().max()) == 0.0 and float(w.std()) > 0.5
    tokens = torch.tensor([[1, 3, 5], [3, 3, 0]])
    torch.testing.assert_close(net[0](tokens), 1.7 * w[tokens], rtol=0, atol=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(tokens).sum().backward()
    opt.step()
    assert float(_stored(net[0], "weight").detach()[3].abs().max()) == 0.0


def test_norm_and_parameter_free_layers_keep_pytorch_init():
    model = nn.Sequential(
        nn.Linear(3, 6), nn.LayerNorm(6), nn.GELU(), nn.Dropout(0.0), nn.Identity(),
        nn.GroupNorm(2, 6), nn.Linear(6, 1),
    )
    torch.manual_seed(0)
    net = ntk_parametrize(model, 1.0, 1.0)
    assert set(ntk_scales(net)) == {"0", "6"}
    for i in (1, 5):
        assert type(net[i]) is type(model[i])
        assert torch.equal(net[i].weight, torch.ones(6)) and torch.equal(net[i].bias, torch.zeros(6))
        assert net[i].weight.requires_grad
    names = {n for n, _ in net.named_parameters()}
    assert {"1.weight", "1.bias", "5.weight", "5.bias", "0.parametrizations.weight.original"} <= names


def test_already_parametrized_model_is_refused():
    net = ntk_parametrize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already parametrized"):
        ntk_parametrize(net)


def test_gradients_are_ntk_parametrization_gradients():
    """dL/dw = (W_std / sqrt(fan_in)) dL/dW and dL/dbeta = b_std dL/db."""
    torch.manual_seed(2)
    net = ntk_parametrize(_mlp(True), 1.4, 0.6)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    F.mse_loss(net(x), y).backward()

    Ws = [(1.4 / math.sqrt(f) * _stored(m, "weight")).detach().requires_grad_() for m, f in ((net[0], 4), (net[2], 7))]
    bs = [(0.6 * _stored(m, "bias")).detach().requires_grad_() for m in (net[0], net[2])]
    out = F.linear(torch.tanh(F.linear(x, Ws[0], bs[0])), Ws[1], bs[1])
    F.mse_loss(out, y).backward()
    for m, W, b, f in zip((net[0], net[2]), Ws, bs, (4, 7)):
        torch.testing.assert_close(_stored(m, "weight").grad, 1.4 / math.sqrt(f) * W.grad)
        torch.testing.assert_close(_stored(m, "bias").grad, 0.6 * b.grad)


def test_sgd_and_functional_call():
    torch.manual_seed(3)
    net = ntk_parametrize(_mlp(True), 1.0, 0.5)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.testing.assert_close(functional_call(net, params, (x,)), net(x))

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    F.mse_loss(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - 0.1 * grads[n])
    # The forward after the step uses the updated N(0, 1)-scale tensors.
    moved = {n: params[n] - 0.1 * grads[n] for n in params}
    torch.testing.assert_close(net(x), functional_call(net, moved, (x,)))


def test_result_survives_deepcopy_and_state_dict():
    torch.manual_seed(4)
    net = ntk_parametrize(_mlp(True), 1.2, 0.2)
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4)
    torch.testing.assert_close(twin(x), net(x))
    assert ntk_scales(twin) == ntk_scales(net)
    fresh = ntk_parametrize(_mlp(True), 1.2, 0.2)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x))


def test_ntk_scales_of_a_plain_model_raises():
    with pytest.raises(ValueError, match="ntk_parametrize"):
        ntk_scales(nn.Linear(2, 2))


# ------------------------------------------------------------ recurrent modules
#
# Oracle: PyTorch's documented cell equations written out here, with every weight
# rebuilt from its stored N(0, 1) tensor and a fan-in counted from the module's
# constructor arguments (never from the weight's shape).


def _rnn_step(nonlinearity):
    def step(x, state, W_ih, W_hh, b_ih, b_hh):
        return (nonlinearity(x @ W_ih.T + b_ih + state[0] @ W_hh.T + b_hh),)
    return step


def _gru_step(x, state, W_ih, W_hh, b_ih, b_hh):
    (h,) = state
    a_r, a_z, a_n = (x @ W_ih.T + b_ih).chunk(3, -1)
    g_r, g_z, g_n = (h @ W_hh.T + b_hh).chunk(3, -1)
    r, z = torch.sigmoid(a_r + g_r), torch.sigmoid(a_z + g_z)
    n = torch.tanh(a_n + r * g_n)
    return ((1 - z) * n + z * h,)


def _lstm_step(x, state, W_ih, W_hh, b_ih, b_hh):
    h, c = state
    i, f, g, o = (x @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c), c)


STEPS = {"RNN_TANH": _rnn_step(torch.tanh), "RNN_RELU": _rnn_step(torch.relu), "GRU": _gru_step, "LSTM": _lstm_step}
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _gate_scale(v, hidden):
    v = torch.as_tensor(v, dtype=torch.float64)
    return v.repeat_interleave(hidden)[:, None] if v.ndim else v


def _weights(m, entry, fan_in, W_std, b_std, hidden):
    """``(W_ih/W_hh, bias)`` of one entry rebuilt from the stored N(0, 1) tensors."""
    W = _gate_scale(W_std, hidden) / math.sqrt(fan_in) * _stored(m, "weight_" + entry).double()
    if not hasattr(m.parametrizations, "bias_" + entry):
        return W, torch.zeros(W.shape[0], dtype=torch.float64)
    b = _gate_scale(b_std, hidden).reshape(-1) * _stored(m, "bias_" + entry).double()
    return W, b


def _hand_rnn(m, mode, x, std_of):
    """Multi-layer, maybe bidirectional recurrence; ``std_of(entry) -> (W_std, b_std)``."""
    if m.batch_first:
        x = x.transpose(0, 1)
    T, N, _ = x.shape
    H, dirs = m.hidden_size, 2 if m.bidirectional else 1
    step = STEPS[mode]
    finals = []
    for layer in range(m.num_layers):
        fan_ih = m.input_size if layer == 0 else H * dirs
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            W_ih, b_ih = _weights(m, "ih" + sfx, fan_ih, *std_of("ih" + sfx), H)
            W_hh, b_hh = _weights(m, "hh" + sfx, H, *std_of("hh" + sfx), H)
            state = tuple(torch.zeros(N, H, dtype=x.dtype) for _ in range(2 if mode == "LSTM" else 1))
            seq = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                state = step(x[t], state, W_ih, W_hh, b_ih, b_hh)
                seq[t] = state[0]
            outs.append(torch.stack(seq))
            finals.append(state)
        x = torch.cat(outs, -1)
    return (x.transpose(0, 1) if m.batch_first else x), finals


def _module(mode, **kw):
    if mode.startswith("RNN"):
        return nn.RNN(nonlinearity=mode[4:].lower(), **kw)
    return getattr(nn, mode)(**kw)


@pytest.mark.parametrize("mode", list(STEPS))
@pytest.mark.parametrize("layers,bidirectional,bias,batch_first",
                         [(1, False, True, False), (2, True, True, True), (2, False, False, False), (1, True, False, True)])
def test_recurrent_forward_matches_hand_built(mode, layers, bidirectional, bias, batch_first):
    torch.manual_seed(5)
    rnn = _module(mode, input_size=3, hidden_size=6, num_layers=layers, bidirectional=bidirectional,
                  bias=bias, batch_first=batch_first).double()
    net = ntk_parametrize(rnn, 1.3, 0.4)
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3), dtype=torch.float64)
    out, state = net(x)
    expect, finals = _hand_rnn(net, mode, x, lambda entry: (1.3, 0.4))
    torch.testing.assert_close(out, expect)
    h_n = state[0] if mode == "LSTM" else state
    torch.testing.assert_close(h_n, torch.stack([f[0] for f in finals]))
    if mode == "LSTM":
        torch.testing.assert_close(state[1], torch.stack([f[1] for f in finals]))
    dirs = 2 if bidirectional else 1
    for layer in range(layers):
        for sfx in ("", "_reverse")[:dirs]:
            s_ih = ntk_scales(net)[f"ih_l{layer}{sfx}"]
            assert s_ih.fan_in == (3 if layer == 0 else 6 * dirs) and s_ih.has_bias == bias
            assert ntk_scales(net)[f"hh_l{layer}{sfx}"] == NTKScale(1.3, 0.4, 6, bias)


def test_per_gate_and_per_weight_overrides():
    torch.manual_seed(6)
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2), )
    std = {"0": ((1.0, 2.0, 0.5), 0.3), "0.hh_l1": (0.7, (0.1, 0.0, 0.2))}
    net = ntk_parametrize(model, 1.1, 0.0, std=std)
    scales = ntk_scales(net)
    assert scales["0.ih_l0"] == NTKScale((1.0, 2.0, 0.5), 0.3, 3, True)
    assert scales["0.hh_l1"] == NTKScale(0.7, (0.1, 0.0, 0.2), 4, True)
    x = torch.randn(5, 2, 3)
    std_of = lambda entry: std["0." + entry] if "0." + entry in std else std["0"]
    expect, _ = _hand_rnn(net[0], "GRU", x.double(), std_of)
    torch.testing.assert_close(net(x)[0].double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("std,match", [
    ({"0": ((1.0, 2.0), 0.0)}, "one per gate"),
    ({"0.ih_l3": (1.0, 0.0)}, "names no module"),
    ({"0.ih_l0": ((1.0, -1.0, 1.0), 0.0)}, "W_std"),
    ({"1": ((1.0, 1.0), 0.0)}, "pair"),
])
def test_bad_recurrent_overrides_raise(std, match):
    with pytest.raises(ValueError, match=match):
        ntk_parametrize(nn.Sequential(nn.GRU(3, 4), nn.Linear(4, 1)), std=std)


@pytest.mark.parametrize("cls,mode", [(nn.RNNCell, "RNN_TANH"), (nn.GRUCell, "GRU"), (nn.LSTMCell, "LSTM")])
@pytest.mark.parametrize("bias", [True, False])
def test_recurrent_cells_match_hand_built(cls, mode, bias):
    torch.manual_seed(7)
    cell = ntk_parametrize(cls(3, 5, bias=bias).double(), 0.9, 0.6)
    assert ntk_scales(cell) == {"ih": NTKScale(0.9, 0.6, 3, bias), "hh": NTKScale(0.9, 0.6, 5, bias)}
    x, h, c = (torch.randn(4, n, dtype=torch.float64) for n in (3, 5, 5))
    W_ih, b_ih = _weights(cell, "ih", 3, 0.9, 0.6, 5)
    W_hh, b_hh = _weights(cell, "hh", 5, 0.9, 0.6, 5)
    state = (h, c) if mode == "LSTM" else (h,)
    expect = STEPS[mode](x, state, W_ih, W_hh, b_ih, b_hh)
    got = cell(x, state if mode == "LSTM" else h)
    got = got if mode == "LSTM" else (got,)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b)


class _LastStep(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.v = rnn, nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 1)

    def forward(self, x):
        return self.v(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_torch_func_differentiates_the_standard_normal_tensors(mode):
    """functional_call + jacrev give d out / d w = scale * d out / d W, and the forward
    follows in-place updates of the stored tensors (the flat-weight refresh)."""
    torch.manual_seed(8)
    net = ntk_parametrize(_LastStep(_module(mode, input_size=3, hidden_size=4, batch_first=True,
                                            bidirectional=True)).double(), 1.5, 0.5)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)

    def hand(p):
        tensors = {n.split(".")[2]: v for n, v in p.items() if n.startswith("rnn.")}
        m = SimpleNamespace(input_size=3, hidden_size=4, num_layers=1, bidirectional=True, batch_first=True,
                            parametrizations=SimpleNamespace(**{k: SimpleNamespace(original=v) for k, v in tensors.items()}))
        out, _ = _hand_rnn(m, mode, x, lambda entry: (1.5, 0.5))
        w = 1.5 / math.sqrt(8) * p["v.parametrizations.weight.original"]
        return out[:, -1] @ w.T + 0.5 * p["v.parametrizations.bias.original"]

    expect = jacrev(hand)(params)
    assert set(jac) == set(expect) and any("weight_hh_l0_reverse" in n for n in jac)
    for n in jac:
        torch.testing.assert_close(jac[n], expect[n], msg=n)

    # A plain SGD step on the stored tensors moves the torch module's forward too.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.testing.assert_close(net(x), hand(moved))
    # empirical_ntk over whole batches (torch's fused RNN ops have no vmap rule) is J J^T.
    J = torch.cat([j.reshape(2, -1) for j in jacrev(hand)(moved).values()], 1)
    torch.testing.assert_close(empirical_ntk(net, x, per_example=False), J @ J.T)


def test_recurrent_result_survives_deepcopy_and_state_dict():
    torch.manual_seed(9)
    net = ntk_parametrize(nn.LSTM(3, 4, num_layers=2, bidirectional=True), 1.2, 0.2)
    x = torch.randn(5, 2, 3)
    before = net(x)[0]      # after a forward, _flat_weights hold non-leaf tensors: still copyable
    twin = copy.deepcopy(net)
    assert isinstance(twin, nn.LSTM) and twin._flat_weights[0] is not net._flat_weights[0]
    torch.testing.assert_close(twin(x)[0], before)
    with torch.no_grad():   # the copy owns its tensors
        twin.parametrizations.weight_hh_l1.original.zero_()
    torch.testing.assert_close(net(x)[0], before)
    fresh = ntk_parametrize(nn.LSTM(3, 4, num_layers=2, bidirectional=True), 1.2, 0.2)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x)[0], net(x)[0])
    torch.testing.assert_close(net.double()(x.double())[0], before.double(), rtol=1e-5, atol=1e-6)


class _BarePos(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.pos, self.out = nn.Linear(3, 8), nn.Parameter(torch.full((4, 8), 7.0)), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.l(x) + self.pos)


def test_bare_parameters_named_as_biases_are_drawn_and_scaled():
    """``biases=``: a bare parameter is a bias, ``b_std * beta`` with a fresh N(0, 1) ``beta``
    (``std[name]`` over ``std[owner]`` over the default), as compile() takes it."""
    with pytest.raises(UnsupportedOpError, match="owns parameters"):
        ntk_parametrize(_BarePos(), 1.0, 0.1)
    with pytest.raises(ValueError, match="names no parameter"):
        ntk_parametrize(_BarePos(), 1.0, 0.1, biases=("nope",))
    torch.manual_seed(0)
    net = ntk_parametrize(_BarePos(), 1.0, 0.1, std={"pos": (1.0, 0.5)}, biases=("pos",))
    beta = net.parametrizations.pos.original.detach()
    assert not torch.all(beta == 7.0) and abs(float(beta.std()) - 1.0) < 0.35     # redrawn N(0, 1), 32 draws
    torch.testing.assert_close(net.pos.detach(), 0.5 * beta)
    net = ntk_parametrize(_BarePos(), 1.0, 0.1, biases=("pos",))
    torch.testing.assert_close(net.pos, 0.1 * net.parametrizations.pos.original)
