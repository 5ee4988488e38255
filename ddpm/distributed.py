"""Data-parallel training with MindSpore's own launcher, msrun.

`train.workers: N` runs N processes on this machine (msrun starts them and a scheduler). Each
worker trains on its B/N images of every global batch of B, gradients are mean-reduced across
workers before Adam steps, and every worker draws the same t, noise and flips for the global batch,
so N workers end with the weights one process gets at batch B. Rank 0 alone writes checkpoints and
runs the callbacks (tracking, progress).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from ddpm.errors import WorkerError
from ddpm.runtime import select_device

log = logging.getLogger(__name__)

ROLE_ENV = "MS_ROLE"  # msrun sets it in the scheduler and every worker it starts
LOCALHOST = "127.0.0.1"
LOG_TAIL_LINES = 30  # of a failed worker's log, in the error
WORKER_LOGS = "worker_logs"  # msrun's logs of the workers, inside train.checkpoint_dir


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
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    select_device(device)
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    world = World(get_rank(), get_group_size())
    log.info("data-parallel worker %d of %d", world.rank, world.size)
    return world


def launch_workers(workers: int, command: list[str], log_dir: str | Path) -> None:
    """Run `python <command...>` in `workers` processes under msrun and wait; rank 0's log is shown.

    `command` is what follows `python`, e.g. ["-m", "ddpm", "train", ...]; each worker calls
    `init_world()` before anything else.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
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
    ]
    # msrun starts "python" from PATH: make it this interpreter (the project's environment).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.info("data-parallel training on %d workers (msrun; logs in %s)", workers, log_dir)
    result = subprocess.run(args, env=env)
    if result.returncode != 0:
        raise WorkerError(
            f"data-parallel training failed (msrun exit {result.returncode}).\n"
            f"{failure_report(log_dir)}\nWorker logs: {log_dir}"
        )


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
