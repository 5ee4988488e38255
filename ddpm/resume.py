"""Where a training starts, and when it writes its checkpoints.

`resume_point` restores the newest checkpoint (a mid-epoch one included) into a training;
`Checkpointer.save_if_due` is the one place checkpoints are written: at every epoch's end, every
`train.checkpoint_minutes` within an epoch, and at the step boundary after a SIGTERM or SIGINT
(after which `fit` raises TrainingInterrupted).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ddpm import checkpoint as ckpt
from ddpm.callbacks import Callback
from ddpm.config import Config
from ddpm.distributed import World
from ddpm.interrupt import StopRequest

log = logging.getLogger(__name__)

# Settings a resumed run may change: how long it runs and how it reports, never what it learns.
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.lr_epochs",  # as long as the span of the learning-rate schedule stays (resume_conflicts)
    "train.sample_every",
    "train.sample_num",
    "train.sample_steps",
    "train.sample_seed",
    "train.device",
    "train.threads",
    "train.workers",
    "train.checkpoint_minutes",
    "train.posthoc_lengths",  # chosen among after training
    "data.num_workers",
}
UNTRAINED_SECTIONS = {"sample", "evaluate", "classifier"}  # how a model is looked at, not how it learns

KEEP_CHECKPOINTS = 2  # complete epochs' checkpoints kept on disk (the newest), besides one newer mid-epoch one
SECONDS_PER_MINUTE = 60


class Training(Protocol):
    """What resuming and checkpointing need of a training (`ddpm.train.Trainer`)."""

    @property
    def config(self) -> Config: ...
    @property
    def world(self) -> World: ...
    @property
    def precision(self) -> str: ...
    @property
    def steps_per_epoch(self) -> int: ...
    def parameters(self) -> list: ...
    def restore(self, state: ckpt.Checkpoint) -> None: ...


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    path: Path | None
    epoch: int  # complete epochs
    global_step: int
    metrics: dict[str, float]  # of the last complete epoch
    progress: ckpt.EpochProgress | None  # into epoch `epoch + 1`, for a mid-epoch checkpoint


def resume_point(trainer: Training, directory: Path, resume: bool) -> ResumePoint:
    """Where training starts: nothing done, or the newest checkpoint restored into `trainer`."""
    latest = ckpt.latest_checkpoint(directory)
    if latest is None:
        return ResumePoint(None, 0, 0, {}, None)
    if not resume:
        raise FileExistsError(
            f"{directory} already holds checkpoints ({latest.name}); pass --resume "
            "to continue that run, or set train.checkpoint_dir to a new directory"
        )
    state = ckpt.load_checkpoint(latest)
    trainer.restore(state)
    done = state.epoch * trainer.steps_per_epoch + (state.progress.step if state.progress else 0)
    if done != state.global_step:
        raise ckpt.CheckpointError(
            f"{latest} is at step {state.global_step}, its epochs make {done}: "
            "not a checkpoint of this training; use a new train.checkpoint_dir"
        )
    where = f", {state.progress.step} steps into the next" if state.progress else ""
    log.info("resuming from %s: %d epochs done%s", latest, state.epoch, where)
    return ResumePoint(latest, state.epoch, state.global_step, state.metrics, state.progress)


class Checkpointer:
    """Writes a run's checkpoints (rank 0 alone; every worker gets the path): at every epoch's end,
    mid-epoch when `train.checkpoint_minutes` have passed since the last one or a stop was requested."""

    def __init__(
        self,
        trainer: Training,
        directory: Path,
        callbacks: Sequence[Callback],
        stop: StopRequest,
        metrics: dict[str, float],
    ):
        self.trainer, self.directory, self.callbacks, self.stop = trainer, directory, callbacks, stop
        self.interval = trainer.config.train.checkpoint_minutes * SECONDS_PER_MINUTE
        self.last = time.monotonic()
        self.metrics = metrics  # of the last complete epoch, carried by mid-epoch checkpoints

    def save_if_due(
        self,
        epoch: int,
        global_step: int,
        progress: ckpt.EpochProgress,
        metrics: dict[str, float] | None,
    ) -> Path | None:
        """Checkpoint epoch `epoch` (0-based) at its end (given its `metrics`), or `progress` into it if
        a mid-epoch checkpoint is due; returns the path written, None if none was due."""
        at_end = metrics is not None
        mid_epoch_due = self.stop.requested or (self.interval > 0 and time.monotonic() - self.last >= self.interval)
        if not (at_end or mid_epoch_due):
            return None
        for cb in self.callbacks:
            cb.on_checkpoint(global_step)
        if metrics is not None:
            self.metrics = metrics
        done, partial = (epoch + 1, None) if at_end else (epoch, progress)
        if self.trainer.world.is_main:
            path = ckpt.save_checkpoint(
                self.directory,
                self.trainer.parameters(),
                self.trainer.config,
                done,
                global_step,
                KEEP_CHECKPOINTS,
                self.metrics,
                partial,
                self.trainer.precision,
            )
        else:
            path = (
                ckpt.epoch_path(self.directory, done)
                if at_end
                else ckpt.mid_epoch_path(self.directory, epoch + 1, progress.step)
            )
        self.last = time.monotonic()
        return path


def resume_conflicts(saved: Config, current: Config) -> list[str]:
    """Settings that differ between a checkpoint and the current config and forbid resuming it."""
    a, b = saved.to_dict(), current.to_dict()
    conflicts = [
        f"{section}.{key}: {a[section][key]!r} -> {b[section][key]!r}"
        for section in a
        if section not in UNTRAINED_SECTIONS
        for key in a[section]
        if a[section][key] != b[section][key] and f"{section}.{key}" not in RESUMABLE_CHANGES
    ]
    span = saved.train.lr_span
    if current.train.lr_schedule != "constant" and current.train.lr_span != span:
        conflicts.append(
            f"train.lr_epochs: the learning-rate schedule spans {span} epochs in the checkpoint and "
            f"{current.train.lr_span} now (set train.lr_epochs={span} to extend this training on its own curve)"
        )
    return conflicts
