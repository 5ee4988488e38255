"""The train step: `fit` with MLflow tracking in train.checkpoint_dir, then the model logged to its
run (an MLflow LoggedModel), so that a finished training is never lost to a later failure.

What the checkpoint directory holds decides what a run does:
- nothing: a new training;
- checkpoints of an unfinished training (killed, stopped, failed): resume it in the same MLflow run;
- a finished training (its marker names run and model) already registered: a new training, after
  deleting only the files a training writes there;
- a finished training not registered yet, or one a flow run took and did not take to its end (a
  failure after register: FLOW_UNFINISHED): the Prefect flow continues with it if the settings are
  the same, train.posthoc_lengths included since its weights were chosen among them (evaluate and
  register unless done, no retraining); a DVC train stage, which runs only
  when one of its inputs changed, trains anew (the previous model stays in MLflow, logged).
A directory holding any file a training did not write is refused, never cleaned.
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

from ddpm.callbacks import Callback
from ddpm.checkpoint import written_here
from ddpm.config import Config
from ddpm.distributed import WORKER_LOGS
from ddpm.files import final_name
from flows.config import PipelineConfig
from flows.steps import FLOW_UNFINISHED, LOSS_CSV, SAMPLES_DIR, TRAIN_JSON, Trained, read_json, write_json

log = logging.getLogger(__name__)

GIT_COMMITS_TAG = "git_commits"  # every commit a run trained under, "a, then b"; `git_commit` is the last
FINISHED_MARKER = "finished.json"  # in the checkpoint dir: the Trained record of a finished training
LEGACY_MARKER = "COMPLETE"  # what earlier versions wrote there instead
# The names a training writes into its checkpoint directory besides ddpm.checkpoint's own files
# (flows.tracking's run id, flows.outbox's unsent metrics, flows.parallel's, the markers), and their temporaries
# (ddpm.files): the only files the pipeline deletes there.
OWNED_FILES = re.compile(
    r"^(mlflow_run_id|mlflow_unsent\.json|worker_params\.yaml|fit_result\.json|finished\.json|COMPLETE|flow_unfinished)$"
)
OWNED_DIRS = {WORKER_LOGS}
MAX_LISTED = 5  # foreign files named in the error
# Post-hoc EMA's choice (sampling_checkpoint): the candidates' held-out losses and what was chosen
# train settings a resume may change (ddpm.resume.RESUMABLE_CHANGES) but a finished training has settled:
# how long it trains, and the post-hoc lengths its weights were chosen among after it
SETTLED_WHEN_FINISHED = ("epochs", "posthoc_lengths")
EMA_EVAL_LOSS, POSTHOC_EVAL_LOSS, SAMPLING_WEIGHTS_TAG = "ema_eval_loss", "posthoc_eval_loss", "sampling_weights"


def foreign_files(directory: Path) -> list[Path]:
    """Files in `directory` that no training wrote."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if not (written_here(p.name) or OWNED_FILES.match(final_name(p.name)) or (p.name in OWNED_DIRS and p.is_dir()))
    )


def refuse_foreign_files(directory: Path) -> None:
    found = foreign_files(directory)
    if found:
        names = ", ".join(p.name for p in found[:MAX_LISTED]) + (", ..." if len(found) > MAX_LISTED else "")
        raise FileExistsError(
            f"train.checkpoint_dir {directory} holds {len(found)} files no training wrote ({names}); the pipeline "
            f"deletes only its own files, so it will not train there. Set train.checkpoint_dir to a new or empty "
            f"directory (--set train.checkpoint_dir=checkpoints/NAME), or move those files out."
        )


def clear_training(directory: Path) -> None:
    """Delete what a training wrote in `directory`, and nothing else."""
    refuse_foreign_files(directory)  # checked again: nothing foreign is ever deleted
    for path in directory.iterdir():
        if path.is_dir():
            shutil.rmtree(path)  # worker_logs: msrun's logs of our own workers
        else:
            path.unlink()


def finished_training(directory: Path) -> Trained | None:
    record = read_json(directory / FINISHED_MARKER)
    return Trained(**record) if record is not None else None


