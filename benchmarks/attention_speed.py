"""Isolated attention-path timings, forward + backward, at the U-Net's shapes: MindSpore vs ddpm/kernels.

    uv run python benchmarks/attention_speed.py [--batch 16] [--repeats 20]

For each ChannelLayerNorm, linear attention core and the full attention core of the trained
network (the part between the 1x1 convs: split, softmaxes, matmuls), times one jitted step that
computes the op and the gradients of <op(inputs), p> w.r.t. all its inputs, the implementations
alternating repeat by repeat (a busy core slows them alike); the minimum over repeats, in ms,
one JSON line per shape, then the sums over one training step.
"""

import argparse
import json
import sys
import time

import ddpm  # noqa: F401  (MindSpore's environment defaults, set before mindspore loads)

# isort: split
import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.kernels.attention import NativeChannelLayerNorm, full_attention_core, linear_attention_core
from ddpm.layers import _ChannelNorm, _FullAttention, _LinearAttention
from ddpm.runtime import native_library
from ddpm.unet import NORM_EPS

HEADS, DIM_HEAD = 4, 32  # every attention of the U-Net
# (channels, size) of each LinearAttention (and its ChannelLayerNorm) of Unet(dim=28, dim_mults=(1, 2, 4)),
# and of the middle's full attention
LINEAR = [(28, 28), (56, 14), (112, 7), (56, 7), (28, 14)]
FULL = [(112, 7)]


class Projected(nn.Cell):
    def __init__(self, op: nn.Cell, projection):
        super().__init__()
        self.op, self.projection = op, projection

    def construct(self, *inputs):
        return (self.op(*inputs) * self.projection).sum()


def cases(library, batch: int, rng):
    """(name, inputs, {implementation: cell}) for every op of one step."""
    scale = DIM_HEAD**-0.5
    qkv_channels = 3 * HEADS * DIM_HEAD
    for channels, size in LINEAR:
        x = rng.standard_normal((batch, channels, size, size))
        g = 1 + 0.1 * rng.standard_normal((1, channels, 1, 1))
        yield (
            f"channel_norm {channels} @{size}",
            (x, g),
            {"mindspore": _ChannelNorm(NORM_EPS), "native": NativeChannelLayerNorm(library, NORM_EPS)},
        )
    for kind, shapes, reference, native in [
        ("linear_attention", LINEAR, _LinearAttention, linear_attention_core),
        ("full_attention", FULL, _FullAttention, full_attention_core),
    ]:
        for _, size in shapes:
            qkv = rng.standard_normal((batch, qkv_channels, size, size))
            yield (
                f"{kind} {HEADS}x{DIM_HEAD} @{size}",
                (qkv,),
                {"mindspore": reference(HEADS, scale), "native": native(library, HEADS, scale)},
            )


def time_steps(steps: dict, inputs, repeats: int) -> dict:
    for step in steps.values():
        step(*inputs)  # compile and warm up
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            grads = step(*inputs)
            (grads[0] if isinstance(grads, tuple) else grads).asnumpy()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(seconds * 1e3, 3) for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    ms.set_device("CPU")
    library = native_library()
    if library is None:
        sys.exit("ddpm/kernels unavailable here (the warning above names why)")
    rng = np.random.default_rng(0)
    totals: dict[str, dict[str, float]] = {}
    for name, arrays, cells in cases(library, args.batch, rng):
        inputs = tuple(ms.Tensor(a, ms.float32) for a in arrays)
        projection = ms.Tensor(rng.standard_normal(cells["native"](*inputs).shape), ms.float32)
        positions = tuple(range(len(inputs))) if len(inputs) > 1 else 0
        steps = {
            impl: ms.jit(ms.grad(Projected(cell, projection), grad_position=positions)) for impl, cell in cells.items()
        }
        ms_per_step = time_steps(steps, inputs, args.repeats)
        sums = totals.setdefault(name.split(" ")[0], {})
        for impl, value in ms_per_step.items():
            sums[impl] = sums.get(impl, 0.0) + value
        sys.stdout.write(json.dumps({"op": name, "batch": args.batch, "ms_fwd_bwd": ms_per_step}) + "\n")
    for kind, by_impl in totals.items():
        sys.stdout.write(
            json.dumps(
                {
                    "op": f"all {kind} of one step",
                    "batch": args.batch,
                    "ms_fwd_bwd": {k: round(v, 2) for k, v in by_impl.items()},
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
