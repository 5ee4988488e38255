"""Learning-rate schedules: the rate of every optimizer step, decided before training starts."""

from __future__ import annotations

import numpy as np


def cosine_decay(lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """A half cosine from `lr` to `min_lr` over the steps after the warm-up, float64 (total_steps,)."""
    step = np.arange(total_steps, dtype=np.float64)
    progress = np.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * progress))


def learning_rates(train, steps_per_epoch: int) -> np.ndarray:
    """The diffusion model's learning rate of every step of `train.epochs`, float32 (total_steps,).
    The schedule spans `train.lr_span` epochs: a shorter run stops part-way along it, a longer one
    continues at its last rate, so extending a training never restarts its curve."""
    span = train.lr_span * steps_per_epoch
    step = np.arange(span, dtype=np.float64)
    if train.lr_schedule == "tutorial_cosine":
        # mindspore.nn.cosine_decay_lr with decay_epoch = epochs: constant within an epoch.
        epoch = np.floor(step / steps_per_epoch)
        lr = train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + np.cos(np.pi * epoch / train.lr_span))
    elif train.lr_schedule == "cosine":
        lr = cosine_decay(train.lr, train.min_lr, span, train.warmup_steps)
    else:
        lr = np.full(span, train.lr)
    if train.warmup_steps:
        lr = np.minimum(lr, train.lr * (step + 1) / train.warmup_steps)
    total = train.epochs * steps_per_epoch
    lr = np.concatenate([lr, np.full(max(0, total - span), lr[-1])])[:total]
    return lr.astype(np.float32)
