"""The held-out denoising loss: how well a network predicts the noise on test images at a grid of
timesteps, with noise fixed by evaluate.seed. Part of every evaluation (ddpm.evaluate), and what
post-hoc EMA chooses its average's length by (ddpm.posthoc_ema): cheap, and on the quick start it
ranked ten averages as their FID did."""

from __future__ import annotations

import logging

import numpy as np

from ddpm.checkpoint_sampler import CheckpointSampler
from ddpm.config import Config
from ddpm.data import build_dataset
from ddpm.logs import progress_bar

log = logging.getLogger(__name__)


def t_grid(timesteps: int, points: int) -> np.ndarray:
    """`points` timesteps evenly spread over [0, T-1], as int32."""
    return np.unique(np.round(np.linspace(0, timesteps - 1, points)).astype(np.int32))


def denoising_loss(sampler: CheckpointSampler, config: Config, progress: bool = True) -> dict[str, float]:
    """Mean squared error of the predicted noise on test images, overall and per timestep."""
    ev, schedule = config.evaluate, sampler.schedule
    ts = t_grid(schedule.timesteps, ev.t_points)
    rng = np.random.default_rng(ev.seed)
    dataset = build_dataset(
        config.data.root, ev.batch_size, seed=ev.seed, epoch=0, limit=ev.num_images, flip=False, usage="test"
    )
    squared_errors: dict[int, list[np.ndarray]] = {int(t): [] for t in ts}
    batches = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    bar = progress_bar(
        batches,
        total=ev.num_images // ev.batch_size,
        desc="denoising loss",
        unit="batch",
        images_per_unit=ev.batch_size,
        enabled=progress,
    )
    for (x0,) in bar:
        x0 = x0.astype(np.float64)
        for t in ts:
            noise = rng.standard_normal(x0.shape)
            x_t = schedule.sqrt_alphas_cumprod[t] * x0 + schedule.sqrt_one_minus_alphas_cumprod[t] * noise
            eps = sampler.predict(x_t.astype(np.float32), np.full((len(x0),), t, np.int32))
            squared_errors[int(t)].append(np.mean((eps - noise) ** 2, axis=(1, 2, 3)))
    per_t = {t: float(np.concatenate(v).mean()) for t, v in squared_errors.items()}
    metrics = {
        "eval_loss": float(np.mean(list(per_t.values()))),
        **{f"eval_loss_t{t:04d}": v for t, v in per_t.items()},
    }
    log.info("held-out denoising MSE %.5f over %d images x %d timesteps", metrics["eval_loss"], ev.num_images, len(ts))
    return metrics
