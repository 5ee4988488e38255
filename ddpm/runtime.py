"""Process-level settings for MindSpore: fast CPU defaults, quiet logs, device selection, precision.

MindSpore reads its environment when it is first imported, so `apply_env_defaults` runs from
`ddpm/__init__.py`, before any module here imports mindspore. Each value is a default: a
variable the user has already set wins. oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) is chosen per
processor (`isa_cap`), and `resolve_precision` turns `train.precision: auto` into fp32 or bf16;
both read the processor's flags through `cpu_flags`, the one place that detects them. `backend`
decides, once per device and precision setting, what the networks are built from: ddpm/kernels'
C++ operators on the CPU only, MindSpore's own cells on a GPU or Ascend. This module alone reads
DDPM_NATIVE_KERNELS, asks ddpm/kernels/build.py for the compiled library (`native_library`) and
lowers the ISA cap when it cannot be built; build.py only compiles, and imports nothing from here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ddpm.errors import DeviceError
from ddpm.kernels import build

log = logging.getLogger(__name__)

# Measured on a 2-core x86 VM (see docs/performance.md): without these a training step of the
# tutorial U-Net at batch 16 took ~18 s; with them ~0.6 s.
ENV_DEFAULTS = {
    "GLOG_v": "3",  # MindSpore's C++ log level: errors only, no [WARNING] flood
    "MS_DEV_HOST_BLOCKING_RUN": "1",  # run kernels synchronously: no host/device thread ping-pong
}
ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # oneDNN reads it when it first dispatches a kernel, process-wide
# MindSpore hands its own convs to oneDNN in plain NCHW: at AVX2 that is im2col + GEMM, above it
# jit_uni_ncsp (20x slower, docs/performance.md). So the cap stays AVX2 unless every conv runs on
# ddpm/kernels, which the layers do whenever the cap is above these.
MINDSPORE_CONV_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
FALLBACK_ISA = "AVX2"
# The processor's bf16 matrix units, as /proc/cpuinfo names them, best first, and the oneDNN ISA
# cap that reaches them (measured: docs/performance.md).
BF16_ISAS = (("amx_bf16", "AVX512_CORE_AMX"), ("avx512_bf16", "AVX512_CORE_BF16"))
CPUINFO = Path("/proc/cpuinfo")
NATIVE_KERNELS_ENV = "DDPM_NATIVE_KERNELS"  # "0": MindSpore's own operators, for comparisons
PRECISION_SETTINGS = ("auto", "fp32", "bf16")
DEV = Path("/dev")
NVIDIA_NODES = "nvidia[0-9]*"  # /dev/nvidia0, ...: one per GPU, once the NVIDIA driver is loaded
NVIDIA_SMI = "nvidia-smi"  # ships with the driver
GPU_NEEDS = (
    "MindSpore 2.10's GPU build needs an NVIDIA GPU of compute capability up to 8.0 (A100 and older; Hopper "
    "is unsupported) with the CUDA 11.1 or 11.6 runtime and cuDNN 8 on LD_LIBRARY_PATH (no CUDA 12)"
)
Implementation = Literal["native", "fallback", "mindspore"]
IMPLEMENTATIONS: dict[Implementation, str] = {  # what each runs, as logs and benchmarks say it
    "native": "ddpm/kernels' C++ operators",
    "fallback": "MindSpore's operators (ddpm/kernels unavailable)",
    "mindspore": "MindSpore's own operators",
}


@functools.cache
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The processor's feature flags (the `flags` line of /proc/cpuinfo, what lscpu shows); empty
    where there is none (not Linux, not x86)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_isa(flags: frozenset[str]) -> str | None:
    """The oneDNN ISA cap for the processor's bf16 matrix units, or None if it has none."""
    return next((isa for flag, isa in BF16_ISAS if flag in flags), None)


def isa_cap(flags: frozenset[str], native_kernels: bool = True) -> str:
    """ONEDNN_MAX_CPU_ISA for this processor: its bf16 ISA where it has one and every conv runs on
    ddpm/kernels, else AVX2 (MindSpore's own convs are fast only there)."""
    isa = bf16_isa(flags) if native_kernels else None
    return isa or FALLBACK_ISA


def native_kernels_allowed() -> bool:
    """Whether the user lets ddpm/kernels run (DDPM_NATIVE_KERNELS=0 forbids it): the one reader of it."""
    return os.environ.get(NATIVE_KERNELS_ENV) != "0"


