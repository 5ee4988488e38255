"""Process-level settings for MindSpore: fast CPU defaults, quiet logs, device selection.

MindSpore reads its environment when it is first imported, so `apply_env_defaults` runs from
`ddpm/__init__.py`, before any module here imports mindspore. Each value is a default: a
variable the user has already set wins.
"""
from __future__ import annotations

import logging
import os

from ddpm.errors import DeviceError

log = logging.getLogger(__name__)

# Measured on a 2-core x86 VM (see docs/performance.md): without these a training step of the
# tutorial U-Net at batch 16 took ~18 s; with them ~0.6 s.
ENV_DEFAULTS = {
    "GLOG_v": "3",  # MindSpore's C++ log level: errors only, no [WARNING] flood
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's AVX-512 kernels were far slower on this CPU
    "MS_DEV_HOST_BLOCKING_RUN": "1",  # run kernels synchronously: no host/device thread ping-pong
}


def apply_env_defaults() -> dict[str, str]:
    """Set each default that the user has not set; return the values now in force."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in ENV_DEFAULTS}


def select_device(device: str) -> str:
    """Make MindSpore run on `device` ('auto' = GPU if usable, else CPU); return the target."""
    import mindspore as ms

    target = device
    if device == "auto":
        target = "GPU" if ms.hal.is_available("GPU") else "CPU"
    elif device != "CPU" and not ms.hal.is_available(device):
        raise DeviceError(
            f"train.device is {device!r} but MindSpore cannot use a {device} here. "
            f"{device} needs MindSpore's {device} package and drivers (GPU: CUDA 11.1 or 11.6 with cuDNN 8); "
            "set train.device to 'auto' or 'CPU' to run on the CPU.")
    # MindSpore fixes the device when the first kernel runs; a second fit() in one process reuses it.
    if not ms.hal.is_initialized(target):
        ms.set_device(target)
    log.info("MindSpore %s on %s", ms.__version__, target)
    return target


def set_cpu_threads(threads: int) -> None:
    """Run MindSpore's CPU kernels on `threads` threads (0 keeps its default). MindSpore allows
    setting this once per process, so a later call with another value is ignored with a warning."""
    if not threads:
        return
    import mindspore as ms
    from mindspore._c_expression import RuntimeConf  # no public getter for the value in force

    if RuntimeConf.get_instance().is_op_threads_num_configured():
        log.warning("MindSpore's CPU thread count is already set in this process; train.threads=%d ignored",
                    threads)
        return
    ms.device_context.cpu.op_tuning.threads_num(threads)
    log.info("MindSpore CPU kernels on %d thread(s)", threads)


def runtime_settings() -> dict[str, str]:
    """What a benchmark or a run should record about how MindSpore was set up."""
    import mindspore as ms

    from ddpm.kernels.build import native_library

    return {"mindspore": ms.__version__, "device": ms.get_context("device_target"),
            "native_kernels": "on" if native_library() is not None else "off (MindSpore's own operators)",
            **{key: os.environ.get(key, "") for key in ENV_DEFAULTS}}
