"""A tracking-server outage in the middle of a training: the DVC train stage against a real `mlflow
server`, stopped after the first checkpoint (while the stage is stopped at a file event) and started
again later on the same port and store. Training goes on and checkpoints meanwhile, the log holds one
warning, and every step is logged once: when the server is back, or by the resume after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ddpm import checkpoint as ckpt
from flows.outbox import UNSENT_FILE
from tests import servers
from tests.faults import EXPERIMENT, FIRST_EPOCH_DONE, set_params, start_frozen
from tests.freeze import FREEZE_DEADLINE, Freezer
from tests.test_pipeline import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 5
STEPS_PER_EPOCH = 4  # 64 images in batches of 16
STAGE = [sys.executable, "-m", "flows.stages", "train"]
UNREACHABLE = "unreachable (Connection refused); training continues"


def train_through_an_outage(project: Path, tmp: Path, freezer: Freezer) -> tuple[subprocess.Popen, Path, str]:
    """Start the train stage, stop the server as epoch 2's checkpoint is written, let the training run
    to its last checkpoint with the server down; returns the stage (waiting for the server), its log
    and the server's URI."""
    set_params(project, train={"epochs": EPOCHS, "checkpoint_minutes": 0})
    server, uri = servers.start_mlflow(tmp)
    log = tmp / "stage.log"
    stage, pid = start_frozen(STAGE, project, {"MLFLOW_TRACKING_URI": uri}, log, freezer, FIRST_EPOCH_DONE)
    servers.stop(server)
    os.kill(pid, signal.SIGCONT)
    last = project / "checkpoints" / f"epoch_{EPOCHS:04d}.ckpt"
    deadline = time.monotonic() + FREEZE_DEADLINE
    while not last.is_file():  # the file event: every epoch trained and checkpointed without the server
        assert stage.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    assert stage.poll() is None, log.read_text()[-3000:]  # waiting for the server, not failed
    assert ckpt.load_checkpoint(last).global_step == EPOCHS * STEPS_PER_EPOCH
    unsent = json.loads((project / "checkpoints" / UNSENT_FILE).read_text())["records"]
    steps = sorted(r["step"] for r in unsent if r["scope"] == "step")
    epochs = sorted(r["step"] for r in unsent if r["scope"] == "epoch")
    # steps 1-8 were logged before the kill; epoch 5's metrics come after its checkpoint (it carries them)
    assert (steps, epochs) == (list(range(9, EPOCHS * STEPS_PER_EPOCH + 1)), [2, 3, 4])
    output = log.read_text()
    assert output.count(UNREACHABLE) == 1 and "Retrying" not in output, output[-3000:]
    return stage, log, uri


def assert_logged_once(uri: str) -> str:
    """One FINISHED run with every step, epoch and grid once; returns its id."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [trained] = client.search_runs([experiment.experiment_id])
    run_id = trained.info.run_id
    assert trained.info.status == "FINISHED" and "failure" not in trained.data.tags
    for key in ("train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(
            range(1, EPOCHS * STEPS_PER_EPOCH + 1)
        ), key
    for key in ("epoch", "train_loss_epoch", "epoch_seconds", "images_per_second"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, EPOCHS + 1)), key
    images = client.list_artifacts(run_id, "images")
    assert sorted(int(a.path.split("+")[2]) for a in images if a.path.endswith(".png")) == list(range(1, EPOCHS + 1))
    return run_id


def test_a_training_goes_on_while_the_tracking_server_is_down_and_logs_each_step_once_when_it_is_back(
    project, tmp_path, freezer
):
    stage, log, uri = train_through_an_outage(project, tmp_path, freezer)
    port = int(uri.rsplit(":", 1)[1])
    server, _ = servers.start_mlflow(tmp_path, port)  # the same store, on the same port
    try:
        assert stage.wait(timeout=FREEZE_DEADLINE) == 0, log.read_text()[-3000:]
        assert_logged_once(uri)
    finally:
        servers.stop(server)
    output = log.read_text()
    assert output.count(UNREACHABLE) == 1 and "is back" in output and "Retrying" not in output, output[-3000:]
    assert not (project / "checkpoints" / UNSENT_FILE).exists()


def test_a_crash_during_the_outage_logs_each_step_once_on_resume(project, tmp_path, freezer):
    stage, _, uri = train_through_an_outage(project, tmp_path, freezer)
    os.killpg(stage.pid, signal.SIGKILL)  # the crash: what was not logged is in the checkpoint directory
    stage.wait()
    port = int(uri.rsplit(":", 1)[1])
    server, _ = servers.start_mlflow(tmp_path, port)
    try:
        rerun = run(STAGE, project, {"MLFLOW_TRACKING_URI": uri})
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "logging 36 metrics an earlier attempt could not log" in rerun.stderr, rerun.stderr[-3000:]
        run_id = assert_logged_once(uri)
        assert MlflowClient(uri).get_run(run_id).data.tags["resumed"] == "1"
    finally:
        servers.stop(server)
