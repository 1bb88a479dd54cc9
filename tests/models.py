"""Ordinary PyTorch models used across the tests (written as a user would)."""
import torch
from torch import nn


class Erf(nn.Module):
    def forward(self, x):
        return torch.special.erf(x)


def mlp(d, n, act, depth=2, out=1, bias=True):
    layers, fan = [], d
    for _ in range(depth):
        layers += [nn.Linear(fan, n, bias=bias), act()]
        fan = n
    return nn.Sequential(*layers, nn.Linear(fan, out, bias=bias))


class ResidualMLP(nn.Module):
    """``h = Linear(x); h = h + Linear(relu(h))`` x2; relu; readout (the reference resnet_mlp)."""

    def __init__(self, d, n):
        super().__init__()
        self.inp = nn.Linear(d, n)
        self.blocks = nn.ModuleList([nn.Linear(n, n) for _ in range(2)])
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(torch.relu(h))
        return self.out(torch.relu(h))


class PostActivationResidual(nn.Module):
    """``h = relu(Linear(x)); h = relu(h + Linear(relu(Linear(h))))`` (ResNet v1 as an MLP):
    the block's output is an H-var of two G-vars, whose pair expectations are N-D ones."""

    def __init__(self, d, n):
        super().__init__()
        self.a, self.b, self.c, self.o = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(h + self.c(torch.relu(self.b(h))))
        return self.o(h)


class CorrelatedResidual(nn.Module):
    """Residual branches that are *not* independent: ``h + tanh(h)``."""

    def __init__(self, d, n):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, 1)

    def forward(self, x):
        h = self.a(x)
        h = h + torch.tanh(h)
        h = self.b(h)
        h = h + torch.tanh(h)
        return self.o(h)


class SharedLinear(nn.Module):
    """The same hidden Linear applied twice (weight sharing)."""

    def __init__(self, d, n):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(d, n), nn.Linear(n, n), nn.Linear(n, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.relu(self.b(h))
        return self.o(h)


class AffineLayerNormMLP(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.a, self.ln, self.b, self.o = nn.Linear(d, n), nn.LayerNorm(n), nn.Linear(n, n), nn.Linear(n, 1)

    def forward(self, x):
        return self.o(torch.relu(self.b(torch.tanh(self.ln(self.a(x))))))


class ConcatMLP(nn.Module):
    """Concatenation along the width axis of branches of different widths (n and 2n)."""

    def __init__(self, d, n):
        super().__init__()
        self.a, self.c = nn.Linear(d, n), nn.Linear(d, 2 * n)
        self.b, self.o = nn.Linear(3 * n, n), nn.Linear(n, 1)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.c(x))], dim=-1)
        return self.o(torch.relu(self.b(h)))


class GatedMLP(nn.Module):
    """An elementwise product of two H-vars (GLU-style gate)."""

    def __init__(self, d, n):
        super().__init__()
        self.a, self.c, self.o = nn.Linear(d, n), nn.Linear(d, n), nn.Linear(n, 1)

    def forward(self, x):
        return self.o(torch.sigmoid(self.a(x)) * torch.tanh(self.c(x)))


class ConvResNet(nn.Module):
    """A small conv ResNet: stride-2 conv, residual blocks, global average pooling."""

    def __init__(self, c, n):
        super().__init__()
        self.stem = nn.Conv2d(c, n, 3, padding=1)
        self.down = nn.Conv2d(n, n, 3, stride=2, padding=1)
        self.block = nn.Conv2d(n, n, 3, padding="same")
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.down(h)
        h = h + self.block(torch.relu(h))
        return self.out(torch.relu(h).mean(dim=(2, 3)))


class DilatedConv1d(nn.Module):
    def __init__(self, c, n):
        super().__init__()
        self.a = nn.Conv1d(c, n, 3, dilation=2, padding=2)
        self.b = nn.Conv1d(n, n, 2, stride=2)
        self.out = nn.Linear(n * 4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.relu(self.a(x)))).flatten(1))


class PooledCNN(nn.Module):
    """Average pooling inside the network (between two convolutions), flatten readout."""

    def __init__(self, c, n):
        super().__init__()
        self.a = nn.Conv2d(c, n, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.b = nn.Conv2d(n, n, 3, padding=1)
        self.out = nn.Linear(n * 9, 1)

    def forward(self, x):
        h = self.pool(torch.relu(self.a(x)))
        return self.out(torch.tanh(self.b(h)).flatten(1))


class PoolThenReLU(nn.Module):
    """Pooling of a Gaussian (conv output) is Gaussian: a nonlinearity may follow."""

    def __init__(self, c, n):
        super().__init__()
        self.a = nn.Conv1d(c, n, 3, padding=1)
        self.b = nn.Conv1d(n, n, 2)
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = torch.relu(nn.functional.avg_pool1d(self.a(x), 2, stride=2, padding=1))
        return self.out(torch.relu(self.b(h)).mean(-1))


class BatchNormCNN(nn.Module):
    """Conv -> BatchNorm2d (eval mode, initial statistics, affine) -> tanh -> GAP readout."""

    def __init__(self, c, n):
        super().__init__()
        self.a, self.bn = nn.Conv2d(c, n, 3, padding=1), nn.BatchNorm2d(n)
        self.out = nn.Linear(n, 1)
        self.eval()

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.a(x))).mean(dim=(2, 3)))
