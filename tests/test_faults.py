"""Faults lose nothing: kill -9, NaN loss, damaged data, a dead tracking server, bad params and a
second pipeline, each injected into the real pipeline (real dvc, real MLflow store, real Prefect) in
a temporary project. docs/reliability.md maps each fault to its test here."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from ddpm import checkpoint as ckpt
from ddpm.callbacks import Callback
from ddpm.data import DEBIAN_DATASET_DIR, FILES
from ddpm.train import fit
from flows import pipeline, stages
from flows.config import load_params
from flows.data import fetch_data
from flows.workspace import LOCK_FILE
from tests import servers
from tests.freeze import Freezer
from tests.test_pipeline import make_project, run

pytestmark = pytest.mark.integration

EPOCHS = 3  # killed after the first, so the rerun has epochs left to resume
QUEUED_SECONDS = 30  # a queued deployment run must stay queued this long while the first one runs
STEPS = EPOCHS * 4  # TINY trains 64 images in batches of 16
EXPERIMENT = "ddpm-fashion-mnist"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A project with its data fetched through DVC once; tests work on copies."""
    tmp = tmp_path_factory.mktemp("faults")
    repo = make_project(tmp)
    fetch_data(repo, "data/fashion-mnist", (DEBIAN_DATASET_DIR,))
    return repo


