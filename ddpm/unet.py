"""The tutorial's U-Net: ConvNeXt blocks, linear attention at every level, full attention in the middle.

Layer for layer the network of MindSpore's diffusion tutorial (a port of Hugging Face's Annotated
Diffusion), without its dead code. `Unet(dim=28, channels=1, dim_mults=(1, 2, 4))` has
2,992,180 trainable parameters. Convs keep MindSpore's default of no bias unless noted.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ddpm.kernels.attention import NativeChannelLayerNorm, full_attention_core, linear_attention_core
from ddpm.kernels.build import native_library
from ddpm.layers import conv2d, conv_transpose2d, depthwise_conv, gelu, group_norm

NORM_EPS = 1e-5  # the tutorial's LayerNorm and GroupNorm epsilon
POSITION_SCALE = 10000.0  # Transformer sinusoid base (Vaswani et al., 2017)


class SinusoidalPositionEmbeddings(nn.Cell):
    """(B,) integer timesteps -> (B, dim) [sin | cos] features."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = np.exp(np.arange(half) * -(math.log(POSITION_SCALE) / (half - 1)))
        self.freqs = ms.Tensor(freqs[None, :], ms.float32)  # (1, dim/2)

    def construct(self, t):
        angles = t.astype(ms.float32)[:, None] * self.freqs  # (B, 1) * (1, dim/2) -> (B, dim/2)
        return ops.cat((ops.sin(angles), ops.cos(angles)), axis=-1)  # (B, dim)


class ConvNextBlock(nn.Cell):
    """ConvNeXt block (Liu et al., 2022) with the time embedding added after the depthwise conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int | None = None, mult: int = 2, norm: bool = True,
                 fast: bool = True):
        super().__init__()
        self.mlp = nn.SequentialCell(gelu(fast), nn.Dense(time_emb_dim, dim)) if time_emb_dim else None
        self.ds_conv = depthwise_conv(dim, 7, fast)
        self.net = nn.SequentialCell(
            group_norm(dim, NORM_EPS, fast) if norm else nn.Identity(),
            conv2d(dim, dim_out * mult, 3, padding=1, fast=fast),
            gelu(fast),
            group_norm(dim_out * mult, NORM_EPS, fast),
            conv2d(dim_out * mult, dim_out, 3, padding=1, fast=fast),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def construct(self, x, time_emb=None):
        h = self.ds_conv(x)
        if self.mlp is not None and time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None]  # (B, dim) -> (B, dim, 1, 1)
        h = self.net(h)
        return h + self.res_conv(x)


def split_heads(x, heads: int):
    """(B, heads*d, H, W) -> (B, heads, d, H*W)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w)


