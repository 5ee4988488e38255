"""How many kernels one training step launches, grouped by kind: a census of ddpm.train.Trainer's step.

    uv run python benchmarks/kernel_census.py --params params.yaml
    uv run python benchmarks/kernel_census.py --params configs/tutorial.yaml [--steps 2] [--keep DIR]

Two records of MindSpore's own, from one process and one compiled graph:
- the counts and times: MindSpore's profiler on the CPU (`mindspore.profiler.profile`,
  ProfilerActivity.CPU), which writes every kernel launch to FRAMEWORK/cpu_op_execute_timestamp_0.txt
  as `full name;type;start,duration_ms,thread start,duration_ms,thread ...`;
- what each kernel is: the compiled graph's IR after its last pass (MS_DEV_SAVE_GRAPHS with
  MS_DEV_DUMP_IR_PASSES=execute), where each CNode carries its full name (`Default/Custom-op12`), its
  primitive, a Custom op's C symbol (`func_name: ".../ddpm_kernels-*.so:ConvForward"`) and the
  source lines it came from (`# In file .../ddpm/ema.py:...`), which tell the EMA's and Adam's
  element-wise kernels from the network's.
A step is compiled and run once first, then `--steps` steps are profiled; every kernel must have
run the same number of times in each, or the census stops. The time shares are those of the
profiled steps (kernel time only: the runtime's gaps between kernels are not in them).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

IR_PASS = "execute"  # the last pass of compilation: the graph the runtime launches
EXECUTE_IR = re.compile(r"^\d+_execute_\d+\.ir$")
NODE = re.compile(r"^\s+%\d+\([^)]*\) = ([A-Za-z_][\w]*)\(")
FULLNAME = re.compile(r"# Fullname with scope: \((.+)\)")
SOURCE = re.compile(r"# In file (\S+?):\d")
FUNC_NAME = re.compile(r'func_name: "[^"]*:(\w+)"')
TIMESTAMPS = "cpu_op_execute_timestamp_0.txt"
# Kernels MindSpore expands from a composite primitive when it builds them (`Expand/_SumExt/ReduceSum-op3`):
# the IR holds the composite (SumExt), the profiler its parts, named after their primitive.
EXPANDED = "Expand/"
OP_NUMBER = re.compile(r"-op\d+$")

# The groups, in the table's order: (name, what it holds)
NATIVE_CONV_FORWARD = "native conv, forward"
NATIVE_CONV_BACKWARD = "native conv, backward (dx and dw in one)"
NATIVE_ATTENTION = "native attention cores"
NATIVE_POINTWISE = "native GroupNorm, GELU, channel norm"
MINDSPORE_CONV = "MindSpore conv / matmul"
ELEMENTWISE = "element-wise (network, loss)"
ADAM = "Adam (optimizer)"
EMA = "EMA update"
MOVES = "copies, slices, concats, casts"
OTHER = "other (reductions, gathers)"
GROUPS = (
    NATIVE_CONV_FORWARD,
    NATIVE_CONV_BACKWARD,
    NATIVE_ATTENTION,
    NATIVE_POINTWISE,
    MINDSPORE_CONV,
    ELEMENTWISE,
    ADAM,
    EMA,
    MOVES,
    OTHER,
)
NATIVE = {
    "ConvForward": NATIVE_CONV_FORWARD,
    "ConvBackward": NATIVE_CONV_BACKWARD,
    "LinearAttentionForward": NATIVE_ATTENTION,
    "LinearAttentionBackward": NATIVE_ATTENTION,
    "AttentionForward": NATIVE_ATTENTION,
    "AttentionBackward": NATIVE_ATTENTION,
    "GroupNormForward": NATIVE_POINTWISE,
    "GroupNormBackward": NATIVE_POINTWISE,
    "GeluForward": NATIVE_POINTWISE,
    "GeluBackward": NATIVE_POINTWISE,
    "ChannelNormForward": NATIVE_POINTWISE,
    "ChannelNormBackward": NATIVE_POINTWISE,
    "AdamStep": ADAM,
    "EmaUpdate": EMA,
}
MATMULS = {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "MatMul", "BatchMatMul", "Conv2DTranspose"}
MOVE_OPS = {"TensorMove", "Transpose", "Cast", "Reshape", "Concat", "Slice", "StridedSlice", "StridedSliceGrad"}
ELEMENTWISE_OPS = {
    *("Add", "Sub", "Mul", "RealDiv", "Div", "Pow", "Neg", "Square", "Sqrt", "Rsqrt", "Exp", "Log"),
    *("Sin", "Cos", "Abs", "Sign", "Select", "Less", "Greater", "Maximum", "Minimum", "Sigmoid", "Softmax"),
    *("BiasAdd", "AddN", "ZerosLike", "OnesLike", "Assign", "AssignAdd"),
}
PRIM_FUNC = "PrimFunc_"  # how the IR prints a primitive defined by a function (PrimFunc_Mul is Mul)
EMA_SOURCE = "ddpm/ema.py"
OPTIMIZER_SOURCE = "mindspore/nn/optim/"


@dataclass(frozen=True)
class Kernel:
    """One CNode of the executed graph: its primitive, a Custom op's C symbol, where it came from."""

    primitive: str
    func: str = ""
    sources: tuple[str, ...] = ()


