"""MLflow run handling: the store's connection and its errors, starting, reopening and ending a
training's run, its dataset and evaluation.

A training survives a crash in one MLflow run: the run id is kept beside the checkpoints and a
resumed training reopens that run; flows/logger.py's callback then skips whatever the run already
holds, so every step and every epoch is logged exactly once however often it was interrupted.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import sqlite3
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds

from ddpm.config import Config
from ddpm.errors import causes, describe, full_disk
from ddpm.logs import DemoteToDebug, redact
from flows.config import SQLITE_PREFIX, PipelineConfig, flatten
from flows.errors import TrackingError
from flows.steps import MEASURED_PREFIX, PER_T_PREFIX

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # beside the checkpoints, so a resumed training continues its run
WORKSPACE_TAG = "workspace"  # host:path of the checkout that owns a run
FAILURE_TAG = "failure"  # why a run ended FAILED or KILLED
SEARCH_PAGE = 1000  # runs per search request (MLflow's maximum)
RESUMED_TAG = "resumed"  # how many times an interrupted training continued in this run
PER_T_METRIC = "eval_loss_per_t"  # logged as one metric, step = t
IMAGES_SEEN = "images_seen"  # training images the model was fitted on (steps x global batch), logged when training ends
DATASET_NAME = "fashion-mnist"
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split, what data.limit=0 means
ARTIFACTS_DIR = "mlruns"  # beside a local SQLite store: each experiment's artifacts in mlruns/<experiment>
MAX_TAG_LENGTH = 5000  # MLflow's limit on a tag value
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # read by MLflow's client
STORE_LOGGER = "mlflow.store.db.utils"  # logs a traceback for each SQLAlchemy error it then raises as its own


def connect(pipeline: PipelineConfig) -> str:
    """Point MLflow at the configured store and fail fast, before any training, if a server is down.
    Returns the store's URI without credentials."""
    uri = use_credentials(pipeline.tracking_uri)
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=pipeline.tracking.connect_timeout) as response:
                response.read()
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e) or type(e).__name__}). "
                f"Start it (`mlflow server --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI to "
                f"use the local default {redact(pipeline.tracking.uri)}."
            ) from None
    mlflow.set_tracking_uri(uri)
    logging.getLogger(STORE_LOGGER).addFilter(QUIET_STORE_ERRORS)
    use_experiment(uri, pipeline.tracking.experiment)
    return uri


def failed_store_traceback(record: logging.LogRecord) -> bool:
    """MLflow's traceback of a full or a locked SQLite store ("database or disk is full", "database is
    locked", with the query and its values), a debug line: the error is raised on, and the entry point
    reports it as one line."""
    error = record.exc_info[1] if record.exc_info else None
    return error is not None and (full_disk(error) is not None or sqlite_busy(error))


def sqlite_busy(e: BaseException) -> bool:
    """SQLite's "database is locked" behind `e`: another connection held the store past the busy timeout."""
    busy = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return any(isinstance(c, sqlite3.OperationalError) and c.sqlite_errorcode in busy for c in causes(e))


QUIET_STORE_ERRORS = DemoteToDebug(failed_store_traceback)  # one instance: connect adds it once however often it runs


def use_credentials(uri: str) -> str:
    """`uri` without the userinfo of `http://user:password@host`, which becomes MLFLOW_TRACKING_USERNAME
    and _PASSWORD: MLflow's client sends those as basic auth, as it (through requests) sends a URI's
    userinfo, taking it over these variables; but MLflow prints its URI and puts it in its errors."""
    uri, credentials = split_credentials(uri)
    if credentials is not None:
        os.environ.update(zip(CREDENTIAL_VARS, credentials, strict=True))
    return uri


