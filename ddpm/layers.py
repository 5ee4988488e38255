"""Every layer the U-Net uses, and its training step's Adam and EMA, built in one place: one
factory per implementation.

MindSpore 2.10's CPU kernels for GroupNorm and GeLU (and their gradients) are scalar loops, and
it hands convolutions to oneDNN in a layout that leaves only slow kernels (docs/performance.md
has the profile). The three implementations (`ddpm.runtime.IMPLEMENTATIONS`) are three factories:
`Layers` builds MindSpore's own cells ("mindspore": the reference the others are tested against,
and the GPU's and Ascend's layers), `FallbackLayers` the faster MindSpore formulations below
("fallback": the CPU where ddpm/kernels cannot be built), `NativeLayers` ddpm/kernels' C++
operators ("native"), where `precision="bf16"` runs the convolutions' products in bfloat16 (f32 in
and out, f32 accumulation). Parameter names, shapes and initialisation are the same whichever is
built, so checkpoints load into any; tests/test_layers.py and tests/test_kernels.py hold outputs
and gradients to the reference. `network_layers` builds the factory of this process's backend
(`ddpm.runtime.resolve_backend`, decided once per process), `make_layers` any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, initializer
from mindspore.ops.operations._grad_ops import BiasAddGrad, Conv2DBackpropFilter  # no public equivalents

from ddpm import runtime
from ddpm.kernels.attention import NativeChannelLayerNorm, full_attention_core, linear_attention_core
from ddpm.kernels.conv import Conv2d, Conv2dTranspose, NativeConv2d
from ddpm.kernels.optim import NativeAdam, ema_update_op
from ddpm.kernels.pointwise import NativeGELU, NativeGroupNorm
from ddpm.kernels.pool import NativeMaxPool2x2
from ddpm.runtime import Implementation

GELU_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
GELU_CUBIC = 0.044715  # Hendrycks & Gimpel (2016), tanh approximation


class GELU(nn.Cell):
    """GELU, tanh approximation (nn.GELU's default), as x * sigmoid(2z): two fast kernels, no tanh loop."""

    def construct(self, x):
        return x * ops.sigmoid(GELU_TANH_SCALE * (x + GELU_CUBIC * x * x * x))


class LayerGroupNorm(nn.Cell):
    """GroupNorm with one group (normalise each sample over C, H, W), then a per-channel affine.

    With the native `library` one C++ operator each way (ddpm/kernels); without it as MindSpore
    kernels with a hand-written gradient (_Normalize).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, library: Path | None = None):
        super().__init__()
        self.gamma = ms.Parameter(ops.ones((num_channels,), ms.float32), name="gamma")
        self.beta = ms.Parameter(ops.zeros((num_channels,), ms.float32), name="beta")
        self.normalize = NativeGroupNorm(library, eps) if library is not None else _Normalize(eps)

    def construct(self, x):
        return self.normalize(x, self.gamma, self.beta)


class _Normalize(nn.Cell):
    """(x - mean) / sqrt(var + eps) * gamma + beta per sample, with a hand-written gradient.

    Forward: BatchNorm in training mode on the batch viewed as (1, B, C*H*W, 1) gives exactly the
    per-sample statistics through oneDNN. Backward: the closed form of the normalisation's
    gradient in row reductions over contiguous memory, and BiasAddGrad for the per-channel sums
    (a reduction over axes (0, 2, 3) is slow on CPU).
    """

    def __init__(self, eps: float):
        super().__init__()
        self.batch_norm = ops.BatchNorm(is_training=True, epsilon=eps)
        self.eps = eps
        self.channel_sum = BiasAddGrad(data_format="NCHW")  # (B, C, H, W) -> (C,)
        self.row_mean = ops.ReduceMean(keep_dims=True)  # primitives: bprop is parsed without functional ops
        self.rsqrt = ops.Rsqrt()

    def construct(self, x, gamma, beta):
        b, c, h, w = x.shape
        ones, zeros = ops.ones((b,), ms.float32), ops.zeros((b,), ms.float32)
        x_hat = self.batch_norm(x.reshape(1, b, c * h * w, 1), ones, zeros, zeros, ones)[0]  # -> (1, B, CHW, 1)
        return ops.bias_add(x_hat.reshape(b, c, h, w) * gamma.reshape(1, c, 1, 1), beta)

    def bprop(self, x, gamma, beta, out, dout):
        b, c, h, w = x.shape
        rows = x.reshape(b, c * h * w)  # (B, C, H, W) -> (B, CHW)
        centered = rows - self.row_mean(rows, 1)
        rstd = self.rsqrt(self.row_mean(centered * centered, 1) + self.eps)
        x_hat = centered * rstd
        dx_hat = (dout * gamma.reshape(1, c, 1, 1)).reshape(b, c * h * w)
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per row
        dx = rstd * (dx_hat - self.row_mean(dx_hat, 1) - x_hat * self.row_mean(dx_hat * x_hat, 1))
        dgamma = self.channel_sum(dout * x_hat.reshape(b, c, h, w))
        return dx.reshape(b, c, h, w), dgamma, self.channel_sum(dout)


class DepthwiseConv2d(nn.Cell):
    """nn.Conv2d(C, C, k, padding=k // 2, group=C) on faster kernels, with a hand-written gradient.

    MindSpore hands grouped convolutions to oneDNN in plain NCHW, which leaves it im2col + GEMM
    per group; forward, input and weight gradient were among the slowest kernels of the step.
    With the native `library` all three run as oneDNN's direct depthwise kernels through
    ddpm/kernels (the layout conversions happen inside the operator; always float32: in bf16 they
    measured 3x slower, docs/performance.md); without it the MindSpore formulation: the input
    gradient as the forward conv with the flipped kernel, the weight gradient MindSpore's.
    """

    def __init__(self, channels: int, kernel_size: int, library: Path | None = None):
        super().__init__()
        self.weight = ms.Parameter(  # nn.Conv2d's default init
            initializer(HeUniform(math.sqrt(5)), (channels, 1, kernel_size, kernel_size)), name="weight"
        )
        if library is not None:
            self.conv = NativeConv2d(library, pad=kernel_size // 2, groups=channels)
        else:
            self.conv = _DepthwiseConv(channels, kernel_size)

    def construct(self, x):
        return self.conv(x, self.weight)


class _DepthwiseConv(nn.Cell):
    """The depthwise conv in MindSpore's own kernels; its input gradient is about twice as fast as
    Conv2DBackpropInput, and an Im2Col + BatchMatMul weight gradient measured no faster."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.kernel_size = kernel_size
        self.conv = ops.Conv2D(channels, kernel_size, pad_mode="pad", pad=pad, group=channels)
        self.flip = ops.ReverseV2(axis=[2, 3])
        self.weight_grad = Conv2DBackpropFilter(
            channels, kernel_size, pad_mode="pad", pad=pad, pad_list=(pad,) * 4, group=channels
        )

    def construct(self, x, weight):
        return self.conv(x, weight)

    def bprop(self, x, weight, out, dout):
        dx = self.conv(dout, self.flip(weight))  # correlation with the flipped kernel = the conv's transpose
        return dx, self.weight_grad(dout, x, weight.shape)


def split_heads(x, heads: int):
    """(B, heads*d, H, W) -> (B, heads, d, H*W)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w)


def split_qkv(qkv, heads: int):
    """(B, 3*heads*d, H, W), the to_qkv conv's output -> q, k, v, each (B, heads, d, H*W)."""
    q, k, v = ops.chunk(qkv, 3, axis=1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


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


class _ChannelNorm(nn.Cell):
    """(x, g) -> the channel LayerNorm in MindSpore's own operators."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def construct(self, x, g):
        mean = x.mean(axis=1, keep_dims=True)
        var = ((x - mean) ** 2).mean(axis=1, keep_dims=True)
        return (x - mean) * ops.rsqrt(var + self.eps) * g


Precision = Literal["fp32", "bf16"]  # resolved: what `train.precision: auto` becomes (runtime.resolve_precision)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Layers:
    """The U-Net's layer factory, one per implementation: each method builds its layer (or the
    training step's Adam and EMA) with no choice left to make. This base builds MindSpore's own cells
    ("mindspore"): the reference the others are tested against, and the GPU's and Ascend's layers.
    `make_layers` builds the implementation asked for, `network_layers` this process's.

    `precision`: "bf16" (NativeLayers only) runs every dense convolution's products in bfloat16 (f32
    tensors in and out, f32 accumulation, f32 weight gradients; the weights stay f32); the depthwise
    convs, norms, GELU, attention and all else stay f32.
    """

    implementation: ClassVar[Implementation] = "mindspore"
    precision: Precision = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "bf16" and self.implementation != "native":
            raise ValueError(f"precision 'bf16' runs on the native kernels, not on {self.implementation!r}")

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        has_bias: bool = False,
    ) -> nn.Cell:
        """nn.Conv2d with symmetric padding."""
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding, has_bias=has_bias
        )

    def conv_transpose2d(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> nn.Cell:
        """nn.Conv2dTranspose with symmetric padding."""
        return nn.Conv2dTranspose(in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding)

    def depthwise_conv(self, channels: int, kernel_size: int) -> nn.Cell:
        """A depthwise conv with 'same' padding."""
        return nn.Conv2d(channels, channels, kernel_size, pad_mode="pad", padding=kernel_size // 2, group=channels)

    def group_norm(self, num_channels: int, eps: float) -> nn.Cell:
        """GroupNorm(1, C)."""
        return nn.GroupNorm(1, num_channels, eps=eps)

    def gelu(self) -> nn.Cell:
        """Tanh-approximated GELU."""
        return nn.GELU()

    def max_pool2x2(self) -> nn.Cell:
        """2x2 max-pooling with stride 2 (the classifier's)."""
        return nn.MaxPool2d(2, 2)

    def channel_norm(self, eps: float) -> nn.Cell:
        """(x, g) -> the tutorial's channel LayerNorm, (x - mean_c) / sqrt(var_c + eps) g."""
        return _ChannelNorm(eps)

    def linear_attention(self, heads: int, scale: float) -> nn.Cell:
        """The core of linear attention, qkv (B, 3 heads d, H, W) -> (B, heads d, H, W)."""
        return _LinearAttention(heads, scale)

    def full_attention(self, heads: int, scale: float) -> nn.Cell:
        """The core of softmax attention, qkv (B, 3 heads d, H, W) -> (B, heads d, H, W)."""
        return _FullAttention(heads, scale)

    def adam(self, params: Sequence[ms.Parameter], learning_rate: ms.Tensor, beta2: float) -> nn.Adam:
        """The training step's Adam over `params` (MindSpore's: one kernel per parameter tensor)."""
        return nn.Adam(params, learning_rate=learning_rate, beta2=beta2)

    def ema_update(self, n: int) -> ops.Custom | None:
        """The operator that updates the EMA of n parameter tensors (`ddpm.ema.EMA`), or None for the
        EMA's own MindSpore expression."""
        return None


@dataclass(frozen=True)
class FallbackLayers(Layers):
    """The "fallback" implementation, the CPU's without ddpm/kernels: the layers whose MindSpore CPU kernels
    are slow in the faster MindSpore formulations above, the rest as the reference's."""

    implementation: ClassVar[Implementation] = "fallback"

    def depthwise_conv(self, channels: int, kernel_size: int) -> nn.Cell:
        return DepthwiseConv2d(channels, kernel_size)

    def group_norm(self, num_channels: int, eps: float) -> nn.Cell:
        return LayerGroupNorm(num_channels, eps)

    def gelu(self) -> nn.Cell:
        return GELU()


def built_library() -> Path:
    """The library NativeLayers runs on: ddpm/kernels' as this process resolved it (runtime.native_library)."""
    library = runtime.native_library()
    if library is None:
        raise RuntimeError("the native layers need ddpm/kernels, which are unavailable here (the warning says why)")
    return library


@dataclass(frozen=True)
class NativeLayers(Layers):
    """The "native" implementation: every layer on ddpm/kernels' C++ operators (CPU only: they read host
    memory), but for the small dense convs `_mindspore_conv` leaves to MindSpore."""

    implementation: ClassVar[Implementation] = "native"
    library: Path = field(default_factory=built_library)

    def _mindspore_conv(self, in_channels: int, kernel_size: int) -> bool:
        """Whether a dense conv stays MindSpore's: the 1x1 convs and the one-channel input conv while
        oneDNN runs at AVX2 in fp32, where MindSpore's own is as fast (docs/native-kernels.md) and fp32
        results stay those of before. Above AVX2 MindSpore's convs fall to slow kernels, and bf16 needs
        ours, so every conv is native then."""
        small = kernel_size == 1 or in_channels == 1
        return small and not self.bf16 and runtime.mindspore_convs_are_fast()

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        has_bias: bool = False,
    ) -> nn.Cell:
        if self._mindspore_conv(in_channels, kernel_size):
            return super().conv2d(in_channels, out_channels, kernel_size, stride, padding, has_bias)
        return Conv2d(self.library, in_channels, out_channels, kernel_size, stride, padding, has_bias, self.bf16)

    def conv_transpose2d(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> nn.Cell:
        return Conv2dTranspose(self.library, in_channels, out_channels, kernel_size, stride, padding, bf16=self.bf16)

    def depthwise_conv(self, channels: int, kernel_size: int) -> nn.Cell:
        return DepthwiseConv2d(channels, kernel_size, self.library)

    def group_norm(self, num_channels: int, eps: float) -> nn.Cell:
        return LayerGroupNorm(num_channels, eps, self.library)

    def gelu(self) -> nn.Cell:
        return NativeGELU(self.library)

    def max_pool2x2(self) -> nn.Cell:
        return NativeMaxPool2x2(self.library)

    def channel_norm(self, eps: float) -> nn.Cell:
        return NativeChannelLayerNorm(self.library, eps)

    def linear_attention(self, heads: int, scale: float) -> nn.Cell:
        return linear_attention_core(self.library, heads, scale)

    def full_attention(self, heads: int, scale: float) -> nn.Cell:
        return full_attention_core(self.library, heads, scale)

    def adam(self, params: Sequence[ms.Parameter], learning_rate: ms.Tensor, beta2: float) -> nn.Adam:
        return NativeAdam(self.library, params, learning_rate, beta2)

    def ema_update(self, n: int) -> ops.Custom | None:
        return ema_update_op(self.library, n)


LAYERS: dict[Implementation, type[Layers]] = {"mindspore": Layers, "fallback": FallbackLayers, "native": NativeLayers}


def make_layers(implementation: Implementation, precision: Precision = "fp32") -> Layers:
    """The layer factory of `implementation` (runtime.IMPLEMENTATIONS) in the resolved `precision`."""
    return LAYERS[implementation](precision)


def network_layers(precision: str = "auto") -> Layers:
    """The layers a training, sampling or classifier network is built with: those of this process's
    backend (native on the CPU, MindSpore's own cells elsewhere), in the precision `precision`
    (auto | fp32 | bf16, train.precision) resolves to there."""
    backend = runtime.backend(precision)
    return make_layers(backend.implementation, backend.precision)
