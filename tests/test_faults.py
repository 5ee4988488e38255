"""Faults lose nothing: kill -9, NaN loss, damaged data, a dead tracking server, bad params and a
second pipeline, each injected into the real pipeline (real dvc, real MLflow store, real Prefect) in
a temporary project. docs/reliability.md maps each fault to its test here."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm import checkpoint as ckpt
from ddpm.data import FILES
from flows import pipeline, stages
from flows.config import load_params
from flows.workspace import LOCK_FILE
from tests import servers
from tests.faults import (
    EPOCHS,
    assert_resumed_exactly,
    kill_after_first_epoch,
    runs_of,
    set_params,
    start_frozen,
    store,
)
from tests.test_pipeline import run

pytestmark = pytest.mark.integration

QUEUE_DEADLINE = 1200  # seconds for DVC's queue worker to run one tiny experiment


@pytest.mark.slow
def test_kill_9_during_dvc_repro_then_rerun_resumes_in_the_same_run(project, tmp_path, freezer, references):
    set_params(project, train={"epochs": EPOCHS})
    repro = [sys.executable, "-m", "dvc", "repro", "train"]
    kill_after_first_epoch(repro, project, {}, tmp_path / "killed.log", freezer)
    client = store(project)
    assert [r.info.status for r in runs_of(client)] == ["RUNNING"]  # what kill -9 leaves behind

    rerun = run(repro, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "left RUNNING by a process that died" in rerun.stderr and "resuming from" in rerun.stderr
    assert_resumed_exactly(project, references, client)


STOP_STEP = 6  # SIGTERM lands in this step: 2 of the 4 steps of epoch 2, so the stop checkpoints mid-epoch
LOSS_CSV_OPENS = 1 + STOP_STEP  # loss.csv is opened once at the start, then once per step to append its row


@pytest.mark.slow
def test_sigterm_to_the_train_stage_checkpoints_at_the_step_ends_the_run_killed_and_a_rerun_resumes(
    project, tmp_path, freezer, references
):
    """SIGTERM reaches `python -m flows.stages train` while it is stopped in step 6 (at its append to
    loss.csv), so it cannot finish the epoch first; continued, it ends that step, checkpoints there,
    ends its MLflow run KILLED, frees the workspace and exits 143; the same command resumes at step 6."""
    set_params(project, train={"epochs": EPOCHS, "checkpoint_minutes": 0})  # no timed checkpoint: the stop's own
    stage = [sys.executable, "-m", "flows.stages", "train"]
    log = tmp_path / "stopped.log"
    process, pid = start_frozen(stage, project, {}, log, freezer, "outputs/loss.csv", LOSS_CSV_OPENS)
    assert pid == process.pid
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert f"training stopped by SIGTERM after step {STOP_STEP} (2 of 4 steps into epoch 2)" in output
    assert "`dvc repro` continues from there" in output and "Traceback" not in output

    checkpoints = [p.name for p in ckpt.list_checkpoints(project / "checkpoints")]
    assert checkpoints == ["epoch_0001.ckpt", "epoch_0002_step_000002.ckpt"]
    stopped = ckpt.load_checkpoint(project / "checkpoints" / checkpoints[-1])
    assert stopped.progress is not None
    assert stopped.global_step == STOP_STEP and stopped.progress.step == 2
    client = store(project)
    [killed] = runs_of(client)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure"].startswith(
        f"TrainingInterrupted: training stopped by SIGTERM after step {STOP_STEP}"
    )
    assert sorted(m.step for m in client.get_metric_history(killed.info.run_id, "train_loss")) == list(
        range(1, STOP_STEP + 1)
    )
    assert (project / LOCK_FILE).read_text() == ""  # a clean exit: no holder record left behind
    with open(project / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises BlockingIOError if still held

    rerun = run(stage, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "epoch_0002_step_000002.ckpt: 1 epochs done, 2 steps into the next" in rerun.stderr
    assert "died" not in rerun.stderr  # it ended its own run and lock: nothing to clean up after it
    assert assert_resumed_exactly(project, references, client) == killed.info.run_id


def test_nan_loss_fails_the_run_with_the_reason_and_registers_nothing(project, monkeypatch, mlflow_state, caplog):
    import ddpm.train

    build = ddpm.train.build_unet

    def poisoned(*args, **kwargs):  # a NaN weight: the loss is NaN from the first step
        net = build(*args, **kwargs)
        weight = net.trainable_params()[0]
        weight.set_data(weight.value() * float("nan"))
        return net

    monkeypatch.setattr(ddpm.train, "build_unet", poisoned)
    monkeypatch.chdir(project)
    assert stages.main(["train"]) == 2
    assert "loss is nan at epoch 1, step 1" in caplog.text
    assert stages.main(["register"]) == 2  # there is no trained model to register
    client = store(project)
    [failed] = runs_of(client)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure"].startswith("NonFiniteLossError: loss is nan at epoch 1, step 1;")
    assert "train_loss" not in failed.data.metrics  # stopped within the step: nothing of it was logged
    assert client.search_model_versions() == [] and not (project / "outputs" / "train.json").exists()
    assert ckpt.list_checkpoints(project / "checkpoints") == []


def test_damaged_data_fails_before_any_run_is_created(project, monkeypatch, mlflow_state, caplog):
    labels = project / "data" / "fashion-mnist" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-100])
    monkeypatch.chdir(project)
    assert stages.main(["train"]) == 2
    assert str(labels) in caplog.text and FILES["train-labels-idx1-ubyte"] in caplog.text  # file, expected hash
    assert "sha256 " in caplog.text.split(str(labels))[1]  # and the actual one
    assert runs_of(store(project)) == [] and not (project / "checkpoints").exists()


def test_invalid_params_are_one_error_before_anything_starts(project, monkeypatch, mlflow_state, caplog):
    monkeypatch.chdir(project)
    assert (
        pipeline.main(
            [
                "--set",
                "train.lr=fast",
                "--set",
                "train.bogus=1",
                "--set",
                "model.dim=3",
                "--set",
                "workspace.lock_timeout=-1",
                "--set",
                "epochs",
            ]
        )
        == 2
    )
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    for fragment in (
        "train.lr: expected float, got 'fast'",
        "train.bogus: unknown key",
        "model.dim: must be even",
        "workspace.lock_timeout: must be >= 0",
        "override 'epochs': expected section.key=value",
    ):
        assert fragment in error, fragment
    assert "Beginning flow run" not in caplog.text  # Prefect never started
    assert not (project / "mlflow.db").exists() and not (project / "checkpoints").exists()


def test_unreachable_tracking_server_fails_in_seconds_before_prefect_or_training(
    project, monkeypatch, mlflow_state, caplog
):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{servers.free_port()}")
    started = time.monotonic()
    assert pipeline.main([]) == 2
    assert time.monotonic() - started < 5
    assert "unreachable" in caplog.text and "mlflow server" in caplog.text
    assert "Beginning flow run" not in caplog.text and not (project / "checkpoints").exists()


@pytest.mark.slow
def test_the_pipeline_deletes_only_its_own_files(project, monkeypatch, mlflow_state, caplog):
    """Two complete trainings in runs/ours: the second deletes the first's checkpoints and markers,
    never a file beside them; a directory holding a file no training wrote is refused, not cleaned."""
    caplog.set_level(logging.INFO, logger="flows")
    set_params(project, train={"checkpoint_dir": "runs/ours", "posthoc_ema": [0.1], "posthoc_every": 2})
    beside = project / "runs" / "notes.txt"
    beside.parent.mkdir()
    beside.write_text("mine")
    monkeypatch.chdir(project)
    for _ in range(2):
        assert stages.main(["train"]) == 0, caplog.text
    assert beside.read_text() == "mine" and (project / "params.yaml").is_file()
    assert len(runs_of(store(project))) == 2 and "holds a finished training" in caplog.text
    assert (project / "runs" / "ours" / "posthoc").is_dir()  # the post-hoc EMA's snapshots are the training's own

    inside = project / "runs" / "ours" / "keep.txt"
    inside.write_text("mine too")
    assert stages.main(["train"]) == 2
    assert "holds 1 files no training wrote (keep.txt)" in caplog.text and "train.checkpoint_dir" in caplog.text
    assert inside.read_text() == "mine too" and len(runs_of(store(project))) == 2
    assert (project / "runs" / "ours" / "finished.json").is_file()  # the finished training is still there

    # runs/ itself as the checkpoint dir: it holds another training's folder and a user's file
    before = sorted(str(p.relative_to(project)) for p in (project / "runs").rglob("*"))
    set_params(project, train={"checkpoint_dir": "runs"})
    assert stages.main(["train"]) == 2
    assert "train.checkpoint_dir" in caplog.text and "holds 2 files no training wrote (notes.txt, ours)" in caplog.text
    assert sorted(str(p.relative_to(project)) for p in (project / "runs").rglob("*")) == before  # nothing deleted
    assert beside.read_text() == "mine" and len(runs_of(store(project))) == 2


@pytest.mark.slow
def test_an_output_the_stage_cannot_write_is_one_line_naming_it_and_exit_2(project, monkeypatch, mlflow_state, caplog):
    """As root no permission bit stops a write, so a directory stands where the loss CSV goes."""
    monkeypatch.chdir(project)
    (project / "outputs" / "loss.csv").mkdir(parents=True)
    assert stages.main(["train"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    blocked = project / "outputs" / "loss.csv"
    assert error.startswith(f"{blocked}: Is a directory; make it writable here, or clear what is in its way")
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("directory", [".", ""])
def test_a_checkpoint_dir_that_is_the_checkout_is_refused_before_anything_runs(
    project, monkeypatch, mlflow_state, caplog, directory
):
    monkeypatch.chdir(project)
    assert pipeline.main(["--set", f"train.checkpoint_dir='{directory}'"]) == 2
    assert "train.checkpoint_dir" in caplog.text and "is the checkout" in caplog.text
    assert not (project / "mlflow.db").exists() and (project / "params.yaml").is_file()


@pytest.mark.slow
def test_a_failed_registration_leaves_the_training_finished_and_a_rerun_registers_it(
    project, monkeypatch, mlflow_state, caplog
):
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(project)
    assert stages.main(["train"]) == 0
    register = mlflow.register_model

    def upload_fails(*args, **kwargs):  # simulated: the registry refuses the upload
        raise MlflowException("simulated: no space left on the artifact store")

    monkeypatch.setattr(mlflow, "register_model", upload_fails)
    assert stages.main(["register"]) == 2
    assert "registering model" in caplog.text and "no space left" in caplog.text and "rerun" in caplog.text
    client = store(project)
    [trained] = runs_of(client)
    assert trained.info.status == "FINISHED" and "failure" not in trained.data.tags
    assert client.search_model_versions() == []

    monkeypatch.setattr(mlflow, "register_model", register)
    assert stages.main(["register"]) == 0 and stages.main(["register"]) == 0  # twice: still one version
    [version] = client.search_model_versions()
    assert version.run_id == trained.info.run_id and len(runs_of(client)) == 1


@pytest.mark.slow
def test_a_rerun_reuses_an_evaluation_only_if_it_was_measured_the_same_way(project, monkeypatch, mlflow_state, caplog):
    """The flow's evaluate (skip_done) after a failure later on: the run's scores are reused when they
    were measured with the current sample/evaluate settings, else the model is scored again."""
    from flows.steps import TRAIN_JSON, Trained
    from flows.steps.evaluate import evaluate
    from flows.tracking import connect

    caplog.set_level(logging.INFO, logger="flows")
    monkeypatch.chdir(project)
    for stage in ("classifier", "train", "evaluate"):
        assert stages.main([stage]) == 0, caplog.text
    trained = Trained.load(project / TRAIN_JSON)
    client = store(project)

    def scorings() -> int:
        return len(client.get_metric_history(trained.run_id, "fid"))

    config, pipeline_config = load_params(project / "params.yaml", repo=project)
    connect(pipeline_config)
    same = evaluate(config, pipeline_config, project, trained, progress=False, skip_done=True)
    assert scorings() == 1 and same["fid"] == client.get_run(trained.run_id).data.metrics["fid"]
    assert "is evaluated already" in caplog.text

    config, pipeline_config = load_params(project / "params.yaml", {"sample.steps": 3}, repo=project)
    evaluate(config, pipeline_config, project, trained, progress=False, skip_done=True)
    assert scorings() == 2
    assert "was evaluated with other settings (sampler ddim-5 vs ddim-3); scoring it again" in caplog.text
    assert client.get_logged_model(trained.model_id).tags["measured.sampler"] == "ddim-3"


def test_a_damaged_mlflow_db_is_one_error_naming_it_and_left_as_it_was(project, monkeypatch, mlflow_state, caplog):
    db = project / "mlflow.db"
    db.write_bytes(b"not a database " * 100)
    before = db.read_bytes()
    monkeypatch.chdir(project)
    assert stages.main(["train"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert str(db) in error and "not a readable MLflow database" in error and "backup" in error
    assert db.read_bytes() == before and not (project / "checkpoints").exists()
    assert pipeline.main([]) == 2


# ---- slow: the Prefect paths (ephemeral API, then a real server, worker and deployment) ----


@pytest.mark.slow
def test_a_queued_dvc_experiment_records_into_the_checkouts_store(project, tmp_path):
    """DVC runs queued experiments in a temporary copy of the checkout, deleted afterwards: the run,
    its logged model and the registered version must land in the checkout's own mlflow.db and
    mlruns/, readable after the copy is gone."""
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    assert run([*git, "add", "-A"], project, {}).returncode == 0  # DVC queues from a commit
    assert run([*git, "commit", "-qm", "fetched"], project, {}).returncode == 0
    queued = run([*dvc, "exp", "run", "--queue", "--name", "queued", "-S", "train.epochs=1"], project, {})
    assert queued.returncode == 0, queued.stdout + queued.stderr
    started = subprocess.run(
        [*dvc, "queue", "start", "--jobs", "1"],
        cwd=project,
        timeout=300,
        env={**os.environ, "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # its worker keeps pipes open
    assert started.returncode == 0
    deadline = time.monotonic() + QUEUE_DEADLINE
    while True:
        status = run([*dvc, "queue", "status"], project, {}).stdout
        line = next((row for row in status.splitlines() if "queued" in row.split()[:2]), "")
        if "Success" in line or "Failed" in line:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    logs = run([*dvc, "queue", "logs", "queued"], project, {}).stdout
    assert "Success" in line, logs[-5000:]
    run([*dvc, "queue", "stop", "--kill"], project, {})
    client = store(project)
    [trained] = runs_of(client)
    assert trained.info.status == "FINISHED" and trained.data.params["train.epochs"] == "1"
    [version] = client.search_model_versions()
    assert version.run_id == trained.info.run_id
    artifacts = Path(trained.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(project / "mlruns") and any(artifacts.iterdir())
    assert not any((project / ".dvc" / "tmp" / "exps").glob("*/mlflow.db"))