def apply_env_defaults() -> dict[str, str]:
    """Set each default that the user has not set; return the values now in force."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault(ISA_ENV, isa_cap(cpu_flags(), native_kernels_allowed()))
    return {key: os.environ[key] for key in (*ENV_DEFAULTS, ISA_ENV)}


def mindspore_convs_are_fast() -> bool:
    """Whether oneDNN's cap in force leaves MindSpore's own convolutions on their fast (AVX2) kernels."""
    return os.environ.get(ISA_ENV, "").upper() in MINDSPORE_CONV_ISAS


def lower_isa_cap() -> None:
    """Back to AVX2 for MindSpore's own convs when ddpm/kernels cannot be built; effective while
    oneDNN has dispatched nothing yet (the network is built before its first step)."""
    if os.environ.get(ISA_ENV) != FALLBACK_ISA:  # a consequence of the warning that called it: one warning
        log.info(
            "%s=%s -> %s: MindSpore's own convolutions are slow above it",
            ISA_ENV,
            os.environ.get(ISA_ENV),
            FALLBACK_ISA,
        )
        os.environ[ISA_ENV] = FALLBACK_ISA


# dnnl_cpu_isa_t (oneapi/dnnl/dnnl_types.h) -> the names ONEDNN_MAX_CPU_ISA takes
DNNL_ISAS = {
    0x1: "SSE41",
    0x3: "AVX",
    0x7: "AVX2",
    0xF: "AVX2_VNNI",
    0x1F: "AVX2_VNNI_2",
    0x27: "AVX512_CORE",
    0x67: "AVX512_CORE_VNNI",
    0xE7: "AVX512_CORE_BF16",
    0x1EF: "AVX10_1_512",
    0xFEF: "AVX10_1_512_AMX",
    0x1FEF: "AVX10_1_512_AMX_FP16",
    0x201FF: "AVX10_2_512",
    0x22FFF: "AVX10_2_512_AMX_2",
}


def effective_isa() -> str:
    """The ISA oneDNN dispatches to in this process (its cap and the processor's, whichever is lower),
    from MindSpore's own libdnnl; "" where that library is missing. Fixes the cap if nothing has yet."""
    import ctypes

    path = build.libdnnl_path()
    if path is None:
        return ""
    value = ctypes.CDLL(str(path)).dnnl_get_effective_cpu_isa()
    return DNNL_ISAS.get(value, hex(value))


def resolve_precision(
    precision: str, target: str | None = None, flags: frozenset[str] | None = None, isa: str | None = None
) -> Literal["fp32", "bf16"]:
    """fp32 or bf16 for `train.precision` (auto | fp32 | bf16) on device `target` (default: MindSpore's),
    a processor with `flags` (default: this one's) and oneDNN's cap `isa` (default: the one in force).
    auto is bf16 where the processor has bf16 matrix units (amx_bf16 or avx512_bf16) and the cap
    reaches them, else fp32; bf16 asked for where they are missing is fp32, with a warning naming why.
    A GPU or Ascend keeps MindSpore's own path, fp32."""
    if precision not in PRECISION_SETTINGS:
        raise ValueError(f"precision must be one of {PRECISION_SETTINGS}, got {precision!r}")
    target = device_target() if target is None else target
    if target != "CPU" and precision == "bf16":
        log.warning(
            "train.precision is bf16 but bf16 runs on the CPU's native kernels only: running fp32 on %s", target
        )
    if target != "CPU" or precision == "fp32":
        return "fp32"
    has_units = bf16_isa(cpu_flags() if flags is None else flags) is not None
    isa = os.environ.get(ISA_ENV, "") if isa is None else isa
    capped = isa.upper() in MINDSPORE_CONV_ISAS  # oneDNN has no bf16 convs at AVX2
    if precision == "bf16" and not (has_units and not capped):
        why = (
            f"{ISA_ENV}={isa} caps oneDNN below its bf16 kernels (unset it)"
            if has_units
            else "this processor has no bf16 units (amx_bf16, avx512_bf16)"
        )
        log.warning("train.precision is bf16 but %s: running fp32", why)
    return "bf16" if has_units and not capped else "fp32"


def gpu_evidence() -> str | None:
    """What shows an NVIDIA GPU on this machine (a device node, else nvidia-smi), or None."""
    nodes = sorted(DEV.glob(NVIDIA_NODES))
    return str(nodes[0]) if nodes else shutil.which(NVIDIA_SMI)


def select_device(device: str) -> str:
    """Make MindSpore run on `device` ('auto' = GPU if usable, else CPU); return the target."""
    import mindspore as ms

    target = device
    if device == "auto":
        target = "GPU" if ms.hal.is_available("GPU") else "CPU"
        evidence = gpu_evidence() if target == "CPU" else None
        if evidence is not None:  # else a user waits hours believing the GPU trains
            log.warning(
                "device 'auto' runs on the CPU although this machine has an NVIDIA GPU (%s): MindSpore %s "
                "cannot use it. %s; install those, or set train.device (sample: --device) to CPU to choose the CPU",
                evidence,
                ms.__version__,
                GPU_NEEDS,
            )
    elif device != "CPU" and not ms.hal.is_available(device):
        needs = GPU_NEEDS if device == "GPU" else f"{device} needs MindSpore's {device} package and drivers"
        raise DeviceError(
            f"train.device is {device!r} but MindSpore cannot use a {device} here. {needs}; "
            "set train.device to 'auto' or 'CPU' to run on the CPU."
        )
    # MindSpore fixes the device when the first kernel runs; a second fit() in one process reuses it.
    if not ms.hal.is_initialized(target):
        ms.set_device(target)
    log.info("MindSpore %s on %s", ms.__version__, target)
    return target


@dataclass(frozen=True)
class Backend:
    """What the networks of this process are built from."""

    device: str  # MindSpore's device target: CPU, GPU or Ascend
    # native: ddpm/kernels' C++ operators (CPU only: they read host memory); fallback: MindSpore operators in
    # ddpm/layers.py's faster CPU formulations; mindspore: MindSpore's own cells (GPU, Ascend)
    implementation: Implementation
    precision: Literal["fp32", "bf16"]


def device_target() -> str:
    """The device MindSpore runs on in this process (CPU until select_device says otherwise)."""
    import mindspore as ms

    return ms.get_context("device_target")


def backend(precision: str = "auto") -> Backend:
    """The backend for networks built now, with `precision` (train.precision) resolved on this device."""
    return resolve_backend(device_target(), precision)


@functools.cache  # once per process and setting: the warnings below are said once
def resolve_backend(device: str, precision: str) -> Backend:
    """`device`'s implementation, with `precision` (train.precision) resolved there; bf16 needs the kernels."""
    implementation = resolve_implementation(device)
    resolved = resolve_precision(precision, device)
    if resolved == "bf16" and implementation != "native":
        log.warning("precision bf16 needs the native kernels, which are unavailable: running fp32")
        resolved = "fp32"
    return Backend(device, implementation, resolved)


@functools.cache  # once per process and device: the kernels build (or fail, warned) once, and it is said once
def resolve_implementation(device: str) -> Implementation:
    """The one place that picks native kernels or MindSpore's operators: the kernels are CPU code behind
    MindSpore's Custom aot interface, which a GPU or Ascend would call with device pointers."""
    implementation: Implementation = "mindspore"
    if device == "CPU":  # None where DDPM_NATIVE_KERNELS=0 or they cannot be built (warned)
        implementation = "native" if native_library() is not None else "fallback"
    log.info("networks on %s: %s", device, IMPLEMENTATIONS[implementation])
    return implementation


@functools.cache  # once per process: compiled (or found in the cache) once, a failure warned once
def native_library() -> Path | None:
    """ddpm/kernels' compiled operator library, or None when MindSpore's own operators must do: the user
    forbids the kernels (DDPM_NATIVE_KERNELS=0), or they cannot be built (warned, and the ISA cap lowered)."""
    if not native_kernels_allowed():
        log.info("%s=0: using MindSpore's own operators", NATIVE_KERNELS_ENV)
        return None
    try:
        return build.build(build.find_toolchain())
    except build.KernelUnavailable as err:
        log.warning(
            "native kernels (ddpm/kernels) unavailable, using MindSpore's own operators (same results, "
            "slower training): %s",
            err,
        )
        lower_isa_cap()
        return None


def set_cpu_threads(threads: int) -> None:
    """Run MindSpore's CPU kernels on `threads` threads (0 keeps its default). MindSpore allows
    setting this once per process, so a later call with another value is ignored with a warning."""
    if not threads:
        return
    import mindspore as ms
    from mindspore._c_expression import RuntimeConf  # no public getter for the value in force

    if RuntimeConf.get_instance().is_op_threads_num_configured():
        log.warning("MindSpore's CPU thread count is already set in this process; train.threads=%d ignored", threads)
        return
    ms.device_context.cpu.op_tuning.threads_num(threads)
    log.info("MindSpore CPU kernels on %d thread(s)", threads)


def runtime_settings() -> dict[str, str]:
    """What a benchmark or a run should record about how MindSpore was set up."""
    import mindspore as ms

    implementation = resolve_implementation(device_target())
    return {
        "mindspore": ms.__version__,
        "device": device_target(),
        "native_kernels": "on" if implementation == "native" else f"off ({IMPLEMENTATIONS[implementation]})",
        **{key: os.environ.get(key, "") for key in (*ENV_DEFAULTS, ISA_ENV)},
    }
