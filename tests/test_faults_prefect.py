"""Faults in the Prefect flow run as the main job (ephemeral API): kill -9 in training, NaN loss, and
a kill during evaluation followed by a failure after registration, each in a temporary project
(tests/faults.py)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

import flows.steps.train
from ddpm.files import partial_path
from flows.config import load_params
from flows.steps import Trained
from flows.tracking import connect
from tests.faults import (
    EPOCHS,
    assert_resumed_exactly,
    dead_holder,
    flow_run_state,
    kill_after_first_epoch,
    kill_at,
    runs_of,
    set_params,
    store,
)
from tests.test_pipeline import POSTHOC, run

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_kill_9_of_the_main_job_then_rerun_resumes_and_marks_the_dead_flow_run_crashed(
    project, tmp_path, freezer, references
):
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
    run_id = assert_resumed_exactly(project, references, store(project))
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


PUBLISH_FAILS = """
import sys
import flows.pipeline

def publish_fails(*args, **kwargs):
    raise ConnectionError("simulated: the Prefect API refused the summary artifact")

flows.pipeline.publish_summary = publish_fails
sys.exit(flows.pipeline.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_evaluate_then_a_failure_after_register_then_reruns_finish_the_same_training(
    project, tmp_path, freezer, monkeypatch, caplog, mlflow_state
):
    """A failure after training costs what came after it, never the training. The main job killed while
    it evaluates; its rerun takes up the finished training (one MLflow run, no step trained again),
    scores and registers it, then fails publishing the summary (simulated); the next rerun takes up
    the registered training (not trained or scored again, still one version) and publishes. The flow's
    train step after that run, which went to its end, trains anew."""
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    job = [sys.executable, "-m", "flows.pipeline"]
    metrics_written = str(partial_path("outputs/metrics.json"))  # scored, not recorded yet
    kill_at(job, project, env, tmp_path / "killed.log", freezer, metrics_written)
    client = store(project)
    [trained] = runs_of(client)
    run_id = trained.info.run_id
    assert trained.info.status == "FINISHED" and client.search_model_versions() == []
    steps = len(client.get_metric_history(run_id, "train_loss"))

    failed = run([sys.executable, "-c", PUBLISH_FAILS], project, env)
    assert failed.returncode != 0 and "simulated: the Prefect API refused" in failed.stderr, failed.stderr[-3000:]
    assert "finished training" in failed.stderr and "continuing with it" in failed.stderr
    [again] = runs_of(client)
    assert again.info.run_id == run_id and again.info.status == "FINISHED" and "fid" in again.data.metrics
    assert len(client.get_metric_history(run_id, "train_loss")) == steps  # not trained again
    [version] = client.search_model_versions()
    assert version.run_id == run_id

    rerun = run(job, project, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert "no run of the flow took to its end; continuing with it" in rerun.stderr
    assert [r.info.run_id for r in runs_of(client)] == [run_id]
    assert len(client.get_metric_history(run_id, "train_loss")) == steps  # not trained again
    assert len(client.get_metric_history(run_id, "fid")) == 1  # not scored again
    [same] = client.search_model_versions()
    assert same.version == version.version
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["version"] == str(version.version)
    assert not (project / "checkpoints" / "flow_unfinished").exists()

    # The flow's train step once more, in-process on the same checkout and store (a whole pipeline more cost
    # 1.5 min): the flow went to its end, so it trains anew.
    monkeypatch.chdir(project)
    config, pipeline = load_params(project / "params.yaml", repo=project)
    connect(pipeline)
    with caplog.at_level(logging.INFO, logger=flows.steps.train.__name__):
        fresh = flows.steps.train.train(config, pipeline, project, progress=False, continue_finished=True)
    assert "starting a new one" in caplog.text and len(runs_of(client)) == 2 and fresh.run_id != run_id


def test_the_flow_takes_up_a_finished_training_only_if_it_chose_among_the_same_posthoc_lengths(
    project, monkeypatch, caplog, mlflow_state
):
    """A finished training that no flow run took to its end is taken up by the next (no retraining), but
    not once train.posthoc_lengths changed: its weights were chosen among the old lengths, and the
    new ones are what the params ask for. It then trains anew, as a DVC stage would."""
    monkeypatch.chdir(project)
    client = store(project)

    def train_step(lengths: list[float]) -> Trained:
        set_params(project, train={**POSTHOC, "posthoc_lengths": lengths})
        config, pipeline = load_params(project / "params.yaml", repo=project)
        connect(pipeline)
        return flows.steps.train.train(config, pipeline, project, progress=False, continue_finished=True)

    with caplog.at_level(logging.INFO, logger=flows.steps.train.__name__):
        first = train_step([0.07])
        assert train_step([0.07]).run_id == first.run_id  # the same settings: taken up
        assert "continuing with it" in caplog.text
        caplog.clear()
        again = train_step([0.03, 0.07])
    assert "trained with other settings" in caplog.text and "starting a new one" in caplog.text
    assert again.run_id != first.run_id and len(runs_of(client)) == 2
    losses = client.get_metric_history(again.run_id, flows.steps.train.POSTHOC_EVAL_LOSS)
    assert {m.step for m in losses} >= {30, 70}  # chosen among the new lengths
