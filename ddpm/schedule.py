"""Beta schedules and the arrays derived from them, in float64 numpy (no MindSpore)."""

from __future__ import annotations

import numpy as np

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal (2021), eq. 17
MAX_BETA = 0.999  # cosine betas are clipped here to avoid a singularity at t = T
SIGMOID_RANGE = 6.0  # sigmoid schedule spans sigmoid(-6)..sigmoid(6)
REFERENCE_TIMESTEPS = 1000  # the DDPM paper's T, for which 1e-4..0.02 was chosen


def linear_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Linear betas as in Ho et al. (2020); the tutorial uses it unscaled with T=200."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def scaled_linear_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Linear betas scaled by 1000/T (improved-diffusion) so alpha_bar_T ~ 0 for any T."""
    scale = REFERENCE_TIMESTEPS / timesteps
    return np.linspace(beta_start * scale, min(beta_end * scale, MAX_BETA), timesteps, dtype=np.float64)


def cosine_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Cosine alpha_bar of Nichol & Dhariwal (2021), eq. 17; beta_start/end are unused."""
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, MAX_BETA)


def quadratic_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas linear in sqrt(beta) (Annotated Diffusion, corrected version)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=np.float64) ** 2


def sigmoid_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas following a sigmoid from beta_start to beta_end (Annotated Diffusion)."""
    s = 1 / (1 + np.exp(-np.linspace(-SIGMOID_RANGE, SIGMOID_RANGE, timesteps, dtype=np.float64)))
    return s * (beta_end - beta_start) + beta_start


SCHEDULES = {
    "linear": linear_beta_schedule,
    "scaled_linear": scaled_linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def make_betas(name: str, timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](timesteps, beta_start, beta_end)


class NoiseSchedule:
    """The betas and everything DDPM derives from them, all float64 arrays of shape (T,)."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and ((betas > 0) & (betas < 1)).all(), "betas must lie in (0, 1)"
        self.betas = betas
        self.timesteps = len(betas)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas = np.sqrt(1.0 / self.alphas)
        # DDPM eq. 7: variance of q(x_{t-1} | x_t, x0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # DDPM eq. 7: the posterior mean is coef1 * x0 + coef2 * x_t
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        assert (np.diff(self.alphas_cumprod) < 0).all(), "alpha_bar must decrease strictly"

    @classmethod
    def from_config(cls, diffusion) -> NoiseSchedule:
        return cls(make_betas(diffusion.schedule, diffusion.timesteps, diffusion.beta_start, diffusion.beta_end))