@dataclass
class Census:
    """Kernel launches per step and kernel time (ms over the profiled steps), by group and primitive."""

    steps: int
    launches: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def read_graph(ir_text: str) -> dict[str, Kernel]:
    """Full name -> Kernel for every CNode of a MindSpore IR dump."""
    kernels: dict[str, Kernel] = {}
    primitive, func, name = "", "", ""
    sources: list[str] = []

    def close() -> None:
        if name:
            kernels[name] = Kernel(primitive, func, tuple(sources))

    for line in ir_text.splitlines():
        node = NODE.match(line)
        if node:
            close()
            primitive, name, sources = node.group(1).removeprefix(PRIM_FUNC), "", []
            symbol = FUNC_NAME.search(line)
            func = symbol.group(1) if symbol else ""
        elif (full := FULLNAME.search(line)) and primitive:
            name = full.group(1)
        elif (source := SOURCE.search(line)) and primitive:
            sources.append(source.group(1))
    close()
    return kernels


def read_launches(timestamps_text: str) -> dict[str, list[float]]:
    """Full name -> the duration (ms) of each launch, from the profiler's cpu_op_execute_timestamp file."""
    launches = {}
    for line in timestamps_text.splitlines():
        if not line.strip():
            continue
        name, _, records = line.split(";", 2)
        launches[name] = [float(record.split(",")[1]) for record in records.split()]
    return launches


def group_of(kernel: Kernel) -> str:
    if kernel.primitive == "Custom":
        return NATIVE.get(kernel.func, OTHER)
    if any(EMA_SOURCE in s for s in kernel.sources):
        return EMA
    if kernel.primitive == "Adam" or any(OPTIMIZER_SOURCE in s for s in kernel.sources):
        return ADAM
    if kernel.primitive in MATMULS:
        return MINDSPORE_CONV
    if kernel.primitive in MOVE_OPS:
        return MOVES
    if kernel.primitive in ELEMENTWISE_OPS:
        return ELEMENTWISE
    return OTHER


def take_census(graph: dict[str, Kernel], launches: dict[str, list[float]], steps: int) -> Census:
    """Group the profiled launches; every kernel must have run the same number of times each step."""
    census = Census(steps)
    for name, durations in launches.items():
        if name.startswith(EXPANDED):  # no CNode of its own: the primitive is in its name
            kernel = Kernel(OP_NUMBER.sub("", name.rsplit("/", 1)[-1]))
        elif name in graph:
            kernel = graph[name]
        else:
            raise ValueError(f"{name} was launched but is not in the executed graph's IR")
        if len(durations) % steps:
            raise ValueError(f"{name} ran {len(durations)} times in {steps} steps")
        group = group_of(kernel)
        label = f"{kernel.primitive}:{kernel.func}" if kernel.func else kernel.primitive
        census.launches[group][label] += len(durations) // steps
        census.ms[group] += sum(durations)
    return census


