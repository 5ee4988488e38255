"""MLflow run handling against a real MLflow store (SQLite): a resumed run logs every step and epoch
once, stale runs of this workspace are ended, a dead server fails fast."""

import errno
import logging
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from ddpm.callbacks import EpochEnd, FitResult
from ddpm.config import Config, config_from_dict
from ddpm.files import partial_path
from flows import tracking
from flows.config import params_from_dict
from flows.logger import MlflowLogger
from flows.outbox import EPOCH, RETRY_LOGGER, STEP, UNSENT_FILE, Outbox, record, save_unsent, unreachable
from flows.tracking import (
    FAILURE_TAG,
    RESUMED_TAG,
    WORKSPACE_TAG,
    TrackingError,
    connect,
    end_stale_runs,
    start_run,
    workspace_id,
)

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"  # one store: creating one takes seconds


@pytest.fixture
def pipeline(database, request, mlflow_state):
    """The store, with an experiment of the test's own."""
    _, pipeline = params_from_dict({"tracking": {"uri": f"sqlite:///{database}", "experiment": request.node.name}})
    connect(pipeline)
    return pipeline


def epoch_end(epoch: int) -> EpochEnd:
    grid = np.zeros((4, 1, 28, 28), np.float32)
    return EpochEnd(
        epoch,
        (epoch + 1) * STEPS_PER_EPOCH,
        {"train_loss_epoch": 0.5 - epoch / 10},
        Path("x.ckpt"),
        lambda num, seed: grid[:num],
    )


def steps_of(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def image_steps(client, run_id):
    return sorted(int(a.path.split("+")[2]) for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))


def test_a_resumed_run_logs_every_step_and_epoch_once(pipeline):
    with mlflow.start_run() as run:  # the first attempt: epoch 1 done, killed in epoch 2 after step 6
        first = MlflowLogger(1, 1, 4, 0)
        first.on_train_start(Config(), 0, STEPS_PER_EPOCH, 0 * STEPS_PER_EPOCH, "bf16")
        for step in range(1, 5):
            first.on_step_end(step, {"train_loss": step / 10, "lr": 1e-3})
        first.on_epoch_end(epoch_end(0))
        for step in (5, 6):
            first.on_step_end(step, {"train_loss": step / 10, "lr": 1e-3})
        assert first.flush()  # steps 5 and 6 reached the store before the kill
    with mlflow.start_run(run_id=run.info.run_id):  # the rerun replays epoch 2 from its checkpoint
        second = MlflowLogger(1, 1, 4, 0)
        second.on_train_start(Config(), 1, STEPS_PER_EPOCH, 1 * STEPS_PER_EPOCH, "fp32")
        second.on_resume(epoch_end(0))
        for step in range(5, 9):
            second.on_step_end(step, {"train_loss": step / 10, "lr": 1e-3})
        second.on_epoch_end(epoch_end(1))
    client = MlflowClient()
    assert steps_of(client, run.info.run_id, "train_loss") == list(range(1, 9))
    assert steps_of(client, run.info.run_id, "lr") == list(range(1, 9))
    assert steps_of(client, run.info.run_id, "train_loss_epoch") == [1, 2]
    assert image_steps(client, run.info.run_id) == [1, 2]
    assert client.get_run(run.info.run_id).data.tags["precision"] == "bf16, then fp32"  # resumed on another CPU