def split_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """An http(s) URI without its userinfo, and the (user, password) it held, or None."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    credentials = urllib.parse.unquote(user), urllib.parse.unquote(password)
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), credentials


def use_experiment(uri: str, name: str) -> None:
    """Make `name` the active experiment, creating it with its artifacts beside a local SQLite store
    (MLflow would put them under the working directory, which for a DVC --temp or queued experiment
    is a copy deleted after the run). A SQLite store that cannot be written, is locked or is damaged
    is an error naming the file and the fix for that case, and is left untouched."""
    if uri.startswith(SQLITE_PREFIX):
        check_sqlite_store(Path(uri.removeprefix(SQLITE_PREFIX)))
    try:
        client = MlflowClient(uri)
        if uri.startswith(SQLITE_PREFIX) and client.get_experiment_by_name(name) is None:
            artifacts = Path(uri.removeprefix(SQLITE_PREFIX)).parent / ARTIFACTS_DIR / name
            client.create_experiment(name, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(name)
    except MlflowException as e:  # a basic-auth server answers /health to anyone, so this is its first word
        if full_disk(e) is not None:
            raise  # not a damaged store: the entry point names the full disk
        status = e.get_http_status_code()
        if status in (http.HTTPStatus.UNAUTHORIZED, http.HTTPStatus.FORBIDDEN):
            raise TrackingError(refused_message(uri, name, status)) from None
        if isinstance(e.__cause__, sqlalchemy.exc.DatabaseError):  # MLflow wraps the store's errors after startup
            raise store_error(uri, e.__cause__) from None
        raise
    except sqlalchemy.exc.DatabaseError as e:
        if full_disk(e) is not None:
            raise
        raise store_error(uri, e) from None


def check_sqlite_store(db: Path) -> None:
    """Refuse at once a SQLite store that cannot be written (MLflow retries opening it for minutes).
    SQLite writes the file and, beside it, its journal: both need a writable directory."""
    fix = "or point MLFLOW_TRACKING_URI at a store in a writable directory (e.g. sqlite:////tmp/mlflow.db)"
    ancestors = [db.parent, *db.parent.parents]
    if blocker := next((p for p in ancestors if p.exists() and not p.is_dir()), None):
        raise TrackingError(
            f"the MLflow store {db} cannot be created: {blocker} is a file, not a directory. Move that file, {fix}."
        )
    existing = next(p for p in ancestors if p.exists())
    unwritable = [p for p in (existing, db) if p.exists() and not os.access(p, os.W_OK)]
    if unwritable:
        raise TrackingError(
            f"the MLflow store {db} cannot be written: {unwritable[0]} is not writable (read-only "
            f"file system or permissions). Make it writable, {fix}. The store was left as it is."
        )


def store_error(uri: str, error: sqlalchemy.exc.DatabaseError) -> TrackingError:
    """What is wrong with the store, and its fix: locked or unopenable (OperationalError) is not damaged."""
    path = uri.removeprefix(SQLITE_PREFIX)
    if isinstance(error, sqlalchemy.exc.OperationalError):
        if "locked" in str(error.orig):
            return TrackingError(
                f"{path} is locked by another process ({error.orig}): a program writing to it (another pipeline, "
                f"`mlflow ui`, a script) held its lock past SQLite's timeout. Let it finish or stop it (`fuser {path}` "
                f"names it), then rerun; for several writers at once, use a tracking server (`mlflow server`). The "
                f"file was left as it is."
            )
        return TrackingError(
            f"{path} cannot be opened ({error.orig}): check that it and its directory exist, are readable and "
            f"writable, and that the disk is not full, or point MLFLOW_TRACKING_URI at another store. The file was "
            f"left as it is."
        )
    return TrackingError(
        f"{path} is not a readable MLflow database ({error.orig}). It was left as it is: restore it from a backup, "
        f"or move it aside to start a new store there (its runs and models are then not shown), or point "
        f"MLFLOW_TRACKING_URI at another store."
    )


def refused_message(uri: str, experiment: str, status: int) -> str:
    """Why an authenticating server (`mlflow server --app-name basic-auth`) turned the client away."""
    user = read_mlflow_creds().username
    if status == http.HTTPStatus.UNAUTHORIZED:
        given = f"user {user!r}" if user else "none given"
        return (
            f"the tracking server {uri} refused the credentials ({given}): set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD to an account on that server (docs/scale.md, 'Who can get in')."
        )
    return (
        f"the tracking server {uri} denies user {user!r} access to experiment {experiment!r}: ask its admin "
        f"for EDIT on it (docs/scale.md, 'Who can get in')."
    )


def git_commit(repo: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def workspace_id(repo: Path) -> str:
    """Which checkout a run belongs to: its runs are tagged with this."""
    return f"{socket.gethostname()}:{Path(repo).resolve()}"


def end_stale_runs(pipeline: PipelineConfig, repo: Path) -> list[str]:
    """End KILLED this workspace's runs still RUNNING: their process died without ending them.
    Only call this holding the workspace lock, when no live process of this workspace has a run open."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(pipeline.tracking.experiment)
    if experiment is None:
        return []
    owner = workspace_id(repo)
    running = _all_runs(client, experiment.experiment_id, "attributes.status = 'RUNNING'")
    stale = [run.info.run_id for run in running if run.data.tags.get(WORKSPACE_TAG) == owner]
    for run_id in stale:
        client.set_tag(run_id, FAILURE_TAG, "interrupted: its process died without ending the run")
        client.set_terminated(run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by a process that died; ended it KILLED", run_id)
    return stale


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str):
    """Every run matching `filter_string`, page by page (one search returns at most SEARCH_PAGE; the
    workspace tag is compared by the caller, since a path can hold characters a filter string cannot)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=SEARCH_PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def start_run(config: Config, pipeline: PipelineConfig, tags: dict[str, str], resume: bool) -> str:
    """Start the training run (or reopen the one the checkpoints belong to) and log every param."""
    connect(pipeline)
    run_file = Path(config.train.checkpoint_dir) / RUN_ID_FILE
    run_id = run_file.read_text().strip() if resume and run_file.is_file() else None
    if run_id is None:
        run = mlflow.start_run(run_name=run_name(config), tags=tags, log_system_metrics=system_metrics())
        mlflow.log_params(flatten(config.to_dict()))
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(run.info.run_id)
    else:
        run = reopen_run(run_id, run_file, pipeline)
        mlflow.set_tags(tags)
    log.info("MLflow run %s in experiment %s", run.info.run_id, pipeline.tracking.experiment)
    return run.info.run_id


def system_metrics() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network, GPU where present) beside a training's,
    unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING turns them off."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as enabled

    return enabled.get() if enabled.defined else True


def end_run_with_failure(run_id: str, error: BaseException) -> None:
    """End the active training run KILLED (interrupted) or FAILED, with the reason as a tag."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        mlflow.set_tag(FAILURE_TAG, redact(f"{type(error).__name__}: {error}")[:MAX_TAG_LENGTH])
    except MlflowException as tag_error:  # keep the training's error the one raised
        log.warning("could not tag run %s with the failure: %s", run_id, describe(tag_error))  # no query text
    finally:
        mlflow.end_run(status)


