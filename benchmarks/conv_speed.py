"""Isolated conv timings, forward + backward, at the U-Net's shapes: MindSpore's kernels vs ddpm/kernels.

    uv run python benchmarks/conv_speed.py [--batch 16] [--repeats 20] [--kinds dw]

For each conv of the trained network (batch 16) times one jitted step that computes the conv and
the gradients of <conv(x, w), p> w.r.t. x and w, for each implementation in turn (interleaved,
so a busy machine slows them alike); the minimum over repeats, in ms, one JSON line per shape.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass

import ddpm  # noqa: F401  (MindSpore's environment defaults, set before mindspore loads)

# isort: split
import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.kernels.conv import NativeConv2d
from ddpm.layers import _DepthwiseConv
from ddpm.runtime import native_library


@dataclass(frozen=True)
class Conv:
    c_in: int
    c_out: int
    kernel: int
    size: int  # input height = width
    stride: int = 1
    groups: int = 1
    transposed: bool = False

    @property
    def pad(self) -> int:
        return 1 if self.stride == 2 else self.kernel // 2  # the U-Net's 4x4 stride-2 resamplers pad 1

    def __str__(self):
        kind = "dw" if self.groups > 1 else "convT" if self.transposed else "conv"
        return f"{kind}{self.kernel}x{self.kernel}/{self.stride} {self.c_in}->{self.c_out} @{self.size}"


def depthwise(channels: int, size: int) -> Conv:
    return Conv(channels, channels, 7, size, groups=channels)


# Every conv of Unet(dim=28, dim_mults=(1, 2, 4)) in execution order, ConvNeXt block by block
NETWORK = [
    Conv(1, 18, 7, 28),
    depthwise(18, 28),
    Conv(18, 56, 3, 28),
    Conv(56, 28, 3, 28),
    Conv(18, 28, 1, 28),
    depthwise(28, 28),
    Conv(28, 56, 3, 28),
    Conv(56, 28, 3, 28),
    Conv(28, 384, 1, 28),
    Conv(128, 28, 1, 28),
    Conv(28, 28, 4, 28, stride=2),
    depthwise(28, 14),
    Conv(28, 112, 3, 14),
    Conv(112, 56, 3, 14),
    Conv(28, 56, 1, 14),
    depthwise(56, 14),
    Conv(56, 112, 3, 14),
    Conv(112, 56, 3, 14),
    Conv(56, 384, 1, 14),
    Conv(128, 56, 1, 14),
    Conv(56, 56, 4, 14, stride=2),
    depthwise(56, 7),
    Conv(56, 224, 3, 7),
    Conv(224, 112, 3, 7),
    Conv(56, 112, 1, 7),
    depthwise(112, 7),
    Conv(112, 224, 3, 7),
    Conv(224, 112, 3, 7),
    Conv(112, 384, 1, 7),
    Conv(128, 112, 1, 7),
    depthwise(112, 7),
    Conv(112, 224, 3, 7),
    Conv(224, 112, 3, 7),
    Conv(112, 384, 1, 7),
    Conv(128, 112, 1, 7),
    depthwise(112, 7),
    Conv(112, 224, 3, 7),
    Conv(224, 112, 3, 7),
    depthwise(224, 7),
    Conv(224, 112, 3, 7),
    Conv(112, 56, 3, 7),
    Conv(224, 56, 1, 7),
    depthwise(56, 7),
    Conv(56, 112, 3, 7),
    Conv(112, 56, 3, 7),
    Conv(56, 384, 1, 7),
    Conv(128, 56, 1, 7),
    Conv(56, 56, 4, 7, stride=2, transposed=True),
    depthwise(112, 14),
    Conv(112, 56, 3, 14),
    Conv(56, 28, 3, 14),
    Conv(112, 28, 1, 14),
    depthwise(28, 14),
    Conv(28, 56, 3, 14),
    Conv(56, 28, 3, 14),
    Conv(28, 384, 1, 14),
    Conv(128, 28, 1, 14),
    Conv(28, 28, 4, 14, stride=2, transposed=True),
    depthwise(28, 28),
    Conv(28, 56, 3, 28),
    Conv(56, 28, 3, 28),
    Conv(28, 1, 1, 28),
]


class Projected(nn.Cell):
    def __init__(self, conv: nn.Cell, projection):
        super().__init__()
        self.conv, self.projection = conv, projection

    def construct(self, x, weight):
        return (self.conv(x, weight) * self.projection).sum()


class MindSporeConv(nn.Cell):
    """ops.Conv2D (or Conv2DTranspose) and its autodiff gradient: what nn.Conv2d / nn.Conv2dTranspose run."""

    def __init__(self, conv: Conv):
        super().__init__()
        self.transposed = conv.transposed
        if conv.transposed:
            self.conv = ms.ops.Conv2DTranspose(conv.c_in, conv.kernel, pad_mode="pad", pad=conv.pad, stride=conv.stride)
            self.out_shape = (conv.c_out, conv.size * conv.stride, conv.size * conv.stride)
        else:
            self.conv = ms.ops.Conv2D(
                conv.c_out, conv.kernel, pad_mode="pad", pad=conv.pad, stride=conv.stride, group=conv.groups
            )

    def construct(self, x, weight):
        if self.transposed:
            return self.conv(x, weight, (x.shape[0], *self.out_shape))
        return self.conv(x, weight)


def implementations(conv: Conv) -> dict:
    found = {"mindspore": MindSporeConv(conv)}
    if conv.groups > 1:
        found["flipped_kernel"] = _DepthwiseConv(conv.c_in, conv.kernel)
    library = native_library()
    if library is not None:
        found["onednn"] = NativeConv2d(library, conv.stride, conv.pad, conv.groups, conv.transposed)
        found["onednn_bf16"] = NativeConv2d(library, conv.stride, conv.pad, conv.groups, conv.transposed, bf16=True)
    return found


def weight_shape(conv: Conv) -> tuple:
    if conv.transposed:
        return conv.c_in, conv.c_out, conv.kernel, conv.kernel
    return conv.c_out, conv.c_in // conv.groups, conv.kernel, conv.kernel


def time_step(step, args, repeats: int) -> float:
    step(*args)[0].asnumpy()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step(*args)[0].asnumpy()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kinds", default="all", help="all, or one of dw, conv, convT")
    parser.add_argument("--impls", default="", help="comma-separated subset, e.g. onednn,onednn_bf16")
    args = parser.parse_args()
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    totals: dict[str, dict[str, float]] = {}
    for conv in dict.fromkeys(c for c in NETWORK if args.kinds in ("all", str(c).split(" ")[0].rstrip("0123456789x/"))):
        out_size = conv.size * conv.stride if conv.transposed else conv.size // conv.stride
        x = ms.Tensor(rng.standard_normal((args.batch, conv.c_in, conv.size, conv.size)), ms.float32)
        w = ms.Tensor(rng.standard_normal(weight_shape(conv)) / conv.kernel, ms.float32)
        p = ms.Tensor(rng.standard_normal((args.batch, conv.c_out, out_size, out_size)), ms.float32)
        steps = {
            name: ms.jit(ms.grad(Projected(cell, p), grad_position=(0, 1)))
            for name, cell in implementations(conv).items()
            if not args.impls or name in args.impls.split(",")
        }
        ms_per_step = {name: round(time_step(step, (x, w), args.repeats), 3) for name, step in steps.items()}
        uses = NETWORK.count(conv)
        sums = totals.setdefault(str(conv).split(" ")[0], {})
        for name, value in ms_per_step.items():
            sums[name] = sums.get(name, 0.0) + uses * value
        sys.stdout.write(
            json.dumps({"conv": str(conv), "batch": args.batch, "uses": uses, "ms_fwd_bwd": ms_per_step}) + "\n"
        )
    for kind, by_impl in totals.items():
        sys.stdout.write(
            json.dumps(
                {
                    "conv": f"all {kind} of one step",
                    "batch": args.batch,
                    "ms_fwd_bwd": {k: round(v, 2) for k, v in by_impl.items()},
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
