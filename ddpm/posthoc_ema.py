"""Post-hoc EMA (Karras et al., 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3 and appendix C): train once, choose the length of the weights' average after.

During training each profile keeps a power-function average of the weights: after n steps, the
weights of step tau (1 <= tau <= n) count in proportion to tau^gamma, which the usual update
`shadow = decay * shadow + (1 - decay) * w` gives with decay = (1 - 1/n)^(gamma + 1). A profile
is named by its length sigma_rel, the standard deviation of that weighting relative to its span n.
The profiles are snapshotted every `train.posthoc_every` steps and at every epoch's end; any
other power-function average ending at a snapshot's step is, in least squares over the weighting
functions, a linear combination of the snapshots up to it. `ddpm posthoc-ema` writes it as a
sampling checkpoint, so `ddpm evaluate` and `ddpm sample` score and draw it like any other.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from numpy.typing import ArrayLike

from ddpm import checkpoint as ckpt
from ddpm.config import Config, config_from_dict
from ddpm.resume import resume_conflicts  # the one definition of "the same training"

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ckpt.POSTHOC_DIR  # under train.checkpoint_dir
SNAPSHOT_FILE = re.compile(r"^step_(\d{8,})\.ckpt$")
SNAPSHOT_VERSION = 1
SNAPSHOT_KEYS = ("format_version", "global_step", "sigma_rels_json", "config_yaml")


def profile_prefix(sigma_rel: float) -> str:
    """Where a profile's shadows live in a checkpoint and a snapshot: posthoc.0.050."""
    return f"{ckpt.POSTHOC_PREFIX}{sigma_rel:.3f}."


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the weighting tau^gamma over [0, 1]: a Beta(gamma + 1, 1)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose weighting has relative standard deviation `sigma_rel`: sigma_rel_of(gamma) =
    sigma_rel, multiplied out, is the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0 with
    s = sigma_rel^-2; its largest real root is the one with gamma >= 0."""
    s = sigma_rel**-2.0
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_decay(step: int, gamma: float) -> float:
    """The decay of update number `step` (1-based): the first update copies the weights."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def overlap(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """The inner product of two weightings p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]:
    the integral of their product, which ends at the shorter span m = min(t_a, t_b): with g = gamma,
    (g_a + 1) (g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)), computed with
    the ratios m / t <= 1 (t^(g + 1) alone overflows: 3,750 steps at sigma_rel 0.01 is 1e350)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * m)
    return scale * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1)


@dataclass(frozen=True)
class Fit:
    coefficients: np.ndarray  # (snapshots,), summing to 1
    residual: float  # the weighting's relative L2 error: 0 when a snapshot is the target itself


def solve(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> Fit:
    """The combination of snapshots (at `steps`, of profiles `gammas`) closest to the weighting
    (`step`, `gamma`) in L2 over the weighting functions (Gram matrix A, right side b)."""
    t = np.asarray(steps, np.float64)
    g = np.asarray(gammas, np.float64)
    a = overlap(t[:, None], g[:, None], t[None, :], g[None, :])  # (n, n)
    b = overlap(t, g, step, gamma)  # (n,)
    x = np.linalg.solve(a, b)
    x = x / x.sum()
    target = float(overlap(step, gamma, step, gamma))
    error = target - 2 * x @ b + x @ a @ x
    return Fit(x, float(np.sqrt(max(error, 0.0) / target)))


def snapshot_path(directory: str | Path, global_step: int) -> Path:
    return Path(directory) / SNAPSHOT_DIR / f"step_{global_step:08d}.ckpt"


def write_snapshot(directory: str | Path, global_step: int, shadows: Sequence, config: Config) -> Path:
    """The profiles' shadows (Parameters named posthoc.<sigma_rel>.<parameter>) after `global_step`
    of a training with `config`, atomically; a resumed run replays the step and rewrites the same values."""
    meta = {
        "format_version": SNAPSHOT_VERSION,
        "global_step": global_step,
        "sigma_rels_json": json.dumps(list(config.train.posthoc_ema)),
        "config_yaml": yaml.safe_dump(config.to_dict()),
    }
    return ckpt.write_ckpt(snapshot_path(directory, global_step), [{"name": p.name, "data": p} for p in shadows], meta)


@dataclass(frozen=True)
class Snapshot:
    global_step: int
    sigma_rels: tuple[float, ...]
    params: dict  # posthoc.<sigma_rel>.<parameter> -> Parameter


def read_snapshots(directory: str | Path, state: ckpt.Checkpoint) -> list[Snapshot]:
    """The snapshots in `directory`/posthoc of `state`'s training up to its step, oldest first; one
    of another training (another config, or a later step), or none at all, is an error naming it."""
    folder = Path(directory) / SNAPSHOT_DIR
    paths = sorted(p for p in folder.glob("step_*.ckpt") if SNAPSHOT_FILE.match(p.name)) if folder.is_dir() else []
    snapshots = []
    for path in paths:
        if int(SNAPSHOT_FILE.match(path.name).group(1)) > state.global_step:  # type: ignore[union-attr]
            continue  # after the checkpoint: the average ends at the checkpoint's step
        meta, params = ckpt.read_ckpt(
            path, SNAPSHOT_KEYS, SNAPSHOT_VERSION, "delete it: the others still reconstruct, less exactly"
        )
        changed = resume_conflicts(config_from_dict(yaml.safe_load(meta["config_yaml"])), state.config)
        if changed:
            raise ckpt.CheckpointError(
                f"{path} is from another training than {state.path} ({', '.join(changed)}); "
                f"move {folder} away or point --checkpoint at that training's checkpoint"
            )
        snapshots.append(Snapshot(int(meta["global_step"]), tuple(json.loads(meta["sigma_rels_json"])), params))
    if not snapshots:
        raise ckpt.CheckpointError(
            f"no post-hoc EMA snapshots in {folder} up to step {state.global_step}; "
            "train with train.posthoc_ema set (e.g. [0.05, 0.1]) to keep them"
        )
    return snapshots


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, state: ckpt.Checkpoint) -> tuple[dict, Fit]:
    """The power-function average of length `sigma_rel` ending at `state`'s step, by network
    parameter name, from `snapshots` (read_snapshots); with the fit it comes from."""
    bases = [(s, sigma) for s in snapshots for sigma in s.sigma_rels]  # one weighting per snapshot and profile
    fit = solve(
        [s.global_step for s, _ in bases],
        [gamma_of(sigma) for _, sigma in bases],
        state.global_step,
        gamma_of(sigma_rel),
    )
    if not np.isfinite(fit.coefficients).all():
        raise ckpt.CheckpointError(
            f"the snapshots in {state.path.parent / SNAPSHOT_DIR} give no finite average of length {sigma_rel}; "
            "try a length between the profiles' (train.posthoc_ema)"
        )
    weights = {}
    for name in (n for n in state.params if not ckpt.is_training_state(n)):  # the network's parameters
        parts = [s.params[profile_prefix(sigma) + name].asnumpy().astype(np.float64) for s, sigma in bases]
        weights[name] = sum(c * part for c, part in zip(fit.coefficients, parts, strict=True)).astype(np.float32)
    return weights, fit