def test_an_epoch_checkpointed_but_not_reported_is_reported_on_resume(pipeline):
    with mlflow.start_run() as run:  # killed between epoch 1's checkpoint and its report
        first = MlflowLogger(1, 1, 4, 0)
        first.on_train_start(Config(), 0, STEPS_PER_EPOCH, 0 * STEPS_PER_EPOCH, "fp32")
        for step in range(1, 5):
            first.on_step_end(step, {"train_loss": step / 10, "lr": 1e-3})
        assert first.flush()  # as before the checkpoint of epoch 1
    with mlflow.start_run(run_id=run.info.run_id):
        second = MlflowLogger(1, 1, 4, 0)
        second.on_train_start(Config(), 1, STEPS_PER_EPOCH, 1 * STEPS_PER_EPOCH, "fp32")
        second.on_resume(epoch_end(0))
    client = MlflowClient()
    assert steps_of(client, run.info.run_id, "train_loss") == [1, 2, 3, 4]
    assert steps_of(client, run.info.run_id, "train_loss_epoch") == [1]
    assert image_steps(client, run.info.run_id) == [1]
    assert client.get_run(run.info.run_id).data.tags["precision"] == "fp32"  # the same precision once


def test_a_resume_logs_what_an_outage_left_unsent_up_to_its_checkpoint_once(pipeline, tmp_path):
    """mlflow_unsent.json as a training killed during an outage left it: written for the checkpoint
    after step 8, which never made it (the resume starts after step 4, epoch 1), and the run holding step 1."""
    config = config_from_dict({"train": {"checkpoint_dir": str(tmp_path)}})
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_metrics({"train_loss": 0.1, "lr": 1e-3}, step=1)
    steps = [record(STEP, step, {"train_loss": step / 10, "lr": 1e-3}) for step in range(1, 9)]
    epochs = [record(EPOCH, epoch, {"epoch": epoch, "train_loss_epoch": 0.5}) for epoch in (1, 2)]
    save_unsent(tmp_path, run_id, [*steps, *epochs])
    with mlflow.start_run(run_id=run_id):
        logger = MlflowLogger(1, 0, 4, 0)
        logger.on_train_start(config, 1, STEPS_PER_EPOCH, 1 * STEPS_PER_EPOCH, "fp32")
        assert logger.flush()
        for step in range(5, 9):  # epoch 2 trained again: its steps are logged as they come
            logger.on_step_end(step, {"train_loss": step / 10, "lr": 1e-3})
        logger.on_epoch_end(epoch_end(1))
        logger.on_train_end(FitResult(Path("x.ckpt"), 2, 8, {}))
    client = MlflowClient()
    assert steps_of(client, run_id, "train_loss") == list(range(1, 9))
    assert steps_of(client, run_id, "train_loss_epoch") == [1, 2]
    saved = {m.step: m.timestamp for m in client.get_metric_history(run_id, "lr")}
    assert all(saved[r.step] == r.timestamp for r in steps[1:4])  # logged as measured, not as resent
    assert not (tmp_path / UNSENT_FILE).exists()


def grid_epoch_end(epoch: int, draws: list) -> EpochEnd:
    """An epoch end whose samples differ per epoch, counting how often they are drawn."""

    def draw(num, seed):
        draws.append(epoch)
        return np.full((num, 1, 28, 28), epoch / 10 - 0.5, np.float32)

    return EpochEnd(epoch, (epoch + 1) * STEPS_PER_EPOCH, {"train_loss_epoch": 0.5}, Path("x.ckpt"), draw)


