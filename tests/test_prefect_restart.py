"""A Prefect server restart in the middle of a deployment's training (real server, process worker,
the deployment's concurrency limit and its lease): the flow run keeps training and completes, and
each step is logged to MLflow once."""

from __future__ import annotations

import os
import signal

import pytest

from tests import servers
from tests.faults import FIRST_EPOCH_DONE, deploy_with_worker, runs_of, set_params, store
from tests.test_faults_deployment import trigger, wait_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 6  # 5 epochs left when the server goes down: it trains while the server restarts
STEPS = EPOCHS * 4  # 64 images in batches of 16


def test_a_prefect_server_restart_mid_training_leaves_the_flow_run_training_to_completion(project, tmp_path, freezer):
    set_params(project, train={"epochs": EPOCHS})
    server, env = servers.start_prefect(tmp_path)
    worker = None
    try:
        worker = deploy_with_worker(project, env, freezer, tmp_path / "worker.log")
        freezer.arm(FIRST_EPOCH_DONE)
        try:
            flow_run_id = trigger(project, env)
            pid = freezer.wait_frozen()  # the flow-run process, as it writes epoch 2's checkpoint
        finally:
            freezer.disarm()
        servers.stop(server)  # down while the flow run holds its concurrency slot
        os.kill(pid, signal.SIGCONT)  # it trains on with the server down
        port = int(env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
        server, _ = servers.start_prefect(tmp_path, port)  # the same database, on the same port
        assert wait_final(flow_run_id, project, env) == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]
    finally:
        if worker is not None:
            servers.stop(worker)
        servers.stop(server)
    client = store(project)
    [trained] = runs_of(client)
    assert trained.info.status == "FINISHED" and trained.data.tags["prefect_flow_run_id"] == flow_run_id
    assert "resumed" not in trained.data.tags  # one attempt: the flow run never stopped
    for key in ("train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(trained.info.run_id, key)) == list(
            range(1, STEPS + 1)
        ), key
    [version] = client.search_model_versions()
    assert version.run_id == trained.info.run_id
