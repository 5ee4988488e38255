"""The pipeline's steps, one implementation each, shared by the DVC stages (flows.stages), the
Prefect flow (flows.pipeline) and the CLI. Steps exchange paths and ids through small files in
outputs/, never tensors."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import mlflow
from ddpm.checkpoint import CheckpointError, list_checkpoints
from ddpm.classifier import train_classifier, trained_classifier
from ddpm.config import Config, ConfigError
from ddpm.data import DataError, verify_dataset
from ddpm.distributed import WorkerError
from ddpm.evaluate import evaluate_checkpoint
from ddpm.runtime import DeviceError
from ddpm.train import Callback, fit

from flows.config import PipelineConfig
from flows.data import dvc_data_hash
from flows.parallel import fit_on_workers
from flows.registry import Registration, register_model
from flows.tracking import (FAILURE_TAG, WORKSPACE_TAG, MlflowLogger, TrackingError, git_commit, start_run,
                            workspace_id)
from flows.workspace import WorkspaceBusy

log = logging.getLogger(__name__)

OUTPUTS = Path("outputs")
TRAIN_JSON = OUTPUTS / "train.json"  # run id and checkpoint, read by evaluate and register
METRICS_JSON = OUTPUTS / "metrics.json"  # DVC metrics
LOSS_CSV = OUTPUTS / "loss.csv"  # DVC plot: train_loss per step
REGISTERED_JSON = OUTPUTS / "registered.json"
CLASSIFIER_JSON = OUTPUTS / "classifier.json"  # DVC metrics of the FID feature network
QUALITY_METRICS = ("fid", "fid_floor", "fid_ratio", "class_kl", "sample_seconds", "classifier_accuracy")
COMPLETE_MARKER = "COMPLETE"  # in the checkpoint dir once training finished and its run closed
MAX_TAG_LENGTH = 5000  # MLflow's limit on a tag value
# What the entry points (flow, DVC stages) report as one clear line, exit 2, rather than a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, DeviceError, TrackingError, WorkspaceBusy,
               FileExistsError, FileNotFoundError, FloatingPointError, WorkerError)


@dataclasses.dataclass(frozen=True)
class Trained:
    run_id: str
    checkpoint: str
    metrics: dict

    def save(self, repo: Path) -> None:
        _write_json(repo / TRAIN_JSON, dataclasses.asdict(self))

    @classmethod
    def load(cls, repo: Path) -> "Trained":
        path = repo / TRAIN_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run the train step first (`dvc repro train`)")
        return cls(**json.loads(path.read_text()))


class LossCsv(Callback):
    """Appends step,train_loss rows for `dvc plots`; a fresh run starts a fresh file, a resumed one
    drops the rows past its checkpoint (the interrupted epoch runs again)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, config: Config, start_epoch: int, steps_per_epoch: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_epoch and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in list(csv.reader(f))[1:] if int(row[0]) <= start_epoch * steps_per_epoch]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([["step", "train_loss"], *kept])

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([global_step, f"{metrics['train_loss']:.6f}"])


def should_resume(checkpoint_dir: Path) -> bool:
    """Resume an interrupted training; start afresh after a completed one (whose model is logged),
    clearing its checkpoints (dvc.yaml persists them, so that DVC too resumes an interrupted one)."""
    if (checkpoint_dir / COMPLETE_MARKER).is_file():
        log.info("%s holds a completed training; starting a new one", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
        return False
    if list_checkpoints(checkpoint_dir):
        log.info("%s holds an interrupted training; resuming it", checkpoint_dir)
        return True
    return False


def training_callbacks(config: Config, pipeline: PipelineConfig, repo: Path) -> list[Callback]:
    """MLflow logging (per step, per epoch, sample grids) and the DVC loss plot."""
    return [MlflowLogger(pipeline.tracking.log_every, config.train.sample_every, config.sample.num,
                         config.sample.seed), LossCsv(repo / LOSS_CSV)]


def train(config: Config, pipeline: PipelineConfig, repo: Path, flow_run_id: str | None = None,
          progress: bool = True) -> Trained:
    """Train with MLflow tracking, resuming an interrupted training in train.checkpoint_dir; a
    failure ends the run FAILED with the reason as a tag. Damaged data fails before any run exists."""
    verify_dataset(repo / config.data.root)
    checkpoint_dir = repo / config.train.checkpoint_dir
    resume = should_resume(checkpoint_dir)
    tags = {"git_commit": git_commit(repo), "dvc_data_hash": dvc_data_hash(repo), WORKSPACE_TAG: workspace_id(repo)}
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    run_id = start_run(config, pipeline, tags, resume)
    try:
        if config.train.workers > 1:
            result = fit_on_workers(config, pipeline, repo, run_id, resume)
        else:
            result = fit(config, training_callbacks(config, pipeline, repo), resume=resume, progress=progress)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.set_tag(FAILURE_TAG, f"{type(e).__name__}: {e}"[:MAX_TAG_LENGTH])
        except mlflow.exceptions.MlflowException as tag_error:  # keep the training's error the one raised
            log.warning("could not tag run %s with the failure: %s", run_id, tag_error)
        finally:
            mlflow.end_run(status)
        raise
    mlflow.end_run()
    (checkpoint_dir / COMPLETE_MARKER).write_text(run_id + "\n")
    trained = Trained(run_id, str(result.checkpoint), result.metrics)
    trained.save(repo)
    return trained


def classifier(config: Config, repo: Path, progress: bool = True) -> dict:
    """The FID feature network: reuse the checkpoint if it was trained with these settings, else
    train it. Records its test accuracy in outputs/classifier.json."""
    network = trained_classifier(config.classifier)
    reused = network is not None
    if reused:
        log.info("reusing %s (test accuracy %.4f)", config.classifier.checkpoint, network.test_accuracy)
    else:
        network = train_classifier(config, progress)
    record = {"test_accuracy": network.test_accuracy, "checkpoint": config.classifier.checkpoint, "reused": reused}
    _write_json(repo / CLASSIFIER_JSON, record)
    return record


def evaluate(config: Config, pipeline: PipelineConfig, repo: Path, trained: Trained, progress: bool = True) -> dict:
    """Held-out denoising loss and sample quality (FID beside its floor, class coverage) into the
    run and the DVC metrics file."""
    metrics = evaluate_checkpoint(trained.checkpoint, config, progress)
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics(metrics)
    summary = {**{key: metrics[key] for key in ("eval_loss", *QUALITY_METRICS)},
               "train_loss_epoch": trained.metrics.get("train_loss_epoch"),
               "images_per_second": trained.metrics.get("images_per_second"), "per_t": {
                   k: v for k, v in metrics.items() if k.startswith("eval_loss_t")}}
    _write_json(repo / METRICS_JSON, summary)
    return metrics


def register(pipeline: PipelineConfig, repo: Path, trained: Trained) -> Registration:
    registration = register_model(trained.run_id, trained.checkpoint, pipeline.registry)
    _write_json(repo / REGISTERED_JSON, dataclasses.asdict(registration))
    return registration


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