def test_the_grids_for_dvc_plots_come_from_the_same_draw_and_survive_a_resume(pipeline, tmp_path):
    grids = tmp_path / "outputs" / "samples"
    draws: list[int] = []
    grids.mkdir(parents=True)
    (grids / "epoch_0007.png").write_bytes(b"an earlier training's grid")
    (grids / "notes.txt").write_text("not ours")
    with mlflow.start_run() as run:  # epochs 1 and 2, then killed in epoch 3 (a half-written grid left behind)
        first = MlflowLogger(1, 1, 4, 0, grids)
        first.on_train_start(Config(), 0, STEPS_PER_EPOCH, 0, "fp32")
        assert sorted(p.name for p in grids.iterdir()) == ["notes.txt"]  # a new training starts without grids
        first.on_epoch_end(grid_epoch_end(0, draws))
        first.on_epoch_end(grid_epoch_end(1, draws))
        partial_path(grids / "epoch_0003.png").write_bytes(b"half")
    assert draws == [0, 1]  # one draw per epoch serves MLflow and the PNG
    epoch_1 = (grids / "epoch_0001.png").read_bytes()
    with mlflow.start_run(run_id=run.info.run_id):  # resumed after epoch 2's checkpoint
        second = MlflowLogger(1, 1, 4, 0, grids)
        second.on_train_start(Config(), 2, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, "fp32")
        second.on_resume(grid_epoch_end(1, draws))
        second.on_epoch_end(grid_epoch_end(2, draws))
    assert draws == [0, 1, 2]  # epoch 2 is neither drawn nor logged again
    assert sorted(p.name for p in grids.iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
        "epoch_0003.png",
        "notes.txt",
    ]
    assert (grids / "epoch_0001.png").read_bytes() == epoch_1
    images = {name: np.asarray(Image.open(grids / name)) for name in ("epoch_0001.png", "epoch_0003.png")}
    assert images["epoch_0001.png"].shape == (62, 62)  # 2 x 2 tiles of 28 + padding, grey
    assert (
        images["epoch_0001.png"][2, 2] == 64 and images["epoch_0003.png"][2, 2] == 89
    )  # -0.5 and -0.3: each epoch's own
    assert image_steps(MlflowClient(), run.info.run_id) == [1, 2, 3]

    (grids / "epoch_0002.png").unlink()  # e.g. a checkout without it: the resume writes the missing grid
    with mlflow.start_run(run_id=run.info.run_id):
        third = MlflowLogger(1, 1, 4, 0, grids)
        third.on_train_start(Config(), 2, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, "fp32")
        third.on_resume(grid_epoch_end(1, draws))
    assert (grids / "epoch_0002.png").is_file() and not (grids / "epoch_0003.png").exists()
    assert image_steps(MlflowClient(), run.info.run_id) == [1, 2, 3]  # MLflow's copy is not logged twice


def test_stale_runs_of_this_workspace_end_killed_and_resume_reopens_one(pipeline, tmp_path):
    repo, other = tmp_path / "repo", tmp_path / "other"
    config = config_from_dict({"train": {"checkpoint_dir": str(repo / "checkpoints")}})
    run_id = start_run(config, pipeline, {WORKSPACE_TAG: workspace_id(repo)}, resume=False)  # then SIGKILL
    mlflow.end_run("RUNNING")  # what a dead process leaves behind
    client = MlflowClient()
    experiment = client.get_experiment_by_name(pipeline.tracking.experiment)
    assert experiment is not None
    theirs = client.create_run(
        experiment.experiment_id,
        tags={WORKSPACE_TAG: workspace_id(other)},
    ).info.run_id
    assert end_stale_runs(pipeline, repo) == [run_id]
    stale = client.get_run(run_id)
    assert stale.info.status == "KILLED" and "process died" in stale.data.tags[FAILURE_TAG]
    assert client.get_run(theirs).info.status == "RUNNING"  # another checkout's live run is left alone

    assert start_run(config, pipeline, {WORKSPACE_TAG: workspace_id(repo)}, resume=True) == run_id
    mlflow.end_run()
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and FAILURE_TAG not in resumed.data.tags
    assert resumed.data.tags[RESUMED_TAG] == "1"
    assert len(client.search_runs([resumed.info.experiment_id])) == 2  # no new run


