"""SIGTERM to a data-parallel DVC train stage (`train.workers: 2`, msrun): the stage stops msrun's
workers, waits until they are gone, ends its run KILLED, frees the workspace and exits 143; the
same command resumes in the same run. docs/reliability.md maps the fault to this test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from pathlib import Path

import pytest

from ddpm import checkpoint as ckpt
from flows.workspace import LOCK_FILE
from tests.faults import EPOCHS, FIRST_EPOCH_DONE, runs_of, set_params, start_frozen, store
from tests.freeze import _state
from tests.test_pipeline import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER_MODULE = "flows.worker"  # what msrun, its scheduler and its workers all have on their command line


def training_processes(repo: Path) -> list[int]:
    """Live processes of msrun's training in `repo`: msrun, its scheduler, its workers (zombies are gone)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        pid = int(cmdline.parent.name)
        if WORKER_MODULE.encode() in args and str(repo).encode() in args and _state(pid) not in (None, "Z"):
            found.append(pid)
    return found


def test_sigterm_to_a_two_worker_stage_leaves_no_worker_and_a_rerun_resumes(project, tmp_path, freezer):
    set_params(project, train={"epochs": EPOCHS, "workers": 2, "checkpoint_minutes": 0})
    stage = [sys.executable, "-m", "flows.stages", "train"]
    log = tmp_path / "stopped.log"
    # rank 0 stops as it writes epoch 2's checkpoint: training, epoch 1 on disk
    process, frozen = start_frozen(stage, project, {}, log, freezer, FIRST_EPOCH_DONE)
    training = training_processes(project)
    assert frozen in training and len(training) >= 4, training  # msrun, scheduler, 2 workers

    os.kill(process.pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):  # already killed and reaped: nothing to continue
        os.kill(frozen, signal.SIGCONT)  # rank 0 trains on unless stopped with the rest
    returncode = process.wait(timeout=300)
    assert training_processes(project) == []  # gone by the time the stage exits, not later
    assert returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert "data-parallel training stopped by SIGTERM: its 2 workers were stopped" in output
    assert "`dvc repro` continues from there" in output and "Traceback" not in output
    assert [p.name for p in ckpt.list_checkpoints(project / "checkpoints")] == ["epoch_0001.ckpt"]
    client = store(project)
    [killed] = runs_of(client)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure"].startswith("WorkersInterrupted: data-parallel training stopped by SIGTERM")
    with open(project / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises BlockingIOError if still held

    rerun = run(stage, project, {})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "holds an unfinished training; resuming it" in rerun.stderr
    [resumed] = runs_of(client)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert "failure" not in resumed.data.tags
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss_epoch")] == list(
        range(1, EPOCHS + 1)
    )
    final = ckpt.load_checkpoint(project / "checkpoints" / f"epoch_{EPOCHS:04d}.ckpt")
    assert final.epoch == EPOCHS
