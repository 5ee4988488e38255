"""The training callback that logs metrics and sample grids to the active MLflow run (and the grids
as PNG files for DVC's image plots), each step and epoch once, also across resumed trainings and
tracking-server outages (flows/outbox.py sends them; training never waits for a server that is down)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from ddpm.callbacks import Callback, EpochEnd, FitResult
from ddpm.config import Config
from ddpm.files import atomic_path, final_name, is_partial
from ddpm.images import make_grid
from flows.errors import TrackingError
from flows.outbox import EPOCH, STEP, Outbox, load_unsent, record, save_unsent, shown

log = logging.getLogger(__name__)

SAMPLES_KEY = "samples"  # the image key of the per-epoch sample grids
GRID_FILE = re.compile(r"epoch_(\d+)\.png")  # a preview grid's file, named by its epoch (1-based)
END_PATIENCE = 600.0  # seconds the end of a training waits for a tracking server that is down
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

    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def read_grid(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


class MlflowLogger(Callback):
    """Logs train_loss and lr per step, epoch metrics, and a sample grid per epoch (the UI's image
    slider), each once: on a resumed run it skips the steps and epochs the run already holds. With
    `grid_dir` it also writes each grid there as epoch_NNNN.png (DVC's image plots): a new training
    starts with no grids there, a resumed one keeps those of the epochs it does not rerun.

    Everything goes through an Outbox: a checkpoint waits for it only while the tracking server
    answers (at most `timeout` seconds for one that hangs); during an outage the metrics not logged
    yet are saved beside each checkpoint, and a resume logs those the run lacks."""

    def __init__(
        self,
        log_every: int,
        sample_every: int,
        num_samples: int,
        seed: int,
        grid_dir: Path | None = None,
        timeout: float = 5.0,
    ):
        self.log_every = log_every
        self.sample_every = sample_every
        self.num_samples = num_samples
        self.seed = seed
        self.grid_dir = grid_dir
        self.timeout = timeout  # seconds one request to the tracking server may take
        self.steps_per_epoch = 0
        self.directory = Path()
        self.run_id = ""
        self.outbox: Outbox | None = None
        self.done_steps: set[int] = set()  # logged, or queued to be
        self.done_epochs: set[int] = set()
        self.done_grids: set[int] = set()

    def flush(self) -> bool:
        """Wait until everything queued is logged, or the server is found unreachable; whether it is logged."""
        return self.outbox.wait() if self.outbox is not None else True

    def on_train_start(
        self, config: Config, start_epoch: int, steps_per_epoch: int, start_step: int, precision: str
    ) -> None:
        run = mlflow.active_run()
        assert run is not None, "fit() with an MlflowLogger runs inside mlflow.start_run()"
        client, self.run_id = MlflowClient(), run.info.run_id
        previous = client.get_run(self.run_id).data.tags.get(PRECISION_TAG)
        client.set_tag(self.run_id, PRECISION_TAG, appended_history(previous, precision))
        self.steps_per_epoch = steps_per_epoch
        self.directory = Path(config.train.checkpoint_dir)
        self.done_steps = logged_steps(client, self.run_id, "train_loss")
        self.done_epochs = logged_steps(client, self.run_id, "train_loss_epoch")
        self.done_grids = logged_image_steps(client, self.run_id, SAMPLES_KEY)
        if self.done_steps:
            log.info(
                "run %s already holds %d steps and %d epochs; they will not be logged again",
                self.run_id,
                len(self.done_steps),
                len(self.done_epochs),
            )
        self.outbox = Outbox(mlflow.get_tracking_uri(), self.run_id, self.timeout, SAMPLES_KEY)
        self.queue_unsent(start_epoch, start_step)
        if self.grid_dir is not None:
            self.grid_dir.mkdir(parents=True, exist_ok=True)
            for path in self.grid_dir.iterdir():  # another training's grids, or half of one
                grid = GRID_FILE.fullmatch(final_name(path.name))
                if grid and (is_partial(path.name) or int(grid[1]) > start_epoch):
                    path.unlink()

    def queue_unsent(self, start_epoch: int, start_step: int) -> None:
        """Queue what an earlier attempt saved unlogged at a checkpoint and the run still lacks; not
        what lies past the checkpoint resumed from (that part is trained and logged again)."""
        assert self.outbox is not None
        done = {STEP: (self.done_steps, start_step), EPOCH: (self.done_epochs, start_epoch)}
        queued = 0
        for item in load_unsent(self.directory, self.run_id):
            logged, last = done[item.scope]
            if item.step <= last and item.step not in logged:
                self.outbox.put(item)
                logged.add(item.step)
                queued += len(item.values)
        if queued:
            log.info("logging %d metrics an earlier attempt could not log (tracking server unreachable)", queued)
        self.queue_missing_grids(start_epoch)

    def queue_missing_grids(self, start_epoch: int) -> None:
        """The grids of checkpointed epochs the run lacks (queued when a crash came during an outage),
        from their PNG copies; the last one is drawn again by `on_resume` if there is none."""
        if self.grid_dir is None or not self.sample_every:
            return
        assert self.outbox is not None
        for epoch in range(self.sample_every, start_epoch + 1, self.sample_every):
            png = grid_path(self.grid_dir, epoch)
            if epoch not in self.done_grids and png.is_file():
                self.outbox.put_grid(epoch, read_grid(png))
                self.done_grids.add(epoch)

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        if global_step % self.log_every == 0 and global_step not in self.done_steps:
            assert self.outbox is not None
            self.outbox.put(record(STEP, global_step, metrics))
            self.done_steps.add(global_step)

    def on_checkpoint(self, global_step: int) -> None:
        """The steps so far are logged before the checkpoint is written, or, while the server is
        unreachable, saved beside it for the resume: the checkpoint does not wait for an outage."""
        self.flush()
        assert self.outbox is not None
        save_unsent(self.directory, self.run_id, self.outbox.unsent())

    def on_epoch_end(self, end: EpochEnd) -> None:
        step = end.epoch + 1
        if step not in self.done_epochs:
            assert self.outbox is not None
            self.outbox.put(record(EPOCH, step, {"epoch": step, **end.metrics}))
            self.done_epochs.add(step)
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
            assert self.outbox is not None
            self.outbox.put_grid(step, grid)
            self.done_grids.add(step)
        if png is not None:
            write_grid(grid, png)

    def on_resume(self, last: EpochEnd) -> None:
        self.on_epoch_end(last)

    def on_train_end(self, result: FitResult) -> None:
        """Wait for a tracking server that is down, a while: the run's end and model need it too."""
        assert self.outbox is not None
        if not self.outbox.wait(END_PATIENCE):
            raise TrackingError(
                f"training finished and checkpointed, but the tracking server {shown(mlflow.get_tracking_uri())} "
                f"has been unreachable for {END_PATIENCE:.0f} s ({self.outbox.down}); its metrics not logged yet "
                f"are kept in {self.directory}. Start the server, then rerun the same command: it resumes after "
                "the last epoch, logs what the run lacks and the model."
            )
        self.outbox.close()
        save_unsent(self.directory, self.run_id, [])  # all logged: nothing left for a resume
