"""The forward process and the training loss (DDPM, Ho et al., 2020, epsilon prediction).

The schedule lives in float64 numpy (`ddpm.schedule`); here its arrays become MindSpore tensors
for the jitted train step. The samplers (the reverse process) live in `ddpm.samplers`.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from ddpm.schedule import NoiseSchedule


def extract(a: ms.Tensor, t: ms.Tensor) -> ms.Tensor:
    """Gather a[t] for each sample and shape it to broadcast over images: (T,), (B,) -> (B, 1, 1, 1)."""
    return ops.gather(a, t, 0).reshape(-1, 1, 1, 1)


def l1_loss(eps, noise):
    return ops.abs(eps - noise).mean()


def l2_loss(eps, noise):
    return ops.square(eps - noise).mean()


def huber_loss(eps, noise):
    """Huber with delta 1, equal to the tutorial's SmoothL1Loss(beta=1): 0.5 * err**2 below 1."""
    return ops.huber_loss(eps, noise, reduction="mean", delta=1.0)


LOSSES = {"l1": l1_loss, "l2": l2_loss, "huber": huber_loss}


class GaussianDiffusion:
    """q(x_t | x0) and the simple loss between the true and the predicted noise."""

    def __init__(self, schedule: NoiseSchedule, loss: str = "huber"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.schedule = schedule
        self.timesteps = schedule.timesteps
        self.loss_fn = LOSSES[loss]
        self.sqrt_alphas_cumprod = ms.Tensor(schedule.sqrt_alphas_cumprod, ms.float32)
        self.sqrt_one_minus_alphas_cumprod = ms.Tensor(schedule.sqrt_one_minus_alphas_cumprod, ms.float32)

    @classmethod
    def from_config(cls, diffusion) -> GaussianDiffusion:
        return cls(NoiseSchedule.from_config(diffusion), diffusion.loss)

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return extract(self.sqrt_alphas_cumprod, t) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def training_loss(self, model, x0, t, noise):
        """DDPM eq. 14 (simple loss), with the configured distance between true and predicted noise."""
        x_t = self.q_sample(x0, t, noise)
        return self.loss_fn(model(x_t, t), noise)
