"""The tutorial's U-Net in PyTorch, layer for layer ddpm/unet.py, as a reference to time ours against.

Same layers, shapes and parameter count (2,992,180 with the tutorial's model section, the defaults
below; 1,039,836 with params.yaml's dim 16), and
MindSpore's conventions where PyTorch's defaults differ: convs have no bias unless MindSpore's
network gives them one (nn.Conv2d's has_bias=False default), GELU is the tanh approximation
(nn.GELU's default). Initialisation is PyTorch's: the timings do not depend on it.
Imports neither MindSpore nor ddpm (importing ddpm sets MindSpore's oneDNN ISA cap for the process).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml
from torch import nn

NORM_EPS = 1e-5  # the tutorial's LayerNorm and GroupNorm epsilon
POSITION_SCALE = 10000.0  # Transformer sinusoid base (Vaswani et al., 2017)
HEADS, DIM_HEAD = 4, 32  # both attentions, as in ddpm/unet.py


@dataclass(frozen=True)
class UnetConfig:
    """A params file's model section; the defaults are the tutorial's network."""

    image_size: int = 28
    channels: int = 1
    dim: int = 28
    dim_mults: tuple[int, ...] = (1, 2, 4)
    convnext_mult: int = 2

    @classmethod
    def from_params(cls, path: str | Path) -> UnetConfig:
        """Read the model section of a params file; unknown keys are errors."""
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown model keys {unknown}; the model section takes {[f.name for f in fields(cls)]}"
            )
        if "dim_mults" in section:
            section = {**section, "dim_mults": tuple(section["dim_mults"])}
        return cls(**section)


def gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")  # MindSpore's nn.GELU default


def conv(
    c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False, groups: int = 1
) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=bias)


class SinusoidalPositionEmbeddings(nn.Module):
    """(B,) integer timesteps -> (B, dim) [sin | cos] features."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(POSITION_SCALE) / (half - 1)))
        self.register_buffer("freqs", freqs.float()[None, :], persistent=False)  # (1, dim/2)

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs  # (B, 1) * (1, dim/2) -> (B, dim/2)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (B, dim)


class ConvNextBlock(nn.Module):
    """ConvNeXt block (Liu et al., 2022) with the time embedding added after the depthwise conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int | None = None, mult: int = 2):
        super().__init__()
        self.mlp = nn.Sequential(gelu(), nn.Linear(time_emb_dim, dim)) if time_emb_dim else None
        self.ds_conv = conv(dim, dim, 7, padding=3, groups=dim)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim, eps=NORM_EPS),
            conv(dim, dim_out * mult, 3, padding=1),
            gelu(),
            nn.GroupNorm(1, dim_out * mult, eps=NORM_EPS),
            conv(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = conv(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None):
        h = self.ds_conv(x)
        if self.mlp is not None and time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None]  # (B, dim) -> (B, dim, 1, 1)
        return self.net(h) + self.res_conv(x)


def split_qkv(qkv, heads: int):
    """(B, 3*heads*d, H, W) -> q, k, v, each (B, heads, d, H*W)."""
    b, _, h, w = qkv.shape
    return (part.reshape(b, heads, -1, h * w) for part in qkv.chunk(3, dim=1))


class Attention(nn.Module):
    """Full softmax self-attention over all positions (used once, at the lowest resolution)."""

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD):
        super().__init__()
        hidden = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_qkv = conv(dim, hidden * 3, 1)
        self.to_out = conv(hidden, dim, 1, bias=True)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = split_qkv(self.to_qkv(x), self.heads)
        attn = (q * self.scale).transpose(2, 3).matmul(k).softmax(dim=-1)  # (B, heads, HW, HW)
        out = attn.matmul(v.transpose(2, 3))  # (B, heads, HW, d)
        return self.to_out(out.transpose(2, 3).reshape(b, -1, h, w))  # -> (B, heads*d, H, W)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels with a gain and no bias (the tutorial's custom LayerNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + NORM_EPS) * self.g


class LinearAttention(nn.Module):
    """Linear attention (Shen et al., 2018): softmax on q over features, on k over positions."""

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD):
        super().__init__()
        hidden = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_qkv = conv(dim, hidden * 3, 1)
        self.to_out = nn.Sequential(conv(hidden, dim, 1, bias=True), ChannelLayerNorm(dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = split_qkv(self.to_qkv(x), self.heads)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = k.matmul(v.transpose(2, 3))  # (B, heads, d, d)
        out = context.transpose(2, 3).matmul(q)  # (B, heads, d, HW)
        return self.to_out(out.reshape(b, -1, h, w))  # -> (B, heads*d, H, W)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim, eps=NORM_EPS)

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def downsample(dim: int) -> nn.Module:
    return conv(dim, dim, 4, stride=2, padding=1)  # (H, W) -> (H/2, W/2)


def upsample(dim: int) -> nn.Module:
    return nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1, bias=False)  # (H, W) -> (2H, 2W)


class Level(nn.Module):
    """Two ConvNeXt blocks, residual linear attention, then a resampling layer."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, mult: int, resample: nn.Module):
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_dim, mult)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_dim, mult)
        self.attn = Residual(PreNorm(dim_out, LinearAttention(dim_out)))
        self.resample = resample

    def forward(self, x, t):
        x = self.attn(self.block2(self.block1(x, t), t))
        return x, self.resample(x)


class Unet(nn.Module):
    """Predicts the noise in x_t: (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, dim: int, channels: int = 1, dim_mults: tuple[int, ...] = (1, 2, 4), convnext_mult: int = 2):
        super().__init__()
        init_dim = dim // 3 * 2
        self.init_conv = conv(channels, init_dim, 7, padding=3, bias=True)
        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(itertools.pairwise(dims))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim), gelu(), nn.Linear(time_dim, time_dim)
        )

        last = len(in_out) - 1
        self.downs = nn.ModuleList(
            [
                Level(d_in, d_out, time_dim, convnext_mult, downsample(d_out) if i < last else nn.Identity())
                for i, (d_in, d_out) in enumerate(in_out)
            ]
        )
        mid_dim = dims[-1]
        self.mid_block1 = ConvNextBlock(mid_dim, mid_dim, time_dim, convnext_mult)
        self.mid_attn = Residual(PreNorm(mid_dim, Attention(mid_dim)))
        self.mid_block2 = ConvNextBlock(mid_dim, mid_dim, time_dim, convnext_mult)
        # Up levels mirror all downs but the first; the tutorial never uses the first level's skip.
        self.ups = nn.ModuleList(
            [Level(d_out * 2, d_in, time_dim, convnext_mult, upsample(d_in)) for d_in, d_out in reversed(in_out[1:])]
        )
        self.final_conv = nn.Sequential(ConvNextBlock(dim, dim, mult=convnext_mult), conv(dim, channels, 1))

    def forward(self, x, time):
        x = self.init_conv(x)
        t = self.time_mlp(time)
        skips = []
        for level in self.downs:
            skip, x = level(x, t)
            skips.append(skip)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for i, level in enumerate(self.ups):
            x = torch.cat((x, skips[-1 - i]), dim=1)  # (B, C, H, W) -> (B, 2C, H, W)
            _, x = level(x, t)
        return self.final_conv(x)


def build_unet(config: UnetConfig) -> Unet:
    return Unet(config.dim, config.channels, config.dim_mults, config.convnext_mult)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