class LossCsv(Callback):
    """Appends step,train_loss,lr rows for `dvc plots` and the report figure; a fresh run starts a
    fresh file, a resumed one keeps the rows up to its checkpoint (the steps after it run again)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(
        self, config: Config, start_epoch: int, steps_per_epoch: int, start_step: int, precision: str
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in list(csv.reader(f))[1:] if int(row[0]) <= start_step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([["step", "train_loss", "lr"], *kept])

    def on_step_end(self, global_step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([global_step, f"{metrics['train_loss']:.6f}", f"{metrics['lr']:.6g}"])


def training_callbacks(config: Config, pipeline: PipelineConfig, repo: Path, in_flow: bool = False) -> list[Callback]:
    """MLflow logging (per step, per epoch, sample grids), the DVC plots (loss, sample grids), and in
    a Prefect flow run its progress artifact."""
    from flows.logger import MlflowLogger

    callbacks: list[Callback] = [
        MlflowLogger(
            pipeline.tracking.log_every,
            config.train.sample_every,
            config.train.sample_num,
            config.train.sample_seed,
            repo / SAMPLES_DIR,
            timeout=pipeline.tracking.connect_timeout,
        ),
        LossCsv(repo / LOSS_CSV),
    ]
    if in_flow:
        from flows.progress import PrefectProgress

        callbacks.append(PrefectProgress())
    return callbacks


def train(
    config: Config,
    pipeline: PipelineConfig,
    repo: Path,
    flow_run_id: str | None = None,
    progress: bool = True,
    continue_finished: bool = False,
) -> Trained:
    """Train (or resume), log the model to the run, and record it in outputs/train.json and the
    checkpoint directory; with `continue_finished` (the flow), take up a finished training with the
    same settings instead, unless it is registered and the flow that took it reached its end. A
    failure of the training ends its run FAILED with the reason as a tag; damaged data fails before
    any run exists."""
    from ddpm.data import verify_dataset

    verify_dataset(repo / config.data.root)
    directory = repo / config.train.checkpoint_dir
    refuse_foreign_files(directory)
    finished = finished_training(directory)
    if finished is not None and continue_finished and _unfinished_same_training(finished, directory, config, pipeline):
        log.info(
            "%s holds a finished training (MLflow run %s) that no run of the flow took to its end; continuing with it",
            directory,
            finished.run_id,
        )
        (directory / FLOW_UNFINISHED).touch()
        finished.save(repo / TRAIN_JSON)
        return finished
    if finished is not None or (directory / LEGACY_MARKER).is_file():
        if finished is not None:
            log.info(
                "%s holds a finished training (run %s, model %s); starting a new one",
                directory,
                finished.run_id,
                finished.model_id,
            )
        clear_training(directory)
    if continue_finished:  # until the flow reaches its end, its rerun takes this training up
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FLOW_UNFINISHED).touch()
    trained = _fit_and_log(config, pipeline, repo, directory, flow_run_id, progress)
    write_json(directory / FINISHED_MARKER, trained.__dict__)
    trained.save(repo / TRAIN_JSON)
    return trained


def _unfinished_same_training(finished: Trained, directory: Path, config: Config, pipeline: PipelineConfig) -> bool:
    from ddpm.checkpoint import load_checkpoint
    from ddpm.resume import resume_conflicts
    from flows.registry import registered_version

    if (
        registered_version(pipeline.registry, finished.run_id) is not None
        and not (directory / FLOW_UNFINISHED).is_file()
    ):
        return False
    saved = load_checkpoint(finished.checkpoint).config
    settled = any(getattr(saved.train, key) != getattr(config.train, key) for key in SETTLED_WHEN_FINISHED)
    if settled or resume_conflicts(saved, config):
        log.info(
            "the finished training in %s (run %s, model %s) was trained with other settings; it stays in "
            "MLflow as a logged model",
            directory,
            finished.run_id,
            finished.model_id,
        )
        return False
    return True


def record_commit(run_id: str, commit: str) -> None:
    """Append `commit` to the run's commit history: a resume after a code change trained under both."""
    from mlflow import MlflowClient

    from flows.logger import appended_history

    client = MlflowClient()
    previous = client.get_run(run_id).data.tags.get(GIT_COMMITS_TAG)
    client.set_tag(run_id, GIT_COMMITS_TAG, appended_history(previous, commit))


def _fit_and_log(
    config: Config, pipeline: PipelineConfig, repo: Path, directory: Path, flow_run_id: str | None, progress: bool
) -> Trained:
    import mlflow

    from ddpm.checkpoint import list_checkpoints
    from ddpm.train import fit
    from flows.data import dvc_data_hash
    from flows.parallel import fit_on_workers
    from flows.registry import log_sampler_model
    from flows.tracking import (
        IMAGES_SEEN,
        WORKSPACE_TAG,
        end_run_with_failure,
        git_commit,
        log_dataset,
        start_run,
        workspace_id,
    )

    resume = bool(list_checkpoints(directory))
    if resume:
        log.info("%s holds an unfinished training; resuming it", directory)
    data_hash = dvc_data_hash(repo)
    commit = git_commit(repo)
    tags = {"git_commit": commit, "dvc_data_hash": data_hash, WORKSPACE_TAG: workspace_id(repo)}
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    run_id = start_run(config, pipeline, tags, resume)
    record_commit(run_id, commit)
    try:
        log_dataset(repo / config.data.root, data_hash)
        if config.train.workers > 1:
            result = fit_on_workers(config, pipeline, repo, run_id, resume)
        else:
            callbacks = training_callbacks(config, pipeline, repo, in_flow=flow_run_id is not None)
            result = fit(config, callbacks, resume=resume, progress=progress)
    except BaseException as e:
        end_run_with_failure(run_id, e)
        raise
    try:
        mlflow.log_metric(IMAGES_SEEN, result.global_step * config.train.batch_size, step=result.global_step)
        checkpoint = sampling_checkpoint(config, result.checkpoint, progress)
        model_id = log_sampler_model(str(checkpoint), config.model)
    finally:
        mlflow.end_run()  # FINISHED: the training succeeded, whatever happened to the model's upload
    return Trained(run_id, str(checkpoint), result.metrics, model_id)


def sampling_checkpoint(config: Config, checkpoint: Path, progress: bool) -> Path:
    """The weights the run's model samples with: the training's EMA, or with train.posthoc_lengths
    whichever of it, the raw weights and the post-hoc averages of those lengths has the lowest
    held-out denoising loss, each logged to the active run (posthoc_eval_loss at step 1000 x sigma_rel,
    the raw weights at step 0; ema_eval_loss)."""
    import mlflow

    from ddpm.posthoc_ema import choose

    if not config.train.posthoc_lengths:
        return checkpoint
    choice = choose(checkpoint, config.train.posthoc_lengths, config, progress)
    mlflow.log_metric(EMA_EVAL_LOSS, choice.ema_loss)
    for sigma_rel, loss in choice.losses.items():
        mlflow.log_metric(POSTHOC_EVAL_LOSS, loss, step=round(sigma_rel * 1000))
    if choice.sigma_rel is None:
        chosen = "ema"
    else:
        chosen = "raw" if choice.sigma_rel == 0.0 else f"posthoc sigma_rel {choice.sigma_rel:.3f}"
    mlflow.set_tag(SAMPLING_WEIGHTS_TAG, chosen)
    return choice.checkpoint
