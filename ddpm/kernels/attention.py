"""MindSpore cells over the attention operators of attention.cc: the channel LayerNorm and the cores
of linear and full attention, each one C++ call per direction where MindSpore's formulations run
splits, transposes, softmaxes, batched matmuls and their gradients."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.kernels.custom import aot_op


class NativeChannelLayerNorm(nn.Cell):
    """(x, g) -> (x - mean) / sqrt(var + eps) * g, statistics over the channels of each pixel."""

    def __init__(self, library: Path, eps: float):
        super().__init__()
        self.eps = ms.Tensor(np.array([eps], np.float32))
        self.forward_op = aot_op(library, "ChannelNormForward")
        dx_dg = lambda x, g, dy, eps: (x, g)  # noqa: E731
        self.backward_op = aot_op(library, "ChannelNormBackward", dx_dg, dx_dg)

    def construct(self, x, g):
        return self.forward_op(x, g, self.eps)

    def bprop(self, x, g, out, dout):
        dx, dg = self.backward_op(x, g, dout, self.eps)
        return dx, dg


class NativeAttentionCore(nn.Cell):
    """qkv (B, 3 * heads * d, H, W), the to_qkv conv's output -> (B, heads * d, H, W): the attention
    between the 1x1 convs, read in place; `operator` names the pair of attention.cc's operators."""

    def __init__(self, library: Path, operator: str, heads: int, scale: float):
        super().__init__()
        self.scale = ms.Tensor(np.array([scale], np.float32))
        self.heads = ms.Tensor(np.array([heads], np.int64))
        self.forward_op = aot_op(library, f"{operator}Forward", out_shape=self.output_shape)
        self.backward_op = aot_op(library, f"{operator}Backward")

    @staticmethod
    def output_shape(qkv, scale, heads):
        return [qkv[0], qkv[1] // 3, *qkv[2:]]

    def construct(self, qkv):
        return self.forward_op(qkv, self.scale, self.heads)

    def bprop(self, qkv, out, dout):
        return (self.backward_op(qkv, dout, self.scale, self.heads),)


def linear_attention_core(library: Path, heads: int, scale: float) -> NativeAttentionCore:
    """Shen et al.'s linear attention: softmax of q over features, of k over positions."""
    return NativeAttentionCore(library, "LinearAttention", heads, scale)


def full_attention_core(library: Path, heads: int, scale: float) -> NativeAttentionCore:
    """Softmax attention over all positions."""
    return NativeAttentionCore(library, "Attention", heads, scale)
