"""The forward process and the training loss (DDPM, Ho et al., 2020): the network predicts the noise
(epsilon) or v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho, 2022).

The schedule lives in float64 numpy (`ddpm.schedule`); here its arrays become MindSpore tensors
for the jitted train step. The samplers (the reverse process) live in `ddpm.reverse_process`.
"""

from __future__ import annotations

from typing import get_args

import mindspore as ms
import numpy as np
from mindspore import ops

from ddpm.config import Prediction
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


def l1_distance(eps, noise):
    return ops.abs(eps - noise)


def l2_distance(eps, noise):
    return ops.square(eps - noise)


def huber_distance(eps, noise):
    return ops.huber_loss(eps, noise, reduction="none", delta=1.0)


DISTANCES = {"l1": l1_distance, "l2": l2_distance, "huber": huber_distance}  # elementwise, for weighted losses


def min_snr_weights(s: NoiseSchedule, gamma: float, prediction: str = "eps") -> np.ndarray:
    """Min-SNR-gamma (Hang et al., 2023, eq. 4) as a weight on the epsilon or v loss, float64 (T,):
    min(SNR_t, gamma) / SNR_t for epsilon, min(SNR_t, gamma) / (SNR_t + 1) for v."""
    snr = s.alphas_cumprod / (1.0 - s.alphas_cumprod)
    return np.minimum(snr, gamma) / (snr + 1.0 if prediction == "v" else snr)


def sigmoid_weights(s: NoiseSchedule, bias: float, prediction: str = "eps") -> np.ndarray:
    """Kingma & Gao (2023)'s sigmoid weighting w(lambda) = sigmoid(bias - lambda), lambda = log SNR, as a
    weight on the epsilon or v loss at uniformly drawn t, float64 (T,) with mean 1. Their weighted loss is
    E_t[w(lambda_t) |d lambda / dt| ||eps - eps_hat||^2]: the plain loss weighs by how densely the schedule
    packs lambda, so the weight is w times |d lambda / dt|; v's loss is (SNR + 1) / SNR times epsilon's."""
    snr = s.alphas_cumprod / (1.0 - s.alphas_cumprod)
    log_snr = np.log(snr)
    weights = np.abs(np.gradient(log_snr)) / (1.0 + np.exp(log_snr - bias))  # sigmoid(b - l) = 1 / (1 + e^(l - b))
    if prediction == "v":
        weights = weights * snr / (snr + 1.0)
    return weights / weights.mean()


LOSS_WEIGHTS = {
    "min_snr": lambda s, diffusion: min_snr_weights(s, diffusion.min_snr_gamma, diffusion.prediction),
    "sigmoid": lambda s, diffusion: sigmoid_weights(s, diffusion.sigmoid_bias, diffusion.prediction),
}  # diffusion.loss_weighting -> (T,) weights; "none" is the plain mean


class GaussianDiffusion:
    """q(x_t | x0) and the simple loss between the network's output and its target (noise or v)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        loss: str = "huber",
        weights: np.ndarray | None = None,
        prediction: str = "eps",
    ):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        if prediction not in get_args(Prediction):
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {get_args(Prediction)}")
        self.schedule = schedule
        self.prediction = prediction
        self.timesteps = schedule.timesteps
        self.loss_fn = LOSSES[loss]
        self.distance = DISTANCES[loss]
        # (T,) per-timestep loss weights, or None: the plain mean over every element (DDPM eq. 14)
        self.weights = None if weights is None else ms.Tensor(weights, ms.float32)
        self.sqrt_alphas_cumprod = ms.Tensor(schedule.sqrt_alphas_cumprod, ms.float32)
        self.sqrt_one_minus_alphas_cumprod = ms.Tensor(schedule.sqrt_one_minus_alphas_cumprod, ms.float32)

    @classmethod
    def from_config(cls, diffusion) -> GaussianDiffusion:
        schedule = NoiseSchedule.from_config(diffusion)
        weighting = LOSS_WEIGHTS.get(diffusion.loss_weighting)
        weights = None if weighting is None else weighting(schedule, diffusion)
        return cls(schedule, diffusion.loss, weights, diffusion.prediction)

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return extract(self.sqrt_alphas_cumprod, t) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def target(self, x0, t, noise):
        """What the network learns to output: the noise, or v (Salimans & Ho, 2022, section 4)."""
        if self.prediction == "eps":
            return noise
        return extract(self.sqrt_alphas_cumprod, t) * noise - extract(self.sqrt_one_minus_alphas_cumprod, t) * x0

    def training_loss(self, model, x0, t, noise):
        """DDPM eq. 14 (simple loss), with the configured distance between the target and the output;
        with weights, each image's mean distance weighted by its timestep's weight."""
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)
        target = self.target(x0, t, noise)
        if self.weights is None:
            return self.loss_fn(output, target)
        per_image = self.distance(output, target).mean(axis=(1, 2, 3))  # (B,)
        return (ops.gather(self.weights, t, 0) * per_image).mean()
