"""Minimal reproduction: which oneDNN implementation MindSpore 2.10 picks for the U-Net's convs on CPU.

    ONEDNN_VERBOSE=1 uv run python benchmarks/conv_impl.py 2>&1 | grep 'exec,cpu,convolution'
    ONEDNN_MAX_CPU_ISA=AVX512_CORE ONEDNN_VERBOSE=1 uv run python benchmarks/conv_impl.py 2>&1 |
        grep 'exec,cpu,convolution'

MindSpore hands oneDNN plain NCHW tensors (`abcd`), so oneDNN cannot use its blocked or
channels-last kernels: with AVX2 every conv, dense or depthwise, runs as `x64:gemm:jit`
(im2col + GEMM per image and group); with AVX-512 it picks `jit_uni_ncsp:conv+ref:any`, about
20x slower still. `nn.Conv2d(data_format="NHWC")` is refused on CPU. The last field of each
line is milliseconds.
"""

import ddpm  # noqa: F401  (MindSpore's environment defaults, set before mindspore loads)

# isort: split
import mindspore as ms
import numpy as np
from mindspore import nn

BATCH = 16


class Summed(nn.Cell):
    def __init__(self, conv: nn.Cell):
        super().__init__()
        self.conv = conv

    def construct(self, x):
        return self.conv(x).sum()


ms.set_device("CPU")
rng = np.random.default_rng(0)
for conv, channels in [
    (nn.Conv2d(56, 28, 3, pad_mode="pad", padding=1), 56),  # a ConvNeXt 3x3 conv
    (nn.Conv2d(28, 28, 7, pad_mode="pad", padding=3, group=28), 28),  # the 7x7 depthwise
]:
    x = ms.Tensor(rng.standard_normal((BATCH, channels, 28, 28)), ms.float32)
    grad = ms.jit(ms.value_and_grad(Summed(conv), 0, conv.trainable_params()))
    for _ in range(3):
        grad(x)
