"""PyTorch modules shared by export_torch.py and bench/bench.py (PyTorch needed to import)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes, act):
    """Linear layers of the given sizes with `act` between them."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """A residual block: conv, BatchNorm, ReLU, conv, BatchNorm, skip, ReLU."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """A small ResNet with BatchNormalization: stem, two residual blocks, global mean, linear head."""

    def __init__(self, channels=8, classes=5, downsample=True):
        super().__init__()
        stem = [nn.Conv2d(3, channels, 3, stride=2 if downsample else 1, padding=1, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU()]
        if downsample:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention written out (nn.MultiheadAttention lowers to an op that the
    TorchScript exporter supports only from opset 14)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        n, s, d = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(n, s, d))


class Encoder(nn.Module):
    """A pre-norm transformer encoder block: LayerNorm, multi-head attention, GELU feed-forward."""

    def __init__(self, d=16, heads=4, ff=32):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


def trained_looking_norms(model, g=None):
    """Normalisation parameters and statistics that look trained, not 1 and 0 (identical initial
    values would also be merged into one initializer by the exporter)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
