"""Sampling from a saved checkpoint: what `ddpm sample` and the registered model use."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mindspore as ms
import numpy as np
from tqdm import tqdm

from ddpm.checkpoint import CheckpointError, load_checkpoint, sampling_weights
from ddpm.config import Config
from ddpm.diffusion import GaussianDiffusion, NoisePredictor, make_noise_predictor
from ddpm.runtime import select_device
from ddpm.unet import build_unet

@dataclasses.dataclass
class CheckpointSampler:
    config: Config
    diffusion: GaussianDiffusion
    predict: NoisePredictor

    def draw(self, num: int, seed: int = 0, sampler: str | None = None, steps: int | None = None,
             eta: float | None = None, progress: bool = False) -> np.ndarray:
        """(num, C, H, W) float32 images in [-1, 1]; the same arguments give the same images."""
        config = self.config
        if eta is not None:
            config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, eta=eta))
        return draw_samples(self.predict, self.diffusion, config, num, seed, progress, sampler, steps)


def load_sampler(path: str | Path, device: str = "auto", use_ema: bool = True) -> CheckpointSampler:
    """Build the network from the checkpoint's own config and load its EMA weights (if any)."""
    select_device(device)
    state = load_checkpoint(path)
    net = build_unet(state.config.model, state.config.train.precision)  # auto for checkpoints from before
    not_loaded, _ = ms.load_param_into_net(net, sampling_weights(state, use_ema), strict_load=True)
    if not_loaded:
        raise CheckpointError(f"{path} lacks weights for {not_loaded[:3]}")
    return CheckpointSampler(state.config, GaussianDiffusion.from_config(state.config.diffusion),
                             make_noise_predictor(net))


def draw_samples(predict: NoisePredictor, diffusion: GaussianDiffusion, config: Config, num: int | None = None,
                 seed: int | None = None, progress: bool = True, sampler: str | None = None,
                 steps: int | None = None) -> np.ndarray:
    """(num, C, H, W) images in [-1, 1], drawn in batches of sample.batch_size."""
    s, m = config.sample, config.model
    num = s.num if num is None else num
    seed = s.seed if seed is None else seed
    sampler = sampler or s.sampler
    steps = steps or s.steps
    starts = range(0, num, s.batch_size)
    batches = []
    with tqdm(total=num, desc=f"sampling {sampler}", unit="img", disable=not progress) as images_bar:
        for i, start in enumerate(starts):
            size = min(s.batch_size, num - start)
            bar = (lambda it: tqdm(it, desc=f"batch {i + 1}/{len(starts)}", unit="step", leave=False)) \
                if progress else iter
            batches.append(diffusion.sample(predict, (size, m.channels, m.image_size, m.image_size), [seed, i],
                                            sampler, steps, s.eta, s.clip_x0, bar))
            images_bar.update(size)
    return np.clip(np.concatenate(batches), -1.0, 1.0)
