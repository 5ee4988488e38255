"""A deployed flow: a real Prefect server, a process worker and a real MLflow server; kill -9 of a flow
run, and a second run queued on the concurrency limit, which then runs to Completed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ddpm import checkpoint as ckpt
from tests import servers
from tests.faults import (
    EPOCHS,
    EXPERIMENT,
    FIRST_EPOCH_DONE,
    assert_resumed_exactly,
    dead_holder,
    deploy_with_worker,
    flow_run,
    flow_run_state,
    prefect,
    set_params,
)

pytestmark = pytest.mark.integration

QUEUED_SECONDS = 10  # a queued deployment run must stay queued this long while the first one runs: five of
# the worker's polls (tests/faults.py `deploy_with_worker`)


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
    worker = None
    try:
        worker = deploy_with_worker(repo, env, freezer, tmp / "worker.log")
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
def test_kill_9_of_a_deployment_flow_run_then_rerun_resumes_in_the_same_run(deployment, references):
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
    run_id = assert_resumed_exactly(repo, references, client)
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
        shown = flow_run(second, repo, env)
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
