"""The tutorial's U-Net: ConvNeXt blocks, linear attention at every level, full attention in the middle.

Layer for layer the network of MindSpore's diffusion tutorial (a port of Hugging Face's Annotated
Diffusion), without its dead code. `Unet(dim=28, channels=1, dim_mults=(1, 2, 4))` has
2,992,180 trainable parameters. Convs keep MindSpore's default of no bias unless noted.
"""

from __future__ import annotations

import itertools
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ddpm import runtime
from ddpm.layers import Layers, Precision, make_layers
from ddpm.runtime import Implementation

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
        angles = t.astype(ms.float32).reshape(-1, 1) * self.freqs  # (B, 1) * (1, dim/2) -> (B, dim/2)
        return ops.cat((ops.sin(angles), ops.cos(angles)), axis=-1)  # (B, dim)


class ConvNextBlock(nn.Cell):
    """ConvNeXt block (Liu et al., 2022) with the time embedding added after the depthwise conv."""

    def __init__(
        self, layers: Layers, dim: int, dim_out: int, time_emb_dim: int | None = None, mult: int = 2, norm: bool = True
    ):
        super().__init__()
        self.mlp = nn.SequentialCell(layers.gelu(), nn.Dense(time_emb_dim, dim)) if time_emb_dim else None
        self.ds_conv = layers.depthwise_conv(dim, 7)
        self.net = nn.SequentialCell(
            layers.group_norm(dim, NORM_EPS) if norm else nn.Identity(),
            layers.conv2d(dim, dim_out * mult, 3, padding=1),
            layers.gelu(),
            layers.group_norm(dim_out * mult, NORM_EPS),
            layers.conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = layers.conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def construct(self, x, time_emb=None):
        h = self.ds_conv(x)
        if self.mlp is not None and time_emb is not None:
            cond = self.mlp(time_emb)  # (B, dim)
            h = h + cond.reshape(cond.shape[0], cond.shape[1], 1, 1)  # a view: [:, :, None, None] is a slice kernel
        h = self.net(h)
        return h + self.res_conv(x)


class Attention(nn.Cell):
    """Full softmax self-attention over all positions (used once, at the lowest resolution)."""

    def __init__(self, layers: Layers, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        hidden = dim_head * heads
        self.to_qkv = layers.conv2d(dim, hidden * 3, 1)
        self.attend = layers.full_attention(heads, dim_head**-0.5)  # (B, 3 hidden, H, W) -> (B, hidden, H, W)
        self.to_out = layers.conv2d(hidden, dim, 1, has_bias=True)

    def construct(self, x):
        return self.to_out(self.attend(self.to_qkv(x)))


class ChannelLayerNorm(nn.Cell):
    """LayerNorm over channels with a gain and no bias (the tutorial's custom LayerNorm)."""

    def __init__(self, layers: Layers, dim: int):
        super().__init__()
        self.g = ms.Parameter(ops.ones((1, dim, 1, 1), ms.float32), name="g")
        self.normalize = layers.channel_norm(NORM_EPS)

    def construct(self, x):
        return self.normalize(x, self.g)


class LinearAttention(nn.Cell):
    """Linear attention (Shen et al., 2018): softmax on q over features, on k over positions."""

    def __init__(self, layers: Layers, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        hidden = dim_head * heads
        self.to_qkv = layers.conv2d(dim, hidden * 3, 1)
        self.attend = layers.linear_attention(heads, dim_head**-0.5)  # (B, 3 hidden, H, W) -> (B, hidden, H, W)
        self.to_out = nn.SequentialCell(layers.conv2d(hidden, dim, 1, has_bias=True), ChannelLayerNorm(layers, dim))

    def construct(self, x):
        return self.to_out(self.attend(self.to_qkv(x)))


class PreNorm(nn.Cell):
    def __init__(self, layers: Layers, dim: int, fn: nn.Cell):
        super().__init__()
        self.fn = fn
        self.norm = layers.group_norm(dim, NORM_EPS)

    def construct(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Cell):
    def __init__(self, fn: nn.Cell):
        super().__init__()
        self.fn = fn

    def construct(self, x):
        return self.fn(x) + x


def downsample(layers: Layers, dim: int) -> nn.Cell:
    return layers.conv2d(dim, dim, 4, stride=2, padding=1)  # (H, W) -> (H/2, W/2)


def upsample(layers: Layers, dim: int) -> nn.Cell:
    return layers.conv_transpose2d(dim, dim, 4, stride=2, padding=1)  # (H, W) -> (2H, 2W)


class Level(nn.Cell):
    """Two ConvNeXt blocks, residual linear attention, then a resampling layer."""

    def __init__(self, layers: Layers, dim_in: int, dim_out: int, time_dim: int, mult: int, resample: nn.Cell):
        super().__init__()
        self.block1 = ConvNextBlock(layers, dim_in, dim_out, time_dim, mult)
        self.block2 = ConvNextBlock(layers, dim_out, dim_out, time_dim, mult)
        self.attn = Residual(PreNorm(layers, dim_out, LinearAttention(layers, dim_out)))
        self.resample = resample

    def construct(self, x, t):
        x = self.attn(self.block2(self.block1(x, t), t))
        return x, self.resample(x)


class Unet(nn.Cell):
    """Predicts the noise in x_t: (B, C, H, W), (B,) -> (B, C, H, W).

    `implementation` ("native", "fallback" or "mindspore", ddpm.runtime.IMPLEMENTATIONS; None: this
    process's backend) picks the layer factory of ddpm/layers.py, built once here; `precision` "bf16"
    runs the convolutions in bfloat16 (native only). Same parameters, names and order whichever.
    """

    def __init__(
        self,
        dim: int,
        channels: int = 1,
        dim_mults: tuple[int, ...] = (1, 2, 4),
        convnext_mult: int = 2,
        implementation: Implementation | None = None,
        precision: Precision = "fp32",
    ):
        super().__init__()
        layers = make_layers(implementation or runtime.backend("fp32").implementation, precision)
        init_dim = dim // 3 * 2
        self.init_conv = layers.conv2d(channels, init_dim, 7, padding=3, has_bias=True)
        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(itertools.pairwise(dims))
        time_dim = dim * 4
        self.time_mlp = nn.SequentialCell(
            SinusoidalPositionEmbeddings(dim), nn.Dense(dim, time_dim), layers.gelu(), nn.Dense(time_dim, time_dim)
        )

        last = len(in_out) - 1
        self.downs = nn.CellList(
            [
                Level(
                    layers,
                    d_in,
                    d_out,
                    time_dim,
                    convnext_mult,
                    downsample(layers, d_out) if i < last else nn.Identity(),
                )
                for i, (d_in, d_out) in enumerate(in_out)
            ]
        )
        mid_dim = dims[-1]
        self.mid_block1 = ConvNextBlock(layers, mid_dim, mid_dim, time_dim, convnext_mult)
        self.mid_attn = Residual(PreNorm(layers, mid_dim, Attention(layers, mid_dim)))
        self.mid_block2 = ConvNextBlock(layers, mid_dim, mid_dim, time_dim, convnext_mult)
        # Up levels mirror all downs but the first; the tutorial never uses the first level's skip.
        self.ups = nn.CellList(
            [
                Level(layers, d_out * 2, d_in, time_dim, convnext_mult, upsample(layers, d_in))
                for d_in, d_out in reversed(in_out[1:])
            ]
        )
        self.final_conv = nn.SequentialCell(
            ConvNextBlock(layers, dim, dim, mult=convnext_mult), layers.conv2d(dim, channels, 1)
        )

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


def build_unet(model_config, precision: str = "auto") -> Unet:
    """The network of `model_config` on this process's backend (native layers on the CPU), in the precision
    `precision` (train.precision: auto | fp32 | bf16) resolves to there."""
    backend = runtime.backend(precision)
    return Unet(
        model_config.dim,
        model_config.channels,
        tuple(model_config.dim_mults),
        model_config.convnext_mult,
        backend.implementation,
        backend.precision,
    )


def count_parameters(net: nn.Cell) -> int:
    return sum(int(np.prod(p.shape)) for p in net.trainable_params())