def format_table(census: Census, title: str) -> str:
    total = sum(sum(c.values()) for c in census.launches.values())
    total_ms = sum(census.ms.values()) or 1.0
    lines = [
        f"### {title}",
        "",
        "| group | kernels per step | time share | kernels (per step) |",
        "|---|---|---|---|",
    ]
    for group in GROUPS:
        kinds = census.launches.get(group)
        if not kinds:
            continue
        detail = ", ".join(f"{label} {n}" for label, n in kinds.most_common())
        share = f"{100 * census.ms[group] / total_ms:.0f}%"
        lines.append(f"| {group} | {sum(kinds.values())} | {share} | {detail} |")
    lines.append(f"| **all** | **{total}** | 100% | kernel time {total_ms / census.steps:.0f} ms per step |")
    return "\n".join(lines)


def run_census(params: str | None, sets: list[str], steps: int, work: Path) -> tuple[Census, str]:
    """Compile and run one step of ddpm's Trainer (dumping the executed graph), profile `steps` more."""
    os.environ.update(MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(work / "ir"), MS_DEV_DUMP_IR_PASSES=IR_PASS)
    import ddpm  # noqa: F401  (MindSpore's environment defaults, set before mindspore loads)

    # isort: split
    import mindspore as ms
    import numpy as np
    from mindspore.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from ddpm.config import load_config, parse_sets
    from ddpm.runtime import ISA_ENV, select_device, set_cpu_threads
    from ddpm.train import Trainer
    from ddpm.unet import count_parameters

    config = load_config(params, parse_sets(sets))
    select_device(config.train.device)
    set_cpu_threads(config.train.threads)
    trainer = Trainer(config)
    batch, size = config.train.batch_size, config.model.image_size
    shape = (batch, config.model.channels, size, size)
    rng = np.random.default_rng(0)
    x0 = ms.Tensor(rng.uniform(-1, 1, shape), ms.float32)
    t = ms.Tensor(rng.integers(0, trainer.diffusion.timesteps, (batch,)), ms.int32)
    noise = ms.Tensor(rng.standard_normal(shape), ms.float32)
    decay = config.train.ema_decay
    trainer.train_step(x0, t, noise, decay)  # compiles, dumps the IR
    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=0, active=steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(dir_name=str(work / "profile")),
    ) as profiler:
        for _ in range(steps):
            trainer.train_step(x0, t, noise, decay)
            profiler.step()
    (ir,) = (p for p in (work / "ir").rglob("*.ir") if EXECUTE_IR.match(p.name))
    (timestamps,) = (work / "profile").rglob(TIMESTAMPS)
    census = take_census(read_graph(ir.read_text()), read_launches(timestamps.read_text()), steps)
    title = (
        f"{params or 'defaults'}: dim {config.model.dim}, {count_parameters(trainer.net):,} parameters, "
        f"batch {batch}, EMA {'on' if trainer.ema is not None else 'off'}, precision {trainer.precision}, "
        f"oneDNN cap {os.environ.get(ISA_ENV, '?')}"
    )
    return census, title


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params.yaml or an overlay (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.dim=8")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled after the first (compiling) one")
    parser.add_argument("--keep", type=Path, default=None, help="keep the IR and profiler output in this directory")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        census, title = run_census(args.params, args.set, args.steps, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="kernel_census_") as work:
            census, title = run_census(args.params, args.set, args.steps, Path(work))
    sys.stdout.write(format_table(census, title) + "\n")


if __name__ == "__main__":
    main()
