"""The diffusion process: forward noising, the training loss, and the DDPM and DDIM samplers.

The schedule lives in float64 numpy; the forward process and the loss run as MindSpore ops
inside the jitted train step; the samplers run their per-step arithmetic in numpy around a
jitted noise prediction, so a sampler reads like the paper's equations.
"""
from __future__ import annotations

from typing import Callable, Iterable

import mindspore as ms
import numpy as np
from mindspore import ops

from ddpm.schedule import NoiseSchedule

# (x_t (B, C, H, W) float32, t (B,) int32) -> predicted noise (B, C, H, W) float32
NoisePredictor = Callable[[np.ndarray, np.ndarray], np.ndarray]


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
    """DDPM (Ho et al., 2020) with epsilon prediction, plus DDIM sampling (Song et al., 2021)."""

    def __init__(self, schedule: NoiseSchedule, loss: str = "huber"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.schedule = schedule
        self.timesteps = schedule.timesteps
        self.loss_fn = LOSSES[loss]
        self.sqrt_alphas_cumprod = ms.Tensor(schedule.sqrt_alphas_cumprod, ms.float32)
        self.sqrt_one_minus_alphas_cumprod = ms.Tensor(schedule.sqrt_one_minus_alphas_cumprod, ms.float32)

    @classmethod
    def from_config(cls, diffusion) -> "GaussianDiffusion":
        return cls(NoiseSchedule.from_config(diffusion), diffusion.loss)

    def q_sample(self, x0, t, noise):
        """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return extract(self.sqrt_alphas_cumprod, t) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def training_loss(self, model, x0, t, noise):
        """DDPM eq. 14 (simple loss), with the configured distance between true and predicted noise."""
        x_t = self.q_sample(x0, t, noise)
        return self.loss_fn(model(x_t, t), noise)

    def predict_x0(self, x_t: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        """DDPM eq. 15 solved for x0: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        s = self.schedule
        return (x_t - s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.sqrt_alphas_cumprod[t]

    def ddpm_timesteps(self) -> list[int]:
        return list(range(self.timesteps - 1, -1, -1))

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps spread evenly over [T-1, 0], highest first."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.timesteps}], got {steps}")
        return sorted({int(round(v)) for v in np.linspace(0, self.timesteps - 1, steps)}, reverse=True)

    def ddpm_step(self, x_t, t: int, eps, noise, clip_x0: bool):
        """One ancestral step x_t -> x_{t-1} (DDPM algorithm 2, via the posterior of eq. 7)."""
        s = self.schedule
        x0 = self.predict_x0(x_t, t, eps)  # 1. predicted x0 (eq. 15)
        if clip_x0:
            x0 = np.clip(x0, -1.0, 1.0)  # 2. keep it in the data range
        mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t  # 3. posterior mean (eq. 7)
        if t == 0:
            return mean  # 4. no noise on the last step
        return mean + np.sqrt(s.posterior_variance[t]) * noise  # 4. add posterior variance

    def ddim_step(self, x_t, t: int, t_prev: int, eps, noise, eta: float, clip_x0: bool):
        """One DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12); t_prev = -1 means x0."""
        s = self.schedule
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
        x0 = self.predict_x0(x_t, t, eps)  # 1. predicted x0
        if clip_x0:
            x0 = np.clip(x0, -1.0, 1.0)  # 2. clip, then re-derive the noise it implies
            eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
        sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))  # 3. eq. 16
        direction = np.sqrt(1.0 - a_prev - sigma ** 2) * eps  # 4. "direction pointing to x_t"
        return np.sqrt(a_prev) * x0 + direction + sigma * noise  # 5. eq. 12

    def sample(self, predict_noise: NoisePredictor, shape: tuple[int, ...], seed: int | list[int], sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, clip_x0: bool = True,
               progress: Callable[[Iterable], Iterable] = iter) -> np.ndarray:
        """Draw images of `shape` (B, C, H, W) from pure noise; same seed, same images."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape)  # x_T ~ N(0, I), float64
        if sampler == "ddpm":
            for t in progress(self.ddpm_timesteps()):
                eps = self._eps(predict_noise, x, t)
                x = self.ddpm_step(x, t, eps, rng.standard_normal(shape), clip_x0)
        elif sampler == "ddim":
            ts = self.ddim_timesteps(steps)
            for t, t_prev in progress(list(zip(ts, ts[1:] + [-1]))):
                eps = self._eps(predict_noise, x, t)
                noise = rng.standard_normal(shape) if eta > 0 else 0.0
                x = self.ddim_step(x, t, t_prev, eps, noise, eta, clip_x0)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        return x.astype(np.float32)

    @staticmethod
    def _eps(predict_noise: NoisePredictor, x: np.ndarray, t: int) -> np.ndarray:
        t_batch = np.full((x.shape[0],), t, dtype=np.int32)
        return predict_noise(x.astype(np.float32), t_batch).astype(np.float64)


def make_noise_predictor(net) -> NoisePredictor:
    """A jitted inference-mode forward of `net` on numpy inputs."""
    net.set_train(False)

    @ms.jit
    def forward(x_t, t):
        return net(x_t, t)

    def predict(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return forward(ms.Tensor(x_t), ms.Tensor(t)).asnumpy()

    return predict
