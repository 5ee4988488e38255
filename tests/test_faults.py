"""Faults lose nothing: kill -9, NaN loss, damaged data, a dead tracking server, bad params and a
second pipeline, each injected into the real pipeline (real dvc, real MLflow store, real Prefect) in
a temporary project. docs/reliability.md maps each fault to its test here."""
from __future__ import annotations

import json
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
from ddpm.data import DEBIAN_DATASET_DIR, FILES
from ddpm.train import Callback, fit
from flows import pipeline, stages
from flows.config import load_params
from flows.data import fetch_data
from flows.workspace import LOCK_FILE
from tests import servers
from tests.test_pipeline import make_project, run

pytestmark = pytest.mark.integration

EPOCHS = 3  # killed after the first, so the rerun has epochs left to resume
STEPS = EPOCHS * 4  # TINY trains 64 images in batches of 16
EXPERIMENT = "ddpm-fashion-mnist"
KILL_DEADLINE = 600  # seconds to wait for the first checkpoint before giving up


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


def kill_after_first_epoch(args: list[str], repo: Path, env: dict, log: Path) -> None:
    """Start `args` in its own process group and SIGKILL the whole group once epoch 1 is checkpointed."""
    env = {**os.environ, "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}
    process = subprocess.Popen(args, cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    first = repo / "checkpoints" / "epoch_0001.ckpt"
    deadline = time.monotonic() + KILL_DEADLINE
    while not first.exists():
        assert process.poll() is None, f"exited with {process.returncode} before epoch 1:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no epoch 1 checkpoint in {KILL_DEADLINE} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    left = ckpt.list_checkpoints(repo / "checkpoints")
    assert left and left[-1].name != f"epoch_{EPOCHS:04d}.ckpt", "killed too late: training had finished"


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, global_step, metrics):
        self.losses.append(metrics["train_loss"])


def uninterrupted(repo: Path, tmp: Path) -> tuple[list[float], ckpt.Checkpoint]:
    """The same training, same seed, in one go: per-step losses and the final checkpoint."""
    config, _ = load_params(repo / "params.yaml", [f"data.root={repo / 'data' / 'fashion-mnist'}",
                                                   f"train.checkpoint_dir={tmp / 'uninterrupted'}"])
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
    grids = sorted(int(a.path.split("+")[2]) for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert grids == list(range(1, EPOCHS + 1))
    rows = (repo / "outputs" / "loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, STEPS + 1))

    losses, reference = uninterrupted(repo, tmp)
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    np.testing.assert_allclose(logged, losses, rtol=1e-4, atol=1e-6)
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(repo / "checkpoints"))
    assert final.epoch == EPOCHS and final.global_step == reference.global_step == STEPS
    for name in reference.params:
        np.testing.assert_allclose(final.params[name].asnumpy(), reference.params[name].asnumpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    return run_id


def test_kill_9_during_dvc_repro_then_rerun_resumes_in_the_same_run(project, tmp_path):
    set_params(project, train={"epochs": EPOCHS})
    repro = [sys.executable, "-m", "dvc", "repro", "train"]
    kill_after_first_epoch(repro, project, {}, tmp_path / "killed.log")
    client = store(project)
    assert [r.info.status for r in runs_of(client)] == ["RUNNING"]  # what kill -9 leaves behind

    rerun = run(repro, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "left RUNNING by a process that died" in rerun.stderr and "resuming from" in rerun.stderr
    assert_resumed_exactly(project, tmp_path, client)


def test_nan_loss_fails_the_run_with_the_reason_and_registers_nothing(project, monkeypatch, mlflow_state, caplog):
    import ddpm.train

    build = ddpm.train.build_unet

    def poisoned(model_config):  # a NaN weight: the loss is NaN from the first step
        net = build(model_config)
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
    assert pipeline.main(["--set", "train.lr=fast", "--set", "train.bogus=1", "--set", "model.dim=3",
                          "--set", "workspace.lock_timeout=-1", "--set", "epochs"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    for fragment in ("train.lr: expected float, got 'fast'", "train.bogus: unknown key", "model.dim: must be even",
                     "workspace.lock_timeout: must be >= 0", "--set 'epochs': expected section.key=value"):
        assert fragment in error, fragment
    assert "Beginning flow run" not in caplog.text  # Prefect never started
    assert not (project / "mlflow.db").exists() and not (project / "checkpoints").exists()


def test_unreachable_tracking_server_fails_in_seconds_before_prefect_or_training(project, monkeypatch, mlflow_state,
                                                                                 caplog):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{servers.free_port()}")
    started = time.monotonic()
    assert pipeline.main([]) == 2
    assert time.monotonic() - started < 5
    assert "unreachable" in caplog.text and "mlflow server" in caplog.text
    assert "Beginning flow run" not in caplog.text and not (project / "checkpoints").exists()


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
def test_kill_9_of_the_main_job_then_rerun_resumes_and_marks_the_dead_flow_run_crashed(project, tmp_path):
    set_params(project, train={"epochs": EPOCHS})
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}  # the ephemeral API's database survives the kill
    job = [sys.executable, "-m", "flows.pipeline"]
    kill_after_first_epoch(job, project, env, tmp_path / "killed.log")
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

def poisoned(model_config):
    net = build(model_config)
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


@pytest.fixture(scope="module")
def deployment(template, tmp_path_factory):
    """The project deployed on a real Prefect server with a process worker, tracking to a real MLflow server."""
    tmp = tmp_path_factory.mktemp("deployment")
    repo = tmp / "project"
    shutil.copytree(template, repo, symlinks=True)
    set_params(repo, train={"epochs": EPOCHS})
    mlflow_server, uri = servers.start_mlflow(tmp)
    prefect_server, env = servers.start_prefect(tmp)
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    worker = None
    try:
        for args in (["work-pool", "create", "ddpm-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            result = prefect(*args, repo=repo, env=env)
            assert result.returncode == 0, result.stdout + result.stderr
        worker = subprocess.Popen([str(servers.BIN / "prefect"), "worker", "start", "--pool", "ddpm-process"],
                                  cwd=repo, env={**os.environ, **env, "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}"},
                                  stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        yield repo, env, MlflowClient(uri), tmp
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
    repo, env, client, tmp = deployment
    killed = trigger(repo, env)
    holder = wait_for_holder(repo, killed)
    first = repo / "checkpoints" / "epoch_0001.ckpt"
    deadline = time.monotonic() + KILL_DEADLINE
    while not first.exists():
        assert time.monotonic() < deadline, f"no epoch 1 checkpoint in {KILL_DEADLINE} s"
        time.sleep(0.05)
    os.kill(holder["pid"], signal.SIGKILL)  # the worker's flow-run process
    assert wait_final(killed, repo, env, timeout=120) == "CRASHED"
    assert ckpt.latest_checkpoint(repo / "checkpoints").name != f"epoch_{EPOCHS:04d}.ckpt", "killed too late"

    rerun = trigger(repo, env)
    assert wait_final(rerun, repo, env) == "COMPLETED", (tmp / "worker.log").read_text()[-5000:]
    run_id = assert_resumed_exactly(repo, tmp, client)
    assert client.get_run(run_id).data.tags["prefect_flow_run_id"] == rerun
    [version] = client.search_model_versions("name='ddpm-fashion-mnist'")
    assert version.run_id == run_id



@pytest.mark.slow
def test_concurrent_deployment_runs_wait_or_are_refused_and_clobber_nothing(deployment):
    repo, env, client, tmp = deployment
    first = trigger(repo, env, {"train.epochs": 2})
    holder = wait_for_holder(repo, first)
    # Freeze the first run while it holds the workspace, so that the others meet it there however
    # fast it would otherwise train (the tiny model finished before a second run started).
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        refused = trigger(repo, env, {"workspace.lock_timeout": 1})
        waiting = trigger(repo, env, {"train.epochs": 1})
        assert wait_final(refused, repo, env) == "FAILED"
        wait_for_log(waiting, "waiting up to", repo, env)
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    logs = prefect("flow-run", "logs", refused, repo=repo, env=env).stdout
    assert "is in use by another pipeline" in logs and first in logs and "workspace.lock_timeout" in logs
    assert wait_final(first, repo, env) == "COMPLETED" and wait_final(waiting, repo, env) == "COMPLETED"
    waited = prefect("flow-run", "logs", waiting, repo=repo, env=env).stdout
    assert "waiting up to 600 s" in waited and first in waited

    runs = {r.data.tags.get("prefect_flow_run_id"): r for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id])}
    assert refused not in runs  # refused before it created anything
    a, b = runs[first], runs[waiting]
    assert a.data.params["train.epochs"] == "2" and b.data.params["train.epochs"] == "1"
    assert a.info.status == b.info.status == "FINISHED" and b.info.start_time > a.info.end_time  # one at a time
    versions = {v.run_id: v.version for v in client.search_model_versions("name='ddpm-fashion-mnist'")}
    candidate = client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate")
    assert a.info.run_id in versions and candidate.run_id == b.info.run_id  # each registered its own model
    registered = json.loads((repo / "outputs" / "registered.json").read_text())
    assert registered["run_id"] == b.info.run_id and registered["version"] == versions[b.info.run_id]