@pytest.fixture
def project(template, tmp_path) -> Path:
    repo = tmp_path / "project"
    shutil.copytree(template, repo, symlinks=True)
    return repo


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def store(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


FIRST_EPOCH_DONE = "checkpoints/.epoch_0002"  # epoch 2's checkpoint being written: epoch 1's is on disk


def start(args: list[str], repo: Path, env: dict, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **env,
    }
    return subprocess.Popen(
        args, cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_at(args: list[str], repo: Path, env: dict, log: Path, freezer: Freezer, pattern: str) -> None:
    """Start `args` in its own process group and SIGKILL the whole group when one of its processes
    opens a file matching `pattern` (it stops there first: no race with a fast training)."""
    freezer.arm(pattern)
    process = start(args, repo, {**env, **freezer.env}, log)
    try:
        freezer.wait_frozen(alive=lambda: process.poll() is None)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{log.read_text()[-3000:]}") from None
    finally:
        freezer.disarm()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def kill_after_first_epoch(args: list[str], repo: Path, env: dict, log: Path, freezer: Freezer) -> None:
    kill_at(args, repo, env, log, freezer, FIRST_EPOCH_DONE)
    left = ckpt.list_checkpoints(repo / "checkpoints")
    assert [p.name for p in left] == ["epoch_0001.ckpt"], left


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, global_step, metrics):
        self.losses.append(metrics["train_loss"])


def uninterrupted(repo: Path, tmp: Path) -> tuple[list[float], ckpt.Checkpoint]:
    """The same training, same seed, in one go: per-step losses and the final checkpoint."""
    config, _ = load_params(
        repo / "params.yaml",
        {"data.root": str(repo / "data" / "fashion-mnist"), "train.checkpoint_dir": str(tmp / "uninterrupted")},
    )
    losses = Losses()
    result = fit(config, [losses], progress=False)
    return losses.losses, ckpt.load_checkpoint(result.checkpoint)


def assert_resumed_exactly(repo: Path, tmp: Path, client: MlflowClient) -> str:
    """One FINISHED run holding each step and epoch once, with the losses and final weights of an
    uninterrupted training; returns its id."""
    runs = runs_of(client)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run_ = runs[0]
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED" and "failure" not in run_.data.tags and run_.data.tags["resumed"] == "1"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(1, STEPS + 1))
    for key in ("train_loss_epoch", "epoch_seconds", "images_per_second"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, EPOCHS + 1)), key
    grids = sorted(
        int(a.path.split("+")[2]) for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")
    )
    assert grids == list(range(1, EPOCHS + 1))
    rows = (repo / "outputs" / "loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, STEPS + 1))

    losses, reference = uninterrupted(repo, tmp)
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    np.testing.assert_allclose(logged, losses, rtol=1e-4, atol=1e-6)
    latest = ckpt.latest_checkpoint(repo / "checkpoints")
    assert latest is not None
    final = ckpt.load_checkpoint(latest)
    assert final.epoch == EPOCHS and final.global_step == reference.global_step == STEPS
    for name in reference.params:
        np.testing.assert_allclose(
            final.params[name].asnumpy(), reference.params[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )
    return run_id


@pytest.mark.slow
def test_kill_9_during_dvc_repro_then_rerun_resumes_in_the_same_run(project, tmp_path, freezer):
    set_params(project, train={"epochs": EPOCHS})
    repro = [sys.executable, "-m", "dvc", "repro", "train"]
    kill_after_first_epoch(repro, project, {}, tmp_path / "killed.log", freezer)
    client = store(project)
    assert [r.info.status for r in runs_of(client)] == ["RUNNING"]  # what kill -9 leaves behind

    rerun = run(repro, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "left RUNNING by a process that died" in rerun.stderr and "resuming from" in rerun.stderr
    assert_resumed_exactly(project, tmp_path, client)


STOP_STEP = 6  # SIGTERM lands in this step: 2 of the 4 steps of epoch 2, so the stop checkpoints mid-epoch
LOSS_CSV_OPENS = 1 + STOP_STEP  # loss.csv is opened once at the start, then once per step to append its row


@pytest.mark.slow
def test_sigterm_to_the_train_stage_checkpoints_at_the_step_ends_the_run_killed_and_a_rerun_resumes(
    project, tmp_path, freezer
):
    """SIGTERM reaches `python -m flows.stages train` while it is stopped in step 6 (at its append to
    loss.csv), so it cannot finish the epoch first; continued, it ends that step, checkpoints there,
    ends its MLflow run KILLED, frees the workspace and exits 143; the same command resumes at step 6."""
    set_params(project, train={"epochs": EPOCHS, "checkpoint_minutes": 0})  # no timed checkpoint: the stop's own
    stage = [sys.executable, "-m", "flows.stages", "train"]
    freezer.arm("outputs/loss.csv", LOSS_CSV_OPENS)
    log = tmp_path / "stopped.log"
    process = start(stage, project, freezer.env, log)
    try:
        pid = freezer.wait_frozen(alive=lambda: process.poll() is None)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{log.read_text()[-3000:]}") from None
    finally:
        freezer.disarm()
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
    assert assert_resumed_exactly(project, tmp_path, client) == killed.info.run_id


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
    set_params(project, train={"checkpoint_dir": "runs/ours"})
    beside = project / "runs" / "notes.txt"
    beside.parent.mkdir()
    beside.write_text("mine")
    monkeypatch.chdir(project)
    for _ in range(2):
        assert stages.main(["train"]) == 0, caplog.text
    assert beside.read_text() == "mine" and (project / "params.yaml").is_file()
    assert len(runs_of(store(project))) == 2 and "holds a finished training" in caplog.text

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


def prefect(*args: str, repo: Path, env: dict) -> subprocess.CompletedProcess:
    return run([str(servers.BIN / "prefect"), *args], repo, env)


def flow_run_state(flow_run_id: str, repo: Path, env: dict) -> str:
    shown = prefect("flow-run", "inspect", flow_run_id, "-o", "json", repo=repo, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return json.loads(shown.stdout)["state"]["type"]


def dead_holder(repo: Path) -> dict:
    """The record a killed pipeline leaves in the workspace lock file."""
    return json.loads((repo / LOCK_FILE).read_text())


@pytest.mark.slow
def test_kill_9_of_the_main_job_then_rerun_resumes_and_marks_the_dead_flow_run_crashed(project, tmp_path, freezer):
    set_params(project, train={"epochs": EPOCHS})
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}  # the ephemeral API's database survives the kill
    job = [sys.executable, "-m", "flows.pipeline"]
    kill_after_first_epoch(job, project, env, tmp_path / "killed.log", freezer)
    killed_flow_run = dead_holder(project)["flow_run_id"]
    assert flow_run_state(killed_flow_run, project, env) == "RUNNING"  # what kill -9 leaves behind

    rerun = run(job, project, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert f"marked Prefect flow run {killed_flow_run} Crashed" in rerun.stderr
    assert flow_run_state(killed_flow_run, project, env) == "CRASHED"
    run_id = assert_resumed_exactly(project, tmp_path, store(project))
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id
    [version] = store(project).search_model_versions()
    assert version.run_id == run_id and str(version.version) == result["version"]


NAN_PIPELINE = """
import sys
import ddpm.train

build = ddpm.train.build_unet

def poisoned(*args, **kwargs):
    net = build(*args, **kwargs)
    weight = net.trainable_params()[0]
    weight.set_data(weight.value() * float("nan"))
    return net

ddpm.train.build_unet = poisoned
from flows.pipeline import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_nan_loss_through_the_prefect_flow_fails_it_and_registers_nothing(project, tmp_path):
    result = run([sys.executable, "-c", NAN_PIPELINE], project, {"PREFECT_HOME": str(tmp_path / "prefect-home")})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loss is nan at epoch 1, step 1" in result.stderr and "Finished in state Failed" in result.stderr
    client = store(project)
    [failed] = runs_of(client)
    assert failed.info.status == "FAILED" and "loss is nan" in failed.data.tags["failure"]
    assert client.search_model_versions() == [] and not (project / "outputs" / "registered.json").exists()


@pytest.mark.slow
def test_kill_9_during_evaluate_then_rerun_scores_and_registers_the_same_training(project, tmp_path, freezer):
    """A failure after training costs the evaluation, not the training: the rerun of the main job
    takes up the finished training (one MLflow run, no new epoch) and registers it once."""
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    job = [sys.executable, "-m", "flows.pipeline"]
    kill_at(job, project, env, tmp_path / "killed.log", freezer, "outputs/.metrics.json")  # scored, not recorded
    client = store(project)
    [trained] = runs_of(client)
    assert trained.info.status == "FINISHED" and client.search_model_versions() == []
    steps_before = len(client.get_metric_history(trained.info.run_id, "train_loss"))

    rerun = run(job, project, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert "finished training" in rerun.stderr and "continuing with it" in rerun.stderr
    [again] = runs_of(client)
    assert again.info.run_id == trained.info.run_id and "fid" in again.data.metrics
    assert len(client.get_metric_history(trained.info.run_id, "train_loss")) == steps_before  # not retrained
    [version] = client.search_model_versions()
    assert version.run_id == trained.info.run_id
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["version"] == str(version.version)


PUBLISH_FAILS = """
import sys
import flows.pipeline

def publish_fails(*args, **kwargs):
    raise ConnectionError("simulated: the Prefect API refused the summary artifact")

flows.pipeline.publish_summary = publish_fails
sys.exit(flows.pipeline.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failure_after_register_then_rerun_publishes_the_same_training_without_retraining(project, tmp_path):
    """The flow fails after it registered the model (in publish_summary: simulated): its rerun takes up
    the registered training (no step trained again, not scored again, still one version) and
    publishes; the run after that one, which went to its end, trains anew."""
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    failed = run([sys.executable, "-c", PUBLISH_FAILS], project, env)
    assert failed.returncode != 0 and "simulated: the Prefect API refused" in failed.stderr, failed.stderr[-3000:]
    client = store(project)
    [trained] = runs_of(client)
    [version] = client.search_model_versions()
    assert trained.info.status == "FINISHED" and version.run_id == trained.info.run_id
    run_id = trained.info.run_id
    steps_before = len(client.get_metric_history(run_id, "train_loss"))

    rerun = run([sys.executable, "-m", "flows.pipeline"], project, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert "no run of the flow took to its end; continuing with it" in rerun.stderr
    assert [r.info.run_id for r in runs_of(client)] == [run_id]
    assert len(client.get_metric_history(run_id, "train_loss")) == steps_before  # not trained again
    assert len(client.get_metric_history(run_id, "fid")) == 1  # not scored again
    [again] = client.search_model_versions()
    assert again.version == version.version
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["version"] == str(version.version)
    assert not (project / "checkpoints" / "flow_unfinished").exists()

    fresh = run([sys.executable, "-m", "flows.pipeline"], project, env)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-5000:]
    assert "starting a new one" in fresh.stderr and len(runs_of(client)) == 2


QUEUE_DEADLINE = 1200  # seconds for DVC's queue worker to run one tiny experiment


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


@pytest.fixture(scope="module")
def deployment(template, tmp_path_factory, freezer):
    """The project deployed on a real Prefect server with a process worker, tracking to a real MLflow server."""
    tmp = tmp_path_factory.mktemp("deployment")
    repo = tmp / "project"
    shutil.copytree(template, repo, symlinks=True)
    set_params(repo, train={"epochs": EPOCHS})
    mlflow_server, uri = servers.start_mlflow(tmp)
    prefect_server, env = servers.start_prefect(tmp)
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    with open(tmp / "worker.log", "w") as worker_log:
        worker = None
        try:
            for args in (
                ["work-pool", "create", "ddpm-process", "--type", "process"],
                ["--no-prompt", "deploy", "--all"],
            ):
                result = prefect(*args, repo=repo, env=env)
                assert result.returncode == 0, result.stdout + result.stderr
            worker = subprocess.Popen(
                [str(servers.BIN / "prefect"), "worker", "start", "--pool", "ddpm-process"],
                cwd=repo,
                env={
                    **os.environ,
                    **env,
                    **freezer.env,  # its flow runs inherit the freezer
                    "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
                },
                stdout=worker_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            yield repo, env, MlflowClient(uri), tmp, freezer
        finally:
            if worker is not None:
                servers.stop(worker)
            servers.stop(prefect_server)
            servers.stop(mlflow_server)


def trigger(repo: Path, env: dict, overrides: dict | None = None) -> str:
    """Start a run of the deployment; returns its flow run id."""
    args = ["deployment", "run", "ddpm-pipeline/default"]
    if overrides:
        args += ["--param", f"overrides={json.dumps(overrides)}"]
    result = prefect(*args, repo=repo, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return next(line.split()[-1] for line in result.stdout.splitlines() if "UUID:" in line)


def wait_for_log(flow_run_id: str, text: str, repo: Path, env: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in prefect("flow-run", "logs", flow_run_id, repo=repo, env=env).stdout:
        assert time.monotonic() < deadline, f"flow run {flow_run_id} never logged {text!r} in {timeout} s"
        time.sleep(2)


def wait_final(flow_run_id: str, repo: Path, env: dict, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while (state := flow_run_state(flow_run_id, repo, env)) not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {state} after {timeout} s"
        time.sleep(2)
    return state


def wait_for_holder(repo: Path, flow_run_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            holder = dead_holder(repo)
            if holder["flow_run_id"] == flow_run_id:
                return holder
        except (FileNotFoundError, json.JSONDecodeError):
            pass  # nobody holds it yet
        assert time.monotonic() < deadline, f"flow run {flow_run_id} never took the workspace"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_of_a_deployment_flow_run_then_rerun_resumes_in_the_same_run(deployment):
    repo, env, client, tmp, freezer = deployment
    freezer.arm(FIRST_EPOCH_DONE)
    try:
        killed = trigger(repo, env)
        pid = freezer.wait_frozen()  # the worker's flow-run process, stopped after epoch 1
    finally:
        freezer.disarm()
    os.kill(pid, signal.SIGKILL)
    assert wait_final(killed, repo, env, timeout=120) == "CRASHED"
    assert [p.name for p in ckpt.list_checkpoints(repo / "checkpoints")] == ["epoch_0001.ckpt"]

    rerun = trigger(repo, env)
    assert wait_final(rerun, repo, env) == "COMPLETED", (tmp / "worker.log").read_text()[-5000:]
    run_id = assert_resumed_exactly(repo, tmp, client)
    assert client.get_run(run_id).data.tags["prefect_flow_run_id"] == rerun
    [version] = client.search_model_versions("name='ddpm-fashion-mnist'")
    assert version.run_id == run_id


@pytest.mark.slow
def test_a_second_deployment_run_waits_on_the_server_while_the_first_runs(deployment):
    """prefect.yaml's concurrency limit: the server queues the second run (no worker, no process, no
    lock wait that could time out) and starts it when the first ends."""
    repo, env, client, tmp, _ = deployment
    first = trigger(repo, env, {"train.epochs": 2})
    holder = wait_for_holder(repo, first)
    os.kill(holder["pid"], signal.SIGSTOP)  # the first holds its slot as long as it likes
    try:
        second = trigger(repo, env, {"train.epochs": 1, "workspace.lock_timeout": 1})
        time.sleep(QUEUED_SECONDS)  # long enough for a worker to have started it, were it not queued
        shown = json.loads(prefect("flow-run", "inspect", second, "-o", "json", repo=repo, env=env).stdout)
        assert (shown["state"]["type"], shown["state"]["name"]) == ("SCHEDULED", "AwaitingConcurrencySlot")
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    assert wait_final(first, repo, env) == "COMPLETED"
    assert wait_final(second, repo, env) == "COMPLETED", (tmp / "worker.log").read_text()[-5000:]
    runs = {
        r.data.tags.get("prefect_flow_run_id"): r
        for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    }
    a, b = runs[first], runs[second]
    assert a.data.params["train.epochs"] == "2" and b.data.params["train.epochs"] == "1"
    assert a.info.status == b.info.status == "FINISHED" and b.info.start_time > a.info.end_time  # one at a time
    versions = {v.run_id: v.version for v in client.search_model_versions("name='ddpm-fashion-mnist'")}
    candidate = client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate")
    assert a.info.run_id in versions and candidate.run_id == b.info.run_id  # each registered its own model
    registered = json.loads((repo / "outputs" / "registered.json").read_text())
    assert registered["run_id"] == b.info.run_id and registered["version"] == versions[b.info.run_id]
