"""Isolated conv timings, forward + backward, at the U-Net's shapes: MindSpore's kernels vs ddpm/kernels.

    uv run python benchmarks/conv_speed.py [--batch 16] [--repeats 20]

For each conv of the trained network (batch 16) times one jitted step that computes the conv and
the gradients of <conv(x, w), p> w.r.t. x and w, for each implementation in turn (interleaved,
so a busy machine slows them alike); the minimum over repeats, in ms, one JSON line per shape.
"""
import argparse
import json
import sys
import time

import ddpm  # noqa: F401  (MindSpore's environment defaults)
import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.kernels.build import conv_library
from ddpm.kernels.conv import NativeConv2d
from ddpm.layers import _DepthwiseConv

# (channels, size) of every depthwise conv in Unet(dim=28, dim_mults=(1, 2, 4))
DEPTHWISE = [(18, 28), (28, 28), (28, 28), (28, 14), (56, 14), (56, 7), (112, 7), (112, 7), (112, 7),
             (224, 7), (56, 7), (112, 14), (28, 14), (28, 28)]


class Projected(nn.Cell):
    def __init__(self, conv: nn.Cell, projection):
        super().__init__()
        self.conv, self.projection = conv, projection

    def construct(self, x, weight):
        return (self.conv(x, weight) * self.projection).sum()


class MindSporeConv(nn.Cell):
    """ops.Conv2D and its autodiff gradient: what nn.Conv2d(group=C) runs."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = ms.ops.Conv2D(channels, kernel, pad_mode="pad", pad=kernel // 2, group=channels)

    def construct(self, x, weight):
        return self.conv(x, weight)


def implementations(channels: int, kernel: int) -> dict:
    found = {"mindspore": MindSporeConv(channels, kernel), "flipped_kernel": _DepthwiseConv(channels, kernel)}
    library = conv_library()
    if library is not None:
        found["onednn_nhwc"] = NativeConv2d(library, pad=kernel // 2, groups=channels)
    return found


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
    args = parser.parse_args()
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    totals: dict[str, float] = {}
    for channels, size in sorted(set(DEPTHWISE)):
        x = ms.Tensor(rng.standard_normal((args.batch, channels, size, size)), ms.float32)
        w = ms.Tensor(rng.standard_normal((channels, 1, 7, 7)), ms.float32)
        p = ms.Tensor(rng.standard_normal((args.batch, channels, size, size)), ms.float32)
        steps = {name: ms.jit(ms.grad(Projected(conv, p), grad_position=(0, 1)))
                 for name, conv in implementations(channels, 7).items()}
        ms_per_step = {name: round(time_step(step, (x, w), args.repeats), 3) for name, step in steps.items()}
        uses = DEPTHWISE.count((channels, size))
        for name, value in ms_per_step.items():
            totals[name] = totals.get(name, 0.0) + uses * value
        sys.stdout.write(json.dumps({"conv": f"dw7x7 {channels}ch {size}x{size}", "batch": args.batch,
                                     "uses": uses, "ms_fwd_bwd": ms_per_step}) + "\n")
    sys.stdout.write(json.dumps({"conv": "all depthwise of one step", "batch": args.batch,
                                 "ms_fwd_bwd": {k: round(v, 2) for k, v in totals.items()}}) + "\n")


if __name__ == "__main__":
    main()
