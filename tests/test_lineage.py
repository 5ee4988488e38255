"""Lineage: what DVC and MLflow record is what trained. A real `dvc repro` whose params.yaml is edited
while its stage runs fails and leaves dvc.lock without the new values; a training resumed under
another commit keeps both commits. docs/reliability.md maps each fault to its test here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.steps.train import GIT_COMMITS_TAG
from flows.tracking import git_commit
from tests.faults import EPOCHS, kill_after_first_epoch, runs_of, set_params, start_frozen, store
from tests.test_pipeline import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSIFIER_WRITTEN = "models/.classifier.partial.ckpt"  # the classifier stage writing its output: trained already


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def commit(repo: Path, message: str) -> str:
    subprocess.run([*GIT, "commit", "-qa", "--allow-empty", "-m", message], cwd=repo, check=True)
    return git_commit(repo)


def test_params_edited_while_a_stage_runs_fail_it_and_dvc_lock_records_no_new_value(project, tmp_path, freezer):
    """The classifier stage is stopped as it writes its checkpoint, params.yaml gets another classifier.epochs,
    and the stage continues: it exits 2 naming the key, so `dvc repro` fails and records nothing; a
    rerun trains with the new value and records it."""
    trained_with = yaml.safe_load((project / "params.yaml").read_text())["classifier"]["epochs"]
    repro = [sys.executable, "-m", "dvc", "repro", "classifier"]
    log = tmp_path / "edited.log"
    process, pid = start_frozen(repro, project, {}, log, freezer, CLASSIFIER_WRITTEN)
    set_params(project, classifier={"epochs": trained_with + 1})
    os.kill(pid, signal.SIGCONT)
    assert process.wait(timeout=600) != 0, log.read_text()[-3000:]
    output = log.read_text()
    assert (
        f"params.yaml changed while the classifier stage ran (classifier.epochs {trained_with} -> {trained_with + 1})"
        in output
    )
    assert "rerun `dvc repro`" in output and "Traceback" not in output
    lock = yaml.safe_load((project / "dvc.lock").read_text()) if (project / "dvc.lock").is_file() else {}
    assert "classifier" not in lock.get("stages", {}), lock  # nothing recorded: not the new value beside the old model

    rerun = run(repro, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["classifier"]["params"]["params.yaml"]["classifier"]["epochs"] == trained_with + 1


def test_a_training_resumed_under_another_commit_records_both(project, tmp_path, freezer):
    set_params(project, train={"epochs": EPOCHS})
    first = commit(project, "three epochs")
    stage = [sys.executable, "-m", "flows.stages", "train"]
    kill_after_first_epoch(stage, project, {}, tmp_path / "killed.log", freezer)
    second = commit(project, "a code change")

    rerun = run(stage, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    [resumed] = runs_of(store(project))
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "1"
    assert resumed.data.tags[GIT_COMMITS_TAG] == f"{first}, then {second}"
    assert resumed.data.tags["git_commit"] == second  # the last, as before
