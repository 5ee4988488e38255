"""The training callback that logs metrics and sample grids to the active MLflow run (and the grids
as PNG files for DVC's image plots), each step and epoch once, also across resumed trainings."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from ddpm.callbacks import Callback, EpochEnd, FitResult
from ddpm.config import Config
from ddpm.images import make_grid

log = logging.getLogger(__name__)

SAMPLES_KEY = "samples"  # the image key of the per-epoch sample grids
GRID_FILE = re.compile(r"epoch_(\d+)\.png")  # a preview grid's file, named by its epoch (1-based)
PARTIAL_GRID = re.compile(r"\.epoch_\d+\.png\.partial")  # one a killed training left half written
PRECISION_TAG = "precision"  # what train.precision resolved to; "bf16, then fp32" if a resume ran elsewhere


def appended_history(previous: str | None, value: str) -> str:
    """A history tag after a (re)start with `value` ("bf16, then fp32"): each change appended."""
    if not previous:
        return value
    return previous if previous.rsplit(", then ", 1)[-1] == value else f"{previous}, then {value}"


def logged_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def logged_image_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    """Steps of the images logged under `key` (MLflow names them images/<key>+step+<n>+...)."""
    names = (a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "images"))
    return {
        int(parts[2])
        for parts in (n.split("+") for n in names)
        if len(parts) > 2 and parts[0] == key and parts[1] == "step"
    }


def grid_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}.png"


def write_grid(grid: np.ndarray, path: Path) -> None:
    """A PNG, written atomically: a reader (DVC) sees the previous file or the whole new one."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)


class MlflowLogger(Callback):
    """Logs train_loss and lr per step, epoch metrics, and a sample grid per epoch (the UI's image
    slider), each once: on a resumed run it skips the steps and epochs the run already holds. With
    `grid_dir` it also writes each grid there as epoch_NNNN.png (DVC's image plots): a new training
    starts with no grids there, a resumed one keeps those of the epochs it does not rerun."""

    def __init__(self, log_every: int, sample_every: int, num_samples: int, seed: int, grid_dir: Path | None = None):
        self.log_every = log_every
        self.sample_every = sample_every
        self.num_samples = num_samples
        self.seed = seed
        self.grid_dir = grid_dir
        self.steps_per_epoch = 0
        self.done_steps: set[int] = set()
        self.done_epochs: set[int] = set()
        self.done_grids: set[int] = set()
        self.pending: list = []  # RunOperations of async logs not yet known to be stored

    def flush(self) -> None:
        """Wait until every async log is stored; a failed one raises (MLflow itself only logs it)."""
        mlflow.flush_async_logging()
        pending, self.pending = self.pending, []
        for operations in pending:
            operations.wait()

    def on_train_start(
        self, config: Config, start_epoch: int, steps_per_epoch: int, start_step: int, precision: str
    ) -> None:
        run = mlflow.active_run()
        assert run is not None, "fit() with an MlflowLogger runs inside mlflow.start_run()"
        client, run_id = MlflowClient(), run.info.run_id
        previous = client.get_run(run_id).data.tags.get(PRECISION_TAG)
        client.set_tag(run_id, PRECISION_TAG, appended_history(previous, precision))
        self.steps_per_epoch = steps_per_epoch
        self.done_steps = logged_steps(client, run_id, "train_loss")
        self.done_epochs = logged_steps(client, run_id, "train_loss_epoch")
        self.done_grids = logged_image_steps(client, run_id, SAMPLES_KEY)
        if self.done_steps:
            log.info(
                "run %s already holds %d steps and %d epochs; they will not be logged again",
                run_id,
                len(self.done_steps),
                len(self.done_epochs),
            )
        if self.grid_dir is not None:
            self.grid_dir.mkdir(parents=True, exist_ok=True)
            for path in self.grid_dir.iterdir():  # another training's grids, or half of one
                grid = GRID_FILE.fullmatch(path.name)
                if (grid and int(grid[1]) > start_epoch) or PARTIAL_GRID.fullmatch(path.name):
                    path.unlink()

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        if global_step % self.log_every == 0 and global_step not in self.done_steps:
            self.pending.append(mlflow.log_metrics(metrics, step=global_step, synchronous=False))
        if global_step % self.steps_per_epoch == 0:
            self.flush()  # an epoch's steps are stored before its checkpoint is written

    def on_checkpoint(self, global_step: int) -> None:
        self.flush()  # the steps up to a checkpoint are stored before it is written

    def on_epoch_end(self, end: EpochEnd) -> None:
        step = end.epoch + 1
        if step not in self.done_epochs:
            self.pending.append(mlflow.log_metrics({"epoch": step, **end.metrics}, step=step, synchronous=False))
        if self.sample_every and step % self.sample_every == 0:
            self.preview(end, step)
        self.flush()

    def preview(self, end: EpochEnd, step: int) -> None:
        """Draw the epoch's grid once, for MLflow and the PNG, whichever lacks it."""
        png = grid_path(self.grid_dir, step) if self.grid_dir is not None else None
        if step in self.done_grids and (png is None or png.is_file()):
            return
        grid = make_grid(end.draw_samples(self.num_samples, self.seed))
        if step not in self.done_grids:
            mlflow.log_image(grid, key=SAMPLES_KEY, step=step, synchronous=True)
        if png is not None:
            write_grid(grid, png)

    def on_resume(self, last: EpochEnd) -> None:
        self.on_epoch_end(last)

    def on_train_end(self, result: FitResult) -> None:
        self.flush()
