"""The workspace lock against real processes: a second pipeline waits or is refused, naming the
holder; a holder killed with SIGKILL frees the lock and leaves its record for the next one."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from flows.workspace import LOCK_FILE, WorkspaceBusy, workspace_lock

FLOW_RUN_ID = str(uuid.UUID(int=7))
HOLD = """
import sys, time
from pathlib import Path
from flows.workspace import workspace_lock
with workspace_lock(Path(sys.argv[1]), 0, sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def hold(repo, seconds: float) -> subprocess.Popen:
    """Another process holding the workspace for `seconds`; returns once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(repo), FLOW_RUN_ID, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_pipeline_is_refused_after_the_timeout_naming_the_holder(tmp_path):
    holder = hold(tmp_path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy) as info, workspace_lock(tmp_path, timeout=1.5):
            pass
        assert 1.5 <= time.monotonic() - started < 10
        text = str(info.value)
        assert f"pid {holder.pid}" in text and FLOW_RUN_ID in text and "workspace.lock_timeout" in text
    finally:
        holder.kill()
        holder.wait()


def test_second_pipeline_waits_for_the_first_and_says_so(tmp_path, caplog):
    holder = hold(tmp_path, 3)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="flows.workspace"), workspace_lock(tmp_path, timeout=60) as dead:
        assert time.monotonic() - started > 2  # we got in only once it let go
        assert dead is None  # and it let go cleanly
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "waiting up to 60 s" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit leaves no record


def test_a_holder_killed_by_sigkill_frees_the_lock_and_is_reported_dead(tmp_path):
    holder = hold(tmp_path, 60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with workspace_lock(tmp_path, timeout=0) as dead:
        assert time.monotonic() - started < 1
        assert dead is not None and dead.pid == holder.pid and dead.flow_run_id == FLOW_RUN_ID
    with workspace_lock(tmp_path, timeout=0) as dead:
        assert dead is None