def posthoc_path(state: ckpt.Checkpoint, sigma_rel: float) -> Path:
    """Where `ddpm posthoc-ema` writes the average of length `sigma_rel` ending at `state`."""
    return state.path.parent / SNAPSHOT_DIR / f"{state.path.stem}_sigma_{sigma_rel:.3f}.ckpt"


def write_posthoc(state: ckpt.Checkpoint, sigma_rels: Sequence[float]) -> list[tuple[Path, Fit]]:
    """For each length, the average ending at the step of the checkpoint `state`, from the snapshots
    beside it (read once), written as a sampling checkpoint (posthoc_path); the paths and their fits."""
    snapshots = read_snapshots(state.path.parent, state)
    written = []
    for sigma_rel in sigma_rels:
        weights, fit = reconstruct(snapshots, sigma_rel, state)
        path = ckpt.write_sampling_checkpoint(posthoc_path(state, sigma_rel), weights, state)
        log.info("wrote %s (sigma_rel %.3f, weighting error %.1f%%)", path, sigma_rel, 100 * fit.residual)
        written.append((path, fit))
    return written


@dataclass(frozen=True)
class Choice:
    checkpoint: Path  # the chosen weights: the training's checkpoint (its EMA) or a post-hoc average's
    sigma_rel: float | None  # None: the checkpoint's own weights (its EMA, if it keeps one); 0: the raw weights
    ema_loss: float  # the held-out denoising loss of the checkpoint's own weights
    losses: dict[float, float]  # of each length's average, and of the raw weights (length 0) beside an EMA


def choose(checkpoint: str | Path, sigma_rels: Sequence[float], config: Config, progress: bool = False) -> Choice:
    """Write the average of each length ending at `checkpoint` (write_posthoc) and, if the checkpoint
    keeps an EMA, its raw weights as length 0; pick among them and the checkpoint's own weights the
    lowest held-out denoising loss (evaluate.seed fixes the images and the noise, so every candidate
    is scored on the same ones)."""
    from ddpm.checkpoint_sampler import load_sampler
    from ddpm.denoising import denoising_loss

    def loss(path: str | Path) -> float:
        return denoising_loss(load_sampler(path, config.train.device), config, progress)["eval_loss"]

    state = ckpt.load_checkpoint(checkpoint)
    candidates = {s: path for s, (path, _) in zip(sigma_rels, write_posthoc(state, sigma_rels), strict=True)}
    if state.keeps_ema:  # then its raw weights, no average at all, are a candidate too
        raw = ckpt.sampling_weights(state, use_ema=False)
        candidates[0.0] = ckpt.write_sampling_checkpoint(posthoc_path(state, 0.0), raw, state)
    ema_loss = loss(checkpoint)
    losses = {sigma_rel: loss(path) for sigma_rel, path in candidates.items()}
    best = min(losses, key=losses.__getitem__)
    if losses[best] >= ema_loss:
        log.info("post-hoc EMA: the checkpoint's weights have the lowest held-out loss, %.5f", ema_loss)
        return Choice(Path(checkpoint), None, ema_loss, losses)
    log.info("post-hoc EMA: sigma_rel %.3f, held-out loss %.5f against the EMA's %.5f", best, losses[best], ema_loss)
    return Choice(candidates[best], best, ema_loss, losses)
