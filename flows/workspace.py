"""One pipeline at a time per checkout: an exclusive lock on .pipeline.lock that names its holder.

The Prefect flow holds it from start to end, each DVC stage while it runs. A second pipeline
waits, logging who holds the lock, and is refused with WorkspaceBusy after
`workspace.lock_timeout` seconds. The lock is the kernel's (flock), so a process that dies, even
by kill -9, releases it, but its record stays in the file. So the next holder knows that the
previous pipeline died, and cleans up after it: it marks the dead pipeline's Prefect flow run
Crashed (Prefect leaves it Running) and ends its MLflow runs KILLED (MLflow leaves them RUNNING).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from uuid import UUID

from ddpm.files import open_private
from ddpm.logs import redact
from flows.config import PipelineConfig

log = logging.getLogger(__name__)

LOCK_FILE = ".pipeline.lock"
POLL_SECONDS = 1.0  # how often a waiting pipeline tries the lock again


class WorkspaceBusy(RuntimeError):
    """Another pipeline holds the workspace and did not finish in time."""


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str
    flow_run_id: str | None = None

    def __str__(self) -> str:
        flow_run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"pid {self.pid} on {self.host}{flow_run}, since {self.started}: {self.command}"


@contextlib.contextmanager
def hold_workspace(repo: Path, pipeline: PipelineConfig, flow_run_id: str | None = None) -> Iterator[None]:
    """Run alone in `repo`, cleaning up after a previous pipeline that died there.
    MLflow must be connected (`tracking.connect`)."""
    from flows.tracking import end_stale_runs  # MLflow loads in seconds; the lock alone needs none of it

    with workspace_lock(repo, pipeline.workspace.lock_timeout, flow_run_id) as dead:
        if dead is not None and dead.flow_run_id and dead.flow_run_id != flow_run_id:
            crash_flow_run(dead.flow_run_id, f"its process ({dead}) died; found by the next pipeline in {repo}")
        end_stale_runs(pipeline, repo)
        yield


@contextlib.contextmanager
def workspace_lock(repo: Path, timeout: float, flow_run_id: str | None = None) -> Iterator[Holder | None]:
    """Hold the workspace lock; yield the previous holder if it died holding it, else None."""
    path = Path(repo) / LOCK_FILE
    # the record holds a command line, whose --set values may hold a URL's credentials (redacted, but still)
    with open_private(path, "a+") as f:
        _acquire(f, path, timeout)
        try:
            dead = _read(path)
            me = Holder(
                os.getpid(),
                socket.gethostname(),
                datetime.now(UTC).isoformat(timespec="seconds"),
                redact(shlex.join(sys.argv)),
                flow_run_id,
            )
            _write(f, json.dumps(dataclasses.asdict(me)))
            if dead is not None:
                log.warning("the previous pipeline in %s died without finishing (%s); cleaning up after it", repo, dead)
            yield dead
        finally:
            _write(f, "")  # a clean exit leaves no record: a record means its holder died
            fcntl.flock(f, fcntl.LOCK_UN)


def _acquire(f: IO[str], path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read(path) or "a pipeline that is starting"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkspaceBusy(
                    f"{path.parent} is in use by another pipeline ({holder}); refused after waiting {timeout:g} s. "
                    f"Let it finish, or raise workspace.lock_timeout (e.g. --set workspace.lock_timeout=3600)."
                ) from None
            if not waiting:  # a warning: Prefect ships the extra loggers' warnings, not their info
                log.warning(
                    "%s is in use by another pipeline (%s); waiting up to %g s for it", path.parent, holder, timeout
                )
                waiting = True
            time.sleep(min(POLL_SECONDS, remaining))


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None  # no record, or one being written: nobody died holding the lock


def _write(f: IO[str], text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def crash_flow_run(flow_run_id: str, reason: str) -> None:
    """Mark a flow run whose process died Crashed, as Prefect's worker would had it seen the death."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is not None and state.is_final():
                return
            client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except (ObjectNotFound, httpx.HTTPError) as e:
        log.warning(
            "could not mark Prefect flow run %s Crashed (%s: %s); it may still show as Running on the "
            "Prefect API it ran on",
            flow_run_id,
            type(e).__name__,
            e,
        )
        return
    log.warning("marked Prefect flow run %s Crashed: %s", flow_run_id, reason)
