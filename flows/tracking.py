"""MLflow run handling and the per-epoch callback that logs metrics and sample grids."""
from __future__ import annotations

import logging
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from ddpm.config import Config
from ddpm.images import make_grid
from ddpm.train import Callback, EpochEnd, FitResult

from flows.config import PipelineConfig, flatten

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # beside the checkpoints, so a resumed training continues its run


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used."""


def connect(pipeline: PipelineConfig) -> str:
    """Point MLflow at the configured store and fail fast, before any training, if a server is down."""
    uri = pipeline.tracking_uri
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=pipeline.tracking.connect_timeout) as response:
                response.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}). Start it "
                f"(`mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to use "
                f"the local default {pipeline.tracking.uri}.") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(pipeline.tracking.experiment)
    return uri


def git_commit(repo: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def start_run(config: Config, pipeline: PipelineConfig, tags: dict[str, str], resume: bool) -> str:
    """Start the training run (or reopen the one the checkpoints belong to) and log every param."""
    connect(pipeline)
    run_file = Path(config.train.checkpoint_dir) / RUN_ID_FILE
    run_id = run_file.read_text().strip() if resume and run_file.is_file() else None
    run = mlflow.start_run(run_id=run_id, tags=tags)
    if run_id is None:
        mlflow.log_params(flatten(config.to_dict()))
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(run.info.run_id)
    else:
        mlflow.set_tags(tags)
    log.info("MLflow run %s in experiment %s", run.info.run_id, pipeline.tracking.experiment)
    return run.info.run_id


def run_url(pipeline: PipelineConfig, run_id: str) -> str:
    """A link to the run in the MLflow UI (server URI, or the `mlflow ui` default address)."""
    uri = pipeline.tracking_uri
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


class MlflowLogger(Callback):
    """Logs train_loss and lr per step, epoch metrics, and a sample grid per epoch (the UI's image slider)."""

    def __init__(self, log_every: int, sample_every: int, num_samples: int, seed: int):
        self.log_every = log_every
        self.sample_every = sample_every
        self.num_samples = num_samples
        self.seed = seed

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        if global_step % self.log_every == 0:
            mlflow.log_metrics(metrics, step=global_step, synchronous=False)

    def on_epoch_end(self, end: EpochEnd) -> None:
        mlflow.log_metrics({"epoch": end.epoch + 1, **end.metrics}, step=end.epoch + 1, synchronous=False)
        if self.sample_every and (end.epoch + 1) % self.sample_every == 0:
            grid = make_grid(end.draw_samples(self.num_samples, self.seed))
            mlflow.log_image(grid, key="samples", step=end.epoch + 1, synchronous=True)
        mlflow.flush_async_logging()

    def on_train_end(self, result: FitResult) -> None:
        mlflow.flush_async_logging()