def log_evaluation(run_id: str, model_id: str, metrics: dict[str, float], measured: dict[str, str]) -> None:
    """The evaluation's metrics into the training run, linked to its logged model (the UI's Models
    tab and `search_logged_models` show them per model); the per-timestep losses as one metric with
    step = t, one curve in the UI; `measured` (how the scores were measured) as the model's tags, which
    the promotion gate compares. The run keeps its status."""
    per_t = {
        int(key.removeprefix(PER_T_PREFIX)): value for key, value in metrics.items() if key.startswith(PER_T_PREFIX)
    }
    scalars = {key: value for key, value in metrics.items() if not key.startswith(PER_T_PREFIX)}
    mlflow.log_metrics(scalars, run_id=run_id, model_id=model_id, synchronous=True)
    for t, value in sorted(per_t.items()):
        mlflow.log_metric(PER_T_METRIC, value, step=t, run_id=run_id, synchronous=True)
    MlflowClient().set_logged_model_tags(model_id, {MEASURED_PREFIX + key: value for key, value in measured.items()})


def log_dataset(data_root: Path, data_hash: str) -> None:
    """Fashion-MNIST as the active run's training input, its DVC hash as the digest (the run page's
    Datasets panel; runs trained on other data show another digest)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # mlflow adds it at import

    source = LocalArtifactDatasetSource(data_root.resolve().as_uri())
    # mlflow's Dataset marks `profile` abstract without enforcing it; MetaDataset, made for this use, has none
    dataset = MetaDataset(source, name=DATASET_NAME, digest=data_hash)  # type: ignore[abstract]
    mlflow.log_input(dataset, context="training")


def run_name(config: Config) -> str:
    """What sets a training apart, for the runs table: network, schedule, learning rate, images seen."""
    model, train = config.model, config.train
    images = train.epochs * (config.data.limit or TRAIN_IMAGES)
    mults = "-".join(map(str, model.dim_mults))
    return f"dim{model.dim}x{mults} {config.diffusion.schedule} lr{train.lr:g} {images / 1000:g}k img"


def logged_evaluation(run_id: str, keys: tuple[str, ...]) -> dict[str, float] | None:
    """The evaluation metrics a run holds, or None if it was not evaluated."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    return metrics if all(key in metrics for key in keys) else None


def logged_measurement(model_id: str) -> dict[str, str]:
    """How a logged model's evaluation was measured (the tags `log_evaluation` set), {} if it has none."""
    tags = MlflowClient().get_logged_model(model_id).tags
    return {key.removeprefix(MEASURED_PREFIX): value for key, value in tags.items() if key.startswith(MEASURED_PREFIX)}


def reopen_run(run_id: str, run_file: Path, pipeline: PipelineConfig) -> mlflow.ActiveRun:
    """Continue an interrupted training's run: it no longer failed, it resumed."""
    client = MlflowClient()
    try:
        previous = client.get_run(run_id)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics())
    except MlflowException as e:
        if full_disk(e) is not None:
            raise  # the entry point names the full disk, not a run it cannot reopen
        raise TrackingError(
            f"the checkpoints beside {run_file} belong to MLflow run {run_id}, which {redact(pipeline.tracking_uri)} "
            f"cannot reopen ({e.message}). Point MLFLOW_TRACKING_URI at the store that holds it, or delete "
            f"{run_file.parent} to start a new training."
        ) from None
    if FAILURE_TAG in previous.data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    mlflow.set_tag(RESUMED_TAG, int(previous.data.tags.get(RESUMED_TAG, 0)) + 1)
    log.info("resuming MLflow run %s (was %s)", run_id, previous.info.status)
    return run


def run_url(pipeline: PipelineConfig, run_id: str) -> str:
    """A link to the run in the MLflow UI (server URI, or the `mlflow ui` default address)."""
    uri, _ = split_credentials(pipeline.tracking_uri)
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"
