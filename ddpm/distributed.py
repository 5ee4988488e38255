"""Data-parallel training with MindSpore's own launcher, msrun.

`train.workers: N` runs N processes on this machine (msrun starts them and a scheduler). Each
worker trains on its B/N images of every global batch of B, gradients are mean-reduced across
workers before Adam steps, and every worker draws the same t, noise and flips for the global batch,
so N workers end with the weights one process gets at batch B. Rank 0 alone writes checkpoints and
runs the callbacks (tracking, progress).

Stopping: msrun starts each worker in a session of its own, so a signal to the process that
launched it (the DVC stage, `ddpm train`, the flow) never reaches them. The launcher forwards the
first SIGTERM or SIGINT to msrun as SIGINT (msrun's own stop: it SIGKILLs its workers; they cannot
stop at one step together), waits until every process msrun started is gone, then raises
WorkersInterrupted. And each process dies with its parent (PR_SET_PDEATHSIG): msrun with the
launcher, the workers with msrun, so not even a `kill -9` leaves a worker training.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from ddpm.config import Config, params_data
from ddpm.errors import WorkerError
from ddpm.files import atomic_path, open_private
from ddpm.interrupt import Handler, WorkersInterrupted, put_back, take_stop_signals
from ddpm.runtime import select_device

log = logging.getLogger(__name__)

ROLE_ENV = "MS_ROLE"  # msrun sets it in the scheduler and every worker it starts
LOCALHOST = "127.0.0.1"
LOG_TAIL_LINES = 30  # of a failed worker's log, in the error
WORKER_LOGS = "worker_logs"  # msrun's logs of the workers, inside train.checkpoint_dir
WORKER_PARAMS = "worker_params.yaml"  # inside train.checkpoint_dir: the resolved params every worker reads
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent dies
INIT_PID = 1  # an orphan's parent (with no subreaper): its own parent died before it could ask
# Seconds msrun gets to stop its workers (it SIGKILLs them at once), and they to be gone, before we kill.
STOP_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local(self, batch_size: int) -> slice:
        """This worker's part of a global batch of `batch_size`."""
        local = batch_size // self.size
        return slice(self.rank * local, (self.rank + 1) * local)


ONE_PROCESS = World()  # no data parallelism


def in_msrun() -> bool:
    """True in a process that msrun started (a worker or its scheduler)."""
    return ROLE_ENV in os.environ


@functools.cache
def init_world(device: str = "auto") -> World:
    """Join msrun's process group on `device` when started by it; a single process is World(0, 1).

    Call it before any side effect: msrun's scheduler process runs the same command and leaves
    inside `init`.
    """
    if not in_msrun():
        return World()
    die_with_parent(signal.SIGKILL)  # no handler runs: a worker must never outlive msrun
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    select_device(device)
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    world = World(get_rank(), get_group_size())
    log.info("data-parallel worker %d of %d", world.rank, world.size)
    return world


def launch_workers(config: Config, command: list[str], directory: str | Path, also: Sequence[Any] = ()) -> None:
    """Run `python <command...> --params FILE` in train.workers processes under msrun and wait; rank 0's
    log is shown.

    FILE (write_worker_params) holds `config` as this process validated it, with the sections of
    each schema in `also` (the pipeline's): every worker trains with exactly these settings, whatever
    overrides made them. `command` is what follows `python`, e.g. ["-m", "ddpm", "train"]; each worker
    calls `init_world()` before anything else. `directory` is train.checkpoint_dir, as the caller
    resolves it; msrun's logs go to its worker_logs/.
    """
    directory = Path(directory)
    params = write_worker_params(directory, config, also)
    log_dir = directory / WORKER_LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = config.train.workers
    args = [
        sys.executable,
        "-m",
        "mindspore.parallel.cluster.run",  # msrun, from this interpreter
        f"--worker_num={workers}",
        f"--local_worker_num={workers}",
        f"--master_addr={LOCALHOST}",
        f"--master_port={free_port()}",
        "--join=True",
        f"--log_dir={log_dir}",
        "--tail_worker_log=0",
        "python",
        *command,
        "--params",
        str(params),
    ]
    # msrun starts "python" from PATH: make it this interpreter (the project's environment).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.info("data-parallel training on %d workers (msrun; logs in %s)", workers, log_dir)
    # Its own session, so a Ctrl-C in the terminal reaches msrun once, through us; and SIGINT, msrun's
    # stop, if we die without forwarding (kill -9, or a signal while we wait outside the main thread).
    msrun = subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=_die_with_launcher)
    with msrun, ForwardStop(msrun) as forward:
        returncode = msrun.wait()
    if forward.signum is not None:
        raise WorkersInterrupted(forward.signum, workers, directory)
    if returncode != 0:
        raise WorkerError(
            f"data-parallel training failed (msrun exit {returncode}).\n"
            f"{failure_report(log_dir)}\nWorker logs: {log_dir}"
        )


