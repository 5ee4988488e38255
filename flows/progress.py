"""The training callback behind the flow run's progress artifact: the Prefect UI shows how far a long
training is (epoch, step, images/s, time left) while it runs, not only when it ends."""

from __future__ import annotations

import logging
import time
from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ddpm.callbacks import Callback, EpochEnd, FitResult
from ddpm.config import Config

log = logging.getLogger(__name__)

PROGRESS_KEY = "ddpm-training-progress"  # the Artifacts page lists the latest one under this key
UPDATE_SECONDS = 10.0  # between updates: each one is a call to the Prefect API
DONE = 100.0


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class PrefectProgress(Callback):
    """A progress artifact of the flow run, updated every UPDATE_SECONDS and at each epoch's end; a
    resumed training starts at the share it had done."""

    def __init__(self, seconds: float = UPDATE_SECONDS):
        self.seconds = seconds
        self.artifact: UUID | None = None
        self.epochs = self.steps_per_epoch = self.batch_size = self.total = self.first_step = 0
        self.started = self.updated = 0.0

    def on_train_start(
        self, config: Config, start_epoch: int, steps_per_epoch: int, start_step: int, precision: str
    ) -> None:
        self.epochs, self.steps_per_epoch = config.train.epochs, steps_per_epoch
        self.batch_size = config.train.batch_size
        self.total, self.first_step = config.train.epochs * steps_per_epoch, start_step
        self.started = self.updated = time.monotonic()
        created = create_progress_artifact(
            self.percent(start_step), key=PROGRESS_KEY, description=self.describe(start_step)
        )
        self.artifact = cast(UUID, created)  # called from sync code, async_dispatch returns the id itself

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        if time.monotonic() - self.updated >= self.seconds:
            self.update(global_step)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.update(end.global_step)

    def on_train_end(self, result: FitResult) -> None:
        assert self.artifact is not None
        seconds = time.monotonic() - self.started
        description = f"done: {self.epochs} epochs, {result.global_step} steps, this run trained {minutes(seconds)}"
        update_progress_artifact(self.artifact, DONE, description=description)

    def update(self, global_step: int) -> None:
        assert self.artifact is not None, "on_train_start creates the artifact"
        update_progress_artifact(self.artifact, self.percent(global_step), description=self.describe(global_step))
        self.updated = time.monotonic()

    def percent(self, global_step: int) -> float:
        return DONE * global_step / self.total if self.total else DONE

    def describe(self, global_step: int) -> str:
        """e.g. `epoch 3/7, step 1200/3283, 54.2 img/s, 38 min left`."""
        epoch = min(global_step // self.steps_per_epoch + 1, self.epochs) if self.steps_per_epoch else self.epochs
        where = f"epoch {epoch}/{self.epochs}, step {global_step}/{self.total}"
        done, seconds = global_step - self.first_step, time.monotonic() - self.started
        if done <= 0 or seconds <= 0:
            return where
        rate = done / seconds  # steps per second of this run, compilation included
        return f"{where}, {rate * self.batch_size:.1f} img/s, {minutes((self.total - global_step) / rate)} left"
