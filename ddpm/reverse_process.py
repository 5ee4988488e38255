"""The reverse process: DDPM's ancestral sampler, DDIM and DPM-Solver++(2M), in float64 numpy
around a noise predictor.

No MindSpore here: a sampler takes the schedule's arrays and a function that predicts the noise,
so each step reads like the paper's equations. `ddpm.checkpoint_sampler` checks requests and batches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import get_args

import numpy as np

from ddpm.config import Sampler
from ddpm.schedule import NoiseSchedule

# (x_t (B, C, H, W) float32, t (B,) int32) -> predicted noise (B, C, H, W) float32
NoisePredictor = Callable[[np.ndarray, np.ndarray], np.ndarray]
SAMPLERS: tuple[str, ...] = get_args(Sampler)  # the names `sample` takes, as the config spells them


def predict_x0(s: NoiseSchedule, x_t: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
    """DDPM eq. 15 solved for x0: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (x_t - s.sqrt_one_minus_alphas_cumprod[t] * eps) / s.sqrt_alphas_cumprod[t]


def eps_from_v(s: NoiseSchedule, x_t: np.ndarray, t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The noise a v-prediction implies: eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t, t (B,)."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)  # (B,) -> (B, 1, 1, 1)
    return s.sqrt_alphas_cumprod[t].reshape(shape) * v + s.sqrt_one_minus_alphas_cumprod[t].reshape(shape) * x_t


def as_noise_predictor(predict: NoisePredictor, s: NoiseSchedule, prediction: str) -> NoisePredictor:
    """A network's output, whichever it predicts, as the noise every sampler here takes."""
    if prediction == "eps":
        return predict

    def predict_noise(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        v = predict(x_t, t).astype(np.float64)
        return eps_from_v(s, x_t.astype(np.float64), t, v).astype(np.float32)

    return predict_noise


def ddpm_timesteps(timesteps: int) -> list[int]:
    return list(range(timesteps - 1, -1, -1))


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly over [T-1, 0], highest first."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}], got {steps}")
    return sorted({int(v) for v in np.rint(np.linspace(0, timesteps - 1, steps))}, reverse=True)


def ddpm_step(
    s: NoiseSchedule, x_t: np.ndarray, t: int, eps: np.ndarray, noise: np.ndarray, clip_x0: bool
) -> np.ndarray:
    """One ancestral step x_t -> x_{t-1} (DDPM algorithm 2, via the posterior of eq. 7)."""
    x0 = predict_x0(s, x_t, t, eps)  # 1. predicted x0 (eq. 15)
    if clip_x0:
        x0 = np.clip(x0, -1.0, 1.0)  # 2. keep it in the data range
    mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t  # 3. posterior mean (eq. 7)
    if t == 0:
        return mean  # 4. no noise on the last step
    return mean + np.sqrt(s.posterior_variance[t]) * noise  # 4. add posterior variance


def ddim_step(
    s: NoiseSchedule,
    x_t: np.ndarray,
    t: int,
    t_prev: int,
    eps: np.ndarray,
    noise: np.ndarray | float,
    eta: float,
    clip_x0: bool,
) -> np.ndarray:
    """One DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12); t_prev = -1 means x0."""
    a_t = s.alphas_cumprod[t]
    a_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
    x0 = predict_x0(s, x_t, t, eps)  # 1. predicted x0
    if clip_x0:
        x0 = np.clip(x0, -1.0, 1.0)  # 2. clip, then re-derive the noise it implies
        eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))  # 3. eq. 16
    direction = np.sqrt(1.0 - a_prev - sigma**2) * eps  # 4. "direction pointing to x_t"
    return np.sqrt(a_prev) * x0 + direction + sigma * noise  # 5. eq. 12


def log_snr_half(s: NoiseSchedule, t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) (Lu et al., 2022)."""
    return float(np.log(s.sqrt_alphas_cumprod[t]) - np.log(s.sqrt_one_minus_alphas_cumprod[t]))


def dpmpp_2m_step(
    s: NoiseSchedule, x_t: np.ndarray, t: int, t_prev: int, x0: np.ndarray, previous: tuple[float, np.ndarray] | None
) -> tuple[np.ndarray, tuple[float, np.ndarray] | None]:
    """One DPM-Solver++(2M) step x_t -> x_{t_prev} from the predicted x0 (Lu et al., 2022, algorithm 2).
    `previous` is (h, x0) of the step before, for the second-order correction; t_prev = -1 means x0.
    Returns x_{t_prev} and this step's (h, x0), the next step's `previous`."""
    if t_prev < 0:
        return x0, None  # sigma = 0: the last step lands on the (first-order) data prediction
    h = log_snr_half(s, t_prev) - log_snr_half(s, t)  # 1. step size in lambda
    d = x0
    if previous is not None:
        r = previous[0] / h  # 2. ratio of the last two step sizes
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[1]  # 3. extrapolated data prediction
    ratio = s.sqrt_one_minus_alphas_cumprod[t_prev] / s.sqrt_one_minus_alphas_cumprod[t]
    x_prev = ratio * x_t - s.sqrt_alphas_cumprod[t_prev] * np.expm1(-h) * d  # 4. eq. 13's exact linear part
    return x_prev, (h, x0)


def sample(
    predict_noise: NoisePredictor,
    s: NoiseSchedule,
    shape: tuple[int, ...],
    seed: int | list[int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    clip_x0: bool = True,
    progress: Callable[[Iterable], Iterable] = iter,
) -> np.ndarray:
    """Draw images of `shape` (B, C, H, W) from pure noise; same seed, same images. float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)  # x_T ~ N(0, I), float64
    if sampler == "ddpm":
        for t in progress(ddpm_timesteps(s.timesteps)):
            eps = _eps(predict_noise, x, t)
            x = ddpm_step(s, x, t, eps, rng.standard_normal(shape), clip_x0)
    elif sampler == "ddim":
        ts = ddim_timesteps(s.timesteps, steps)
        for t, t_prev in progress(list(zip(ts, [*ts[1:], -1], strict=True))):
            eps = _eps(predict_noise, x, t)
            noise = rng.standard_normal(shape) if eta > 0 else 0.0
            x = ddim_step(s, x, t, t_prev, eps, noise, eta, clip_x0)
    elif sampler == "dpmpp_2m":
        ts = ddim_timesteps(s.timesteps, steps)
        previous = None
        for t, t_prev in progress(list(zip(ts, [*ts[1:], -1], strict=True))):
            x0 = predict_x0(s, x, t, _eps(predict_noise, x, t))
            if clip_x0:
                x0 = np.clip(x0, -1.0, 1.0)  # the "++": thresholding the data prediction keeps it stable
            x, previous = dpmpp_2m_step(s, x, t, t_prev, x0, previous)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return x.astype(np.float32)


def _eps(predict_noise: NoisePredictor, x: np.ndarray, t: int) -> np.ndarray:
    t_batch = np.full((x.shape[0],), t, dtype=np.int32)
    return predict_noise(x.astype(np.float32), t_batch).astype(np.float64)
