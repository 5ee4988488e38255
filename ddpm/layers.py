"""Fast CPU formulations of the U-Net's GroupNorm, GELU and convolutions, same math as MindSpore's.

MindSpore 2.10's CPU kernels for GroupNorm and GeLU (and their gradients) are scalar loops, and
it hands convolutions to oneDNN in a layout that leaves only slow kernels (docs/performance.md
has the profile). These cells compute the same functions through faster kernels. Parameter
names, shapes and initialisation equal the reference cells', so checkpoints load into either;
tests/test_layers.py holds outputs and gradients to the reference.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, initializer
from mindspore.ops.operations._grad_ops import BiasAddGrad, Conv2DBackpropFilter  # no public equivalents

from ddpm.kernels.build import native_library
from ddpm.kernels.conv import Conv2d, Conv2dTranspose, NativeConv2d
from ddpm.kernels.pointwise import NativeGELU, NativeGroupNorm

GELU_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
GELU_CUBIC = 0.044715  # Hendrycks & Gimpel (2016), tanh approximation


class GELU(nn.Cell):
    """GELU, tanh approximation (nn.GELU's default), as x * sigmoid(2z): two fast kernels, no tanh loop."""

    def construct(self, x):
        return x * ops.sigmoid(GELU_TANH_SCALE * (x + GELU_CUBIC * x * x * x))


class LayerGroupNorm(nn.Cell):
    """GroupNorm with one group (normalise each sample over C, H, W), then a per-channel affine.

    `native` runs it as one C++ operator each way (ddpm/kernels); without it, or where that
    cannot be built, as MindSpore kernels with a hand-written gradient (_Normalize).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, native: bool = True):
        super().__init__()
        self.gamma = ms.Parameter(ops.ones((num_channels,), ms.float32), name="gamma")
        self.beta = ms.Parameter(ops.zeros((num_channels,), ms.float32), name="beta")
        library = native_library() if native else None
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
    `native` runs all three as oneDNN's direct depthwise kernels through ddpm/kernels (the layout
    conversions happen inside the operator); where those cannot be built, or with native=False,
    the MindSpore formulation: the input gradient as the forward conv with the flipped kernel,
    the weight gradient MindSpore's.
    """

    def __init__(self, channels: int, kernel_size: int, native: bool = True):
        super().__init__()
        self.weight = ms.Parameter(initializer(HeUniform(math.sqrt(5)), (channels, 1, kernel_size, kernel_size)),
                                   name="weight")  # nn.Conv2d's default init
        library = native_library() if native else None
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
        self.weight_grad = Conv2DBackpropFilter(channels, kernel_size, pad_mode="pad", pad=pad,
                                                pad_list=(pad,) * 4, group=channels)

    def construct(self, x, weight):
        return self.conv(x, weight)

    def bprop(self, x, weight, out, dout):
        dx = self.conv(dout, self.flip(weight))  # correlation with the flipped kernel = the conv's transpose
        return dx, self.weight_grad(dout, x, weight.shape)


def group_norm(num_channels: int, eps: float, fast: bool = True) -> nn.Cell:
    """GroupNorm(1, C): the fast formulation, or MindSpore's own cell as the reference."""
    return LayerGroupNorm(num_channels, eps) if fast else nn.GroupNorm(1, num_channels, eps=eps)


def depthwise_conv(channels: int, kernel_size: int, fast: bool = True) -> nn.Cell:
    """A depthwise conv with 'same' padding: the fast formulation, or nn.Conv2d as the reference."""
    if fast:
        return DepthwiseConv2d(channels, kernel_size)
    return nn.Conv2d(channels, channels, kernel_size, pad_mode="pad", padding=kernel_size // 2, group=channels)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           fast: bool = True) -> nn.Cell:
    """nn.Conv2d with symmetric padding, on oneDNN's direct kernels when fast and they can be built."""
    library = native_library() if fast else None
    if library is None:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding)
    return Conv2d(library, in_channels, out_channels, kernel_size, stride, padding)


def conv_transpose2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                     fast: bool = True) -> nn.Cell:
    """nn.Conv2dTranspose with symmetric padding, on oneDNN's direct kernels when fast and they can be built."""
    library = native_library() if fast else None
    if library is None:
        return nn.Conv2dTranspose(in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding)
    return Conv2dTranspose(library, in_channels, out_channels, kernel_size, stride, padding)


def gelu(fast: bool = True) -> nn.Cell:
    """Tanh-approximated GELU: the native operator, else the fast formulation, or MindSpore's own
    cell as the reference."""
    if not fast:
        return nn.GELU()
    library = native_library()
    return NativeGELU(library) if library is not None else GELU()
