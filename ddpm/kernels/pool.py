"""A MindSpore cell over pool.cc's 2x2 max-pooling: MindSpore's CPU MaxPoolGrad was 40% of the
classifier's training step."""

from __future__ import annotations

from pathlib import Path

from mindspore import nn

from ddpm.kernels.custom import aot_op


def _halved(x_shape):
    b, c, h, w = x_shape
    return [b, c, h // 2, w // 2]


class NativeMaxPool2x2(nn.Cell):
    """nn.MaxPool2d(2, 2): (B, C, H, W) -> (B, C, H // 2, W // 2), the gradient to each window's first maximum."""

    def __init__(self, library: Path):
        super().__init__()
        self.forward_op = aot_op(library, "MaxPool2x2Forward", out_shape=_halved)
        self.backward_op = aot_op(library, "MaxPool2x2Backward")

    def construct(self, x):
        return self.forward_op(x)

    def bprop(self, x, out, dout):
        return (self.backward_op(x, dout),)
