"""What `fit` tells its callbacks: the hooks and the records they receive. No MindSpore here, so
that the pipeline's MLflow logger and DVC plot writer import it without loading the network."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm.config import Config


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What callbacks see at the end of an epoch."""

    epoch: int  # 0-based index of the epoch that just finished
    global_step: int
    metrics: dict[str, float]
    checkpoint: Path
    # (num, seed) -> (num, C, H, W) in [-1, 1], with the weights (EMA if any) of when it is called
    draw_samples: Callable[..., np.ndarray]


class Callback:
    """Hooks called by `fit`; override what you need."""

    def on_train_start(
        self, config: Config, start_epoch: int, steps_per_epoch: int, start_step: int, precision: str
    ) -> None:
        """Training starts (or resumes) with `start_epoch` epochs and `start_step` steps done: a resumed
        run's first step is `start_step + 1`, which may lie inside epoch `start_epoch + 1`. `precision`
        is what `config.train.precision` resolved to on this machine (fp32 or bf16)."""

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, global_step: int) -> None:
        """A checkpoint after `global_step` is about to be written (mid-epoch or at an epoch's end):
        keep what the steps so far produced where a resume finds it, since it continues after them.
        Do not wait here for a service that is down: the checkpoint would wait with you."""

    def on_epoch_end(self, end: EpochEnd) -> None: ...

    def on_resume(self, last: EpochEnd) -> None:
        """Resuming after `last`, the newest checkpointed epoch: its checkpoint is written before
        `on_epoch_end`, so a crash in between leaves that epoch unreported; catch up here."""

    def on_train_end(self, result: FitResult) -> None: ...


@dataclasses.dataclass(frozen=True)
class FitResult:
    checkpoint: Path
    epochs: int
    global_step: int
    metrics: dict[str, float]
