"""`ddpm benchmark`: training and sampling throughput of the configured U-Net, as JSON.

Reports the same figures as the PyTorch reference in benchmarks/torch_reference.py (img_s_best, img_s_med,
ms_min, the other processes' share of the CPU while timing) so the two can be compared, and the
wall time of drawing 64 images with DDIM-50 through `ddpm sample`'s code (sample_batches). Every
record carries the precision in force and the ISA oneDNN dispatched to.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import mindspore as ms
import numpy as np

from ddpm.checkpoint_sampler import SampleRequest, make_noise_predictor, sample_batches
from ddpm.config import Config
from ddpm.runtime import backend, effective_isa, runtime_settings, select_device
from ddpm.train import Trainer

TARGET_SECONDS = 4.0  # each timed repeat runs about this long
MAX_STEPS = 200
DDIM_IMAGES, DDIM_STEPS = 64, 50  # the sampling figure users wait for: one grid


def cpu_busy_seconds() -> float:
    """Seconds of CPU time all processes have used (from /proc/stat); 0 where it is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_calls(fn: Callable[[int], object], repeats: int, warmup: int) -> dict:
    """Time `fn(i)` per call over `repeats` repeats, after compiling and warming up."""
    started = time.perf_counter()
    fn(0)
    first = time.perf_counter() - started
    for i in range(warmup):
        fn(i + 1)
    started = time.perf_counter()
    fn(0)
    steps = max(2, min(MAX_STEPS, int(TARGET_SECONDS / max(time.perf_counter() - started, 1e-4))))
    per_call, foreign = [], []
    for _ in range(repeats):
        busy0, own0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        for i in range(steps):
            fn(i)
        wall = time.perf_counter() - t0
        other = max(0.0, (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0))
        per_call.append(wall / steps)
        foreign.append(round(other / (wall * (os.cpu_count() or 1)), 3))
    seconds = np.array(per_call)
    return {
        "steps": steps,
        "repeats": repeats,
        "first_call_s": round(first, 2),
        "ms_min": round(seconds.min() * 1e3, 2),
        "ms_med": round(float(np.median(seconds)) * 1e3, 2),
        "foreign_frac": foreign,
        "_best": float(seconds.min()),
        "_med": float(np.median(seconds)),
    }


def bench_train(config: Config, batch: int, repeats: int, warmup: int) -> dict:
    trainer = Trainer(config)
    rng = np.random.default_rng(0)
    pool = [
        (
            ms.Tensor(rng.uniform(-1, 1, (batch, 1, config.model.image_size, config.model.image_size)), ms.float32),
            ms.Tensor(rng.integers(0, trainer.diffusion.timesteps, (batch,)), ms.int32),
            ms.Tensor(rng.standard_normal((batch, 1, config.model.image_size, config.model.image_size)), ms.float32),
        )
        for _ in range(4)
    ]
    result = time_calls(lambda i: trainer.train_step(*pool[i % 4], 0.0), repeats, warmup)
    best, med = result.pop("_best"), result.pop("_med")  # before the record is built from what is left
    return {
        "what": "train",
        "batch": batch,
        **result,
        "img_s_best": round(batch / best, 1),
        "img_s_med": round(batch / med, 1),
    }


def bench_sample(config: Config, batch: int, repeats: int, warmup: int) -> dict:
    """U-Net evaluations per second in inference mode: one sampling step of `batch` images."""
    trainer = Trainer(config)
    predict = make_noise_predictor(trainer.net, trainer.diffusion.schedule, trainer.diffusion.prediction)
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((batch, 1, config.model.image_size, config.model.image_size)).astype(np.float32)
    ts = [np.full((batch,), trainer.diffusion.timesteps - 1 - i, np.int32) for i in range(4)]
    result = time_calls(lambda i: predict(x_t, ts[i % 4]), repeats, warmup)
    best, med = result.pop("_best"), result.pop("_med")
    return {
        "what": "sample",
        "batch": batch,
        **result,
        "evals_s_best": round(1 / best, 2),
        "evals_s_med": round(1 / med, 2),
        "img_s_best": round(batch / best, 1),
    }


def bench_ddim(config: Config, repeats: int) -> dict:
    """Wall time of DDIM-50 for 64 images in one batch, as `ddpm sample` draws them (after compiling)."""
    trainer = Trainer(config)
    predict = trainer.noise_predictor()
    shape = (DDIM_IMAGES, config.model.channels, config.model.image_size, config.model.image_size)
    predict(np.zeros(shape, np.float32), np.zeros((DDIM_IMAGES,), np.int32))  # compile
    walls = []
    for seed in range(repeats):
        started = time.perf_counter()
        request = SampleRequest(DDIM_IMAGES, seed, "ddim", DDIM_STEPS, config.sample.eta)
        list(
            sample_batches(
                predict, trainer.diffusion.schedule, request, config.model, DDIM_IMAGES, config.sample.clip_x0
            )
        )
        walls.append(time.perf_counter() - started)
    return {
        "what": "ddim",
        "batch": DDIM_IMAGES,
        "steps": DDIM_STEPS,
        "repeats": repeats,
        "wall_s_min": round(min(walls), 2),
        "wall_s_med": round(float(np.median(walls)), 2),
    }


def run_benchmark(
    config: Config,
    train_batches=(16, 128),
    sample_batch: int = 64,
    repeats: int = 3,
    warmup: int = 3,
    ddim: bool = True,
) -> list[dict]:
    """One JSON-ready record per measurement, each carrying the settings in force."""
    select_device(config.train.device)
    from ddpm.unet import build_unet, count_parameters

    settings = {
        **runtime_settings(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "params": count_parameters(build_unet(config.model, config.train.precision)),
        "model": config.to_dict()["model"],
        "precision_setting": config.train.precision,
        "precision": backend(config.train.precision).precision,
    }
    records = [bench_train(config, b, repeats, warmup) for b in train_batches]
    records.append(bench_sample(config, sample_batch, repeats, warmup))
    if ddim:
        records.append(bench_ddim(config, repeats))
    settings["onednn_isa"] = effective_isa()  # what oneDNN dispatched to, now that it has run
    return [{**settings, **r} for r in records]
