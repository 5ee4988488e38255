"""MindSpore cells over the oneDNN conv operators of dnnl_conv.cc: ops.Conv2D's math, faster kernels."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ddpm.kernels.custom import aot_op


def conv_output_size(size: int, kernel: int, stride: int, pad: int, transposed: bool) -> int:
    """Spatial size after a conv with symmetric padding, or after its transpose."""
    if transposed:
        return (size - 1) * stride - 2 * pad + kernel
    return (size + 2 * pad - kernel) // stride + 1


class NativeConv2d(nn.Cell):
    """(x, weight) -> conv(x, weight) with symmetric padding, and its gradient, by oneDNN.

    The weight is MindSpore's: (C_out, C_in / groups, k, k) for a conv, (C_in, C_out / groups, k, k)
    for a transposed conv (nn.Conv2dTranspose's). The forward and the backward are each one
    custom operator; the backward returns the input and the weight gradients together so the
    incoming gradient is converted to oneDNN's layout once. With `bf16` the operators convert x, the
    weight and the incoming gradient to bfloat16 inside (tensors in and out stay float32) and
    oneDNN accumulates in float32: the outputs and both gradients are float32.
    """

    def __init__(
        self,
        library: Path,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        transposed: bool = False,
        bf16: bool = False,
    ):
        super().__init__()
        self.stride, self.pad, self.groups, self.transposed = stride, pad, groups, transposed
        # stride_h, stride_w, pad top/left/bottom/right, groups, transposed, bf16: read by the C++ side
        self.config = ms.Tensor(
            np.array([stride, stride, pad, pad, pad, pad, groups, int(transposed), int(bf16)], np.int64)
        )
        self.forward_op = aot_op(library, "ConvForward", out_shape=self.output_shape)
        dx_dw = lambda x, w, dy, config: (x, w)  # noqa: E731
        self.backward_op = aot_op(library, "ConvBackward", dx_dw, dx_dw)

    def output_shape(self, x, w, config):
        channels = w[1] * self.groups if self.transposed else w[0]
        return [
            x[0],
            channels,
            *(
                conv_output_size(s, k, self.stride, self.pad, self.transposed)
                for s, k in zip(x[2:], w[2:], strict=True)
            ),
        ]

    def construct(self, x, weight):
        return self.forward_op(x, weight, self.config)

    def bprop(self, x, weight, out, dout):
        dx, dw = self.backward_op(x, weight, dout, self.config)
        return dx, dw


class _NativeForward:
    """construct() for an nn conv cell that holds a NativeConv2d as `native`: its weight, then its bias."""

    # what the nn conv cell this is mixed into holds
    native: NativeConv2d
    weight: ms.Parameter
    bias: ms.Parameter
    has_bias: bool
    bias_add: ops.BiasAdd

    def construct(self, x):
        out = self.native(x, self.weight)
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        return out


class Conv2d(_NativeForward, nn.Conv2d):
    """nn.Conv2d with symmetric padding run by NativeConv2d: the same parameters and initialisation."""

    def __init__(
        self,
        library: Path,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        has_bias: bool = False,
        bf16: bool = False,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding, has_bias=has_bias
        )
        self.native = NativeConv2d(library, stride, padding, bf16=bf16)


class Conv2dTranspose(_NativeForward, nn.Conv2dTranspose):
    """nn.Conv2dTranspose with symmetric padding run by NativeConv2d: the same parameters and initialisation."""

    def __init__(
        self,
        library: Path,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        has_bias: bool = False,
        bf16: bool = False,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding=padding, has_bias=has_bias
        )
        self.native = NativeConv2d(library, stride, padding, transposed=True, bf16=bf16)