def write_worker_params(directory: Path, config: Config, also: Sequence[Any] = ()) -> Path:
    """Write `config` and the sections of each schema in `also` as one params file in `directory`,
    atomically and readable by its owner only; return its path. It reads back (load_config,
    flows.config.load_params) to objects equal to those given."""
    path = directory / WORKER_PARAMS
    directory.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(params_data(config, *also), sort_keys=False)
    with atomic_path(path) as tmp, open_private(tmp, "w") as f:
        f.write(text)
    return path


class ForwardStop:
    """While active in the main thread, the first SIGTERM or SIGINT stops msrun (SIGINT) and is
    recorded in `signum`; on exit, after msrun ended, it waits until every process msrun started is
    gone. As with StopRequest, the previous handlers are back after the first signal, so a second
    one acts as it would without us (msrun then dies with us, and its workers with it)."""

    def __init__(self, msrun: subprocess.Popen):
        self.msrun = msrun
        self.signum: int | None = None
        self.children: list[int] = []  # pidfds of msrun's processes, opened before they are orphaned
        self.previous: dict[int, Handler] = {}

    def __enter__(self) -> ForwardStop:
        self.previous = take_stop_signals(self._forward)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.signum is not None:
            wait_gone(self.children)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()
        log.warning("%s: stopping the data-parallel workers (msrun kills them)", signal.Signals(signum).name)
        self.children = child_pidfds(self.msrun.pid)
        self.msrun.send_signal(signal.SIGINT)

    def _restore(self) -> None:
        put_back(self.previous)
        self.previous = {}


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == INIT_PID:  # the parent died before the request: act on it now
        os.kill(os.getpid(), signum)


def _die_with_launcher() -> None:
    """msrun's preexec_fn: SIGINT (msrun's stop, which kills its workers) when the launcher dies."""
    die_with_parent(signal.SIGINT)


def child_pidfds(pid: int) -> list[int]:
    """pidfds of the live children of `pid` (found in /proc): waitable even once they are orphaned."""
    fds = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid:
                fds.append(os.pidfd_open(int(stat.parent.name)))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited while we looked
    return fds


def wait_gone(pidfds: list[int], seconds: float = STOP_SECONDS) -> None:
    """Wait until each process is gone (its pidfd becomes readable); SIGKILL those still there after `seconds`."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    alive = set(pidfds)
    for killing in (False, True):
        if killing and alive:
            log.warning("%d of msrun's processes outlived it by %d s; killing them", len(alive), seconds)
            for fd in alive:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        while alive:
            ready = poller.poll(seconds * 1000)
            if not ready:
                break
            for fd, _ in ready:
                alive.discard(fd)
                poller.unregister(fd)
    for fd in pidfds:
        os.close(fd)


def failure_report(log_dir: Path) -> str:
    """The last lines of each worker log that reports an error (else of worker 0's)."""
    logs = sorted(log_dir.glob("worker_*.log"))
    failed = [p for p in logs if "Error" in p.read_text(errors="replace")] or logs[:1]
    return "\n".join(
        f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]) for p in failed
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]
