"""MindSpore cells over the GroupNorm and GELU operators of pointwise.cc: the same math in one
kernel each way where MindSpore's formulations run a dozen element-wise ones."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.kernels.custom import aot_op


class NativeGELU(nn.Cell):
    """Tanh-approximated GELU (nn.GELU's default) and its gradient."""

    def __init__(self, library: Path):
        super().__init__()
        self.forward_op = aot_op(library, "GeluForward")
        self.backward_op = aot_op(library, "GeluBackward")

    def construct(self, x):
        return self.forward_op(x)

    def bprop(self, x, out, dout):
        return (self.backward_op(x, dout),)


class NativeGroupNorm(nn.Cell):
    """(x, gamma, beta) -> GroupNorm(1, C)(x): each sample normalised over (C, H, W), then a
    per-channel affine; the backward gives x's, gamma's and beta's gradients in one call."""

    def __init__(self, library: Path, eps: float):
        super().__init__()
        self.eps = ms.Tensor(np.array([eps], np.float32))
        self.forward_op = aot_op(library, "GroupNormForward")
        dx_dgamma_dbeta = lambda x, gamma, dy, eps: (x, gamma, gamma)  # noqa: E731
        self.backward_op = aot_op(library, "GroupNormBackward", dx_dgamma_dbeta, dx_dgamma_dbeta)

    def construct(self, x, gamma, beta):
        return self.forward_op(x, gamma, beta, self.eps)

    def bprop(self, x, gamma, beta, out, dout):
        dx, dgamma, dbeta = self.backward_op(x, gamma, dout, self.eps)
        return dx, dgamma, dbeta
