"""Attention, softmax and token mixing without a Gaussian limit are refused with the reason
and the form that has one (ops/attention.py, ops/linear.py): never a kernel that ignores
them.  The 1/n form compiles (tests/ops/test_attention.py has its oracle)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkcompile
from ntkcompile.errors import UnsupportedOpError, WidthInferenceError

T, D, N = 4, 3, 16


def _x():
    return torch.randn(2, T, D, generator=torch.Generator().manual_seed(0))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.att, self.out = nn.Linear(D, N), nn.MultiheadAttention(N, 2, batch_first=True), nn.Linear(N, 1)

    def forward(self, x):
        h = self.emb(x)
        return self.out(self.att(h, h, h)[0].mean(1))


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(D, N)
        self.layer = nn.TransformerEncoderLayer(N, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(N, 1)

    def forward(self, x):
        return self.out(self.layer(self.emb(x)).mean(1))


class SDPA(nn.Module):
    def __init__(self, scale=None):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, 1)
        self.scale = scale

    def forward(self, x):
        kw = {} if self.scale is None else {"scale": self.scale}
        return self.out(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), **kw).mean(1))


class ByHand(nn.Module):
    """softmax(q k^T / n) v, as Tensor Programs write it."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], dim=-1)
        return self.out((a @ self.v(x)).mean(1))


class Softmax(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim, self.l, self.out = dim, nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(torch.softmax(self.l(x), dim=self.dim).mean(1))


class Mixer(nn.Module):
    """MLP-Mixer's token mixing: a Linear over the positions axis."""

    def __init__(self):
        super().__init__()
        self.emb, self.tok, self.out = nn.Linear(D, N), nn.Linear(T, T), nn.Linear(N, 1)

    def forward(self, x):
        h = self.emb(x)                                    # (B, T, n)
        h = self.tok(h.transpose(1, 2)).transpose(1, 2)    # mixes the T positions
        return self.out(torch.relu(h).mean(1))


@pytest.mark.parametrize("model,match", [
    (MHA, "nn.MultiheadAttention scales the attention logits by 1/sqrt"),
    (EncoderLayer, "nn.TransformerEncoderLayer scales the attention logits by 1/sqrt"),
    (SDPA, "without scale= scales the attention logits by 1/sqrt"),
    (lambda: Softmax(-1), "softmax over the width axis"),
    (lambda: Softmax(1), "softmax over positions"),
])
def test_attention_and_softmax_are_refused_with_the_reason(model, match):
    with pytest.raises(UnsupportedOpError, match=match) as info:
        ntkcompile.compile(model().eval(), input_shape=(T, D))
    text = str(info.value)
    assert "source:" in text                                   # the user's line is named
    if "sqrt" in match:
        assert "1/n" in text and "Hron" in text                # the form that has a limit, and why not


class MeanOfValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(D, N), nn.Linear(D, N), nn.Linear(D, N), nn.Linear(N, 1)

    def forward(self, x):
        return self.out(self.v(x).mean(1))


@pytest.mark.parametrize("model", [ByHand, lambda: SDPA(1 / N)])
def test_the_one_over_n_form_compiles_untied_queries_attend_uniformly(model):
    """Query and key of independent matrices: limit logits 0, uniform attention, so the
    output averaged over positions is the values' average."""
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ntkcompile.compile(model(), W_std=1.3, b_std=0.2)(x)
    want = ntkcompile.compile(MeanOfValues(), W_std=1.3, b_std=0.2)(x)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-13, atol=1e-13)


def test_token_mixing_is_refused_as_a_finite_random_matrix():
    with pytest.raises(WidthInferenceError, match="finite random matrix"):
        ntkcompile.compile(Mixer(), input_shape=(T, D))