def test_stale_runs_are_found_beyond_the_first_page_of_search_results(pipeline, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    config = config_from_dict({"train": {"checkpoint_dir": str(repo / "checkpoints")}})
    run_id = start_run(config, pipeline, {WORKSPACE_TAG: workspace_id(repo)}, resume=False)
    mlflow.end_run("RUNNING")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(pipeline.tracking.experiment)
    assert experiment is not None
    experiment_id = experiment.experiment_id
    for n in range(5):  # newer runs of other checkouts: they fill the first pages
        client.create_run(experiment_id, tags={WORKSPACE_TAG: workspace_id(tmp_path / f"other{n}")})
    monkeypatch.setattr(tracking, "SEARCH_PAGE", 2)
    assert end_stale_runs(pipeline, repo) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"


def test_resuming_a_run_the_store_lacks_names_the_run_and_the_fix(pipeline, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")
    config = config_from_dict({"train": {"checkpoint_dir": str(checkpoints)}})
    with pytest.raises(TrackingError, match=r"0123456789abcdef0123456789abcdef.*MLFLOW_TRACKING_URI"):
        start_run(config, pipeline, {}, resume=True)


def test_a_server_that_accepts_but_never_answers_fails_within_the_timeout(mlflow_state):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel accepts connections; nobody ever answers
        _, pipeline = params_from_dict(
            {"tracking": {"uri": f"http://127.0.0.1:{server.getsockname()[1]}", "connect_timeout": 1.0}}
        )
        started = time.monotonic()
        with pytest.raises(TrackingError, match=r"unreachable.*mlflow server"):
            connect(pipeline)
        assert time.monotonic() - started < 5


def test_a_locked_store_is_named_locked_not_damaged(tmp_path, mlflow_state):
    """`database is locked` is a sqlalchemy OperationalError, a DatabaseError too: not a damaged file."""
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the lock past SQLite's timeout
    try:
        with pytest.raises(TrackingError) as caught:
            tracking.use_experiment(f"sqlite:///{db}", "locked")
    finally:
        holder.rollback()
        holder.close()
    message = str(caught.value)
    assert f"{db} is locked by another process (database is locked)" in message and "fuser" in message
    assert "backup" not in message and "not a readable" not in message


def test_a_store_behind_a_file_is_one_error_at_once(tmp_path, mlflow_state):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"cannot be created: {blocker} is a file, not a directory"):
        tracking.use_experiment(f"sqlite:///{blocker / 'mlflow.db'}", "blocked")
    assert time.monotonic() - started < 5 and blocker.read_text() == "mine"


def test_a_store_in_a_read_only_directory_is_one_error_at_once(tmp_path, mlflow_state):
    directory = tmp_path / "store"
    directory.mkdir()
    bound = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True, text=True
    )
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here ({bound.stderr.strip()})")
    started = time.monotonic()
    try:
        with pytest.raises(TrackingError, match=f"cannot be written: {directory} is not writable"):
            tracking.use_experiment(f"sqlite:///{directory / 'mlflow.db'}", "read-only")
    finally:
        subprocess.run(["umount", str(directory)], check=True)
    assert time.monotonic() - started < 5 and not list(directory.iterdir())


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (requests.ConnectionError("connection broken"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.ENOSPC, "No space left on device"), False),  # a full mlruns/: waiting never ends it
        (PermissionError(errno.EACCES, "Permission denied"), False),
    ],
)
def test_only_a_network_failure_is_an_outage_the_outbox_waits_out(error, outage):
    assert unreachable(error) is outage


def test_mlflows_retry_warnings_are_debug_lines_once_an_outbox_opened(caplog):
    retries = logging.getLogger(RETRY_LOGGER)
    with caplog.at_level(logging.INFO, logger=RETRY_LOGGER):
        Outbox("sqlite:///unused.db", "run", timeout=1.0, image_key="samples").close()
        retries.warning("Retrying (Retry(total=6)) after connection broken by NewConnectionError: /runs/get")
    assert caplog.records == []  # the outbox's one warning says the server is down
    with caplog.at_level(logging.DEBUG, logger=RETRY_LOGGER):
        retries.warning("Retrying (Retry(total=5)) after connection broken")
        retries.warning("Connection pool is full, discarding connection")  # any other warning stays one
    assert [r.levelname for r in caplog.records] == ["DEBUG", "WARNING"]
