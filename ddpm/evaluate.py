"""Held-out denoising loss: how well a checkpoint predicts noise on test images it never saw.

Every image is noised at the same evenly spaced timesteps with noise drawn from a fixed seed, so
two checkpoints of the same process are scored on identical inputs.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from ddpm.data import build_dataset, verify_dataset
from ddpm.sampling import load_sampler

log = logging.getLogger(__name__)


def t_grid(timesteps: int, points: int) -> np.ndarray:
    """`points` timesteps evenly spread over [0, T-1], as int32."""
    return np.unique(np.round(np.linspace(0, timesteps - 1, points)).astype(np.int32))


def evaluate_checkpoint(checkpoint: str, data_root: str, device: str = "auto", progress: bool = True) -> dict[str, float]:
    """Mean squared error of the predicted noise on test images, overall and per timestep."""
    verify_dataset(data_root)
    sampler = load_sampler(checkpoint, device)
    config, schedule = sampler.config, sampler.diffusion.schedule
    ev = config.evaluate
    ts = t_grid(schedule.timesteps, ev.t_points)
    rng = np.random.default_rng(ev.seed)
    dataset = build_dataset(data_root, ev.batch_size, seed=ev.seed, epoch=0, limit=ev.num_images, usage="test")
    squared_errors = {int(t): [] for t in ts}
    batches = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    for (x0,) in tqdm(batches, total=ev.num_images // ev.batch_size, desc="evaluating", disable=not progress):
        x0 = x0.astype(np.float64)
        for t in ts:
            noise = rng.standard_normal(x0.shape)
            x_t = schedule.sqrt_alphas_cumprod[t] * x0 + schedule.sqrt_one_minus_alphas_cumprod[t] * noise
            eps = sampler.predict(x_t.astype(np.float32), np.full((len(x0),), t, np.int32))
            squared_errors[int(t)].append(np.mean((eps - noise) ** 2, axis=(1, 2, 3)))
    per_t = {t: float(np.concatenate(v).mean()) for t, v in squared_errors.items()}
    metrics = {"eval_loss": float(np.mean(list(per_t.values()))), **{f"eval_loss_t{t:04d}": v for t, v in per_t.items()}}
    log.info("held-out denoising MSE %.5f over %d images x %d timesteps", metrics["eval_loss"], ev.num_images, len(ts))
    return metrics