def split_qkv(qkv, heads: int):
    """(B, 3*heads*d, H, W), the to_qkv conv's output -> q, k, v, each (B, heads, d, H*W)."""
    q, k, v = ops.chunk(qkv, 3, axis=1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


class Attention(nn.Cell):
    """Full softmax self-attention over all positions (used once, at the lowest resolution)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, fast: bool = True):
        super().__init__()
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1)
        library = native_library() if fast else None
        scale = dim_head ** -0.5
        self.attend = full_attention_core(library, heads, scale) if library else _FullAttention(heads, scale)
        self.to_out = nn.Conv2d(hidden, dim, 1, has_bias=True)

    def construct(self, x):
        return self.to_out(self.attend(self.to_qkv(x)))


class _FullAttention(nn.Cell):
    """(B, 3 * heads * d, H, W) q, k, v -> (B, heads * d, H, W), in MindSpore's own operators."""

    def __init__(self, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale

    def construct(self, qkv):
        b, _, h, w = qkv.shape
        q, k, v = split_qkv(qkv, self.heads)
        q = q * self.scale
        attn = ops.softmax(ops.matmul(q.swapaxes(2, 3), k), axis=-1)  # (B, heads, HW, HW)
        out = ops.matmul(attn, v.swapaxes(2, 3))  # (B, heads, HW, d)
        return out.swapaxes(2, 3).reshape(b, -1, h, w)  # (B, heads, d, HW) -> (B, heads*d, H, W)


class ChannelLayerNorm(nn.Cell):
    """LayerNorm over channels with a gain and no bias (the tutorial's custom LayerNorm)."""

    def __init__(self, dim: int, fast: bool = True):
        super().__init__()
        self.g = ms.Parameter(ops.ones((1, dim, 1, 1), ms.float32), name="g")
        library = native_library() if fast else None
        self.normalize = NativeChannelLayerNorm(library, NORM_EPS) if library else _ChannelNorm(NORM_EPS)

    def construct(self, x):
        return self.normalize(x, self.g)


class _ChannelNorm(nn.Cell):
    """(x, g) -> the channel LayerNorm in MindSpore's own operators."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def construct(self, x, g):
        mean = x.mean(axis=1, keep_dims=True)
        var = ((x - mean) ** 2).mean(axis=1, keep_dims=True)
        return (x - mean) * ops.rsqrt(var + self.eps) * g


class LinearAttention(nn.Cell):
    """Linear attention (Shen et al., 2018): softmax on q over features, on k over positions."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, fast: bool = True):
        super().__init__()
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1)
        library = native_library() if fast else None
        scale = dim_head ** -0.5
        self.attend = linear_attention_core(library, heads, scale) if library else _LinearAttention(heads, scale)
        self.to_out = nn.SequentialCell(nn.Conv2d(hidden, dim, 1, has_bias=True), ChannelLayerNorm(dim, fast))

    def construct(self, x):
        return self.to_out(self.attend(self.to_qkv(x)))


class _LinearAttention(nn.Cell):
    """(B, 3 * heads * d, H, W) q, k, v -> (B, heads * d, H, W), in MindSpore's own operators."""

    def __init__(self, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale

    def construct(self, qkv):
        b, _, h, w = qkv.shape
        q, k, v = split_qkv(qkv, self.heads)
        q = ops.softmax(q, axis=-2) * self.scale
        k = ops.softmax(k, axis=-1)
        v = v / (h * w)
        context = ops.matmul(k, v.swapaxes(2, 3))  # (B, heads, d, d)
        out = ops.matmul(context.swapaxes(2, 3), q)  # (B, heads, d, HW)
        return out.reshape(b, -1, h, w)  # (B, heads, d, HW) -> (B, heads*d, H, W)


class PreNorm(nn.Cell):
    def __init__(self, dim: int, fn: nn.Cell, fast: bool = True):
        super().__init__()
        self.fn = fn
        self.norm = group_norm(dim, NORM_EPS, fast)

    def construct(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Cell):
    def __init__(self, fn: nn.Cell):
        super().__init__()
        self.fn = fn

    def construct(self, x):
        return self.fn(x) + x


def downsample(dim: int, fast: bool = True) -> nn.Cell:
    return conv2d(dim, dim, 4, stride=2, padding=1, fast=fast)  # (H, W) -> (H/2, W/2)


def upsample(dim: int, fast: bool = True) -> nn.Cell:
    return conv_transpose2d(dim, dim, 4, stride=2, padding=1, fast=fast)  # (H, W) -> (2H, 2W)


class Level(nn.Cell):
    """Two ConvNeXt blocks, residual linear attention, then a resampling layer."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, mult: int, resample: nn.Cell, fast: bool):
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_dim, mult, fast=fast)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_dim, mult, fast=fast)
        self.attn = Residual(PreNorm(dim_out, LinearAttention(dim_out, fast=fast), fast))
        self.resample = resample

    def construct(self, x, t):
        x = self.attn(self.block2(self.block1(x, t), t))
        return x, self.resample(x)


class Unet(nn.Cell):
    """Predicts the noise in x_t: (B, C, H, W), (B,) -> (B, C, H, W).

    `fast` picks the CPU-fast formulations of GroupNorm, GELU, the convs (ddpm/layers.py) and the attention
    path (ddpm/kernels/attention.py); False builds
    MindSpore's own cells, the reference the fast ones are tested against. Same parameters either way.
    """

    def __init__(self, dim: int, channels: int = 1, dim_mults: tuple[int, ...] = (1, 2, 4), convnext_mult: int = 2,
                 fast: bool = True):
        super().__init__()
        init_dim = dim // 3 * 2
        self.init_conv = nn.Conv2d(channels, init_dim, 7, pad_mode="pad", padding=3, has_bias=True)
        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.SequentialCell(
            SinusoidalPositionEmbeddings(dim), nn.Dense(dim, time_dim), gelu(fast), nn.Dense(time_dim, time_dim))

        last = len(in_out) - 1
        self.downs = nn.CellList([
            Level(d_in, d_out, time_dim, convnext_mult, downsample(d_out, fast) if i < last else nn.Identity(),
                  fast)
            for i, (d_in, d_out) in enumerate(in_out)])
        mid_dim = dims[-1]
        self.mid_block1 = ConvNextBlock(mid_dim, mid_dim, time_dim, convnext_mult, fast=fast)
        self.mid_attn = Residual(PreNorm(mid_dim, Attention(mid_dim, fast=fast), fast))
        self.mid_block2 = ConvNextBlock(mid_dim, mid_dim, time_dim, convnext_mult, fast=fast)
        # Up levels mirror all downs but the first; the tutorial never uses the first level's skip.
        self.ups = nn.CellList([
            Level(d_out * 2, d_in, time_dim, convnext_mult, upsample(d_in, fast), fast)
            for d_in, d_out in reversed(in_out[1:])])
        self.final_conv = nn.SequentialCell(ConvNextBlock(dim, dim, mult=convnext_mult, fast=fast),
                                             nn.Conv2d(dim, channels, 1))

    def construct(self, x, time):
        x = self.init_conv(x)
        t = self.time_mlp(time)
        skips = []
        for level in self.downs:
            skip, x = level(x, t)
            skips.append(skip)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for i, level in enumerate(self.ups):
            x = ops.cat((x, skips[-1 - i]), axis=1)  # (B, C, H, W) -> (B, 2C, H, W)
            _, x = level(x, t)
        return self.final_conv(x)


def build_unet(model_config) -> Unet:
    return Unet(model_config.dim, model_config.channels, tuple(model_config.dim_mults), model_config.convnext_mult)


def count_parameters(net: nn.Cell) -> int:
    return sum(int(np.prod(p.shape)) for p in net.trainable_params())
