"""SIGTERM and SIGINT during training: finish the step, checkpoint, stop (`fit` raises TrainingInterrupted).

While `StopRequest` is active, the first SIGTERM or SIGINT only records the request; `fit` checks it
after every step. The handlers that were there before come back at once, so a second signal acts
as it would without us (Ctrl-C raises KeyboardInterrupt at once, a second SIGTERM terminates), and
again when the block ends. A signal that was ignored when the block began (`nohup`, a background
job) stays ignored. Signals reach only the main thread, so elsewhere the block does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, FrameType | None], Any] | int


def take_stop_signals(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Handler]:
    """Point SIGTERM and SIGINT at `handler` (from the main thread only, where Python runs handlers);
    returns the handlers it replaced, for `put_back`."""
    previous: dict[int, Handler] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is None or current == signal.SIG_IGN:  # None: installed outside Python; SIG_IGN: nohup
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    return previous


def put_back(previous: dict[int, Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


SHELL_SIGNAL_EXIT = 128  # a shell reports death by signal N as exit status 128 + N (130 SIGINT, 143 SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM or SIGINT after checkpointing at a step boundary: a KeyboardInterrupt,
    so callers that end runs KILLED on Ctrl-C do so; `checkpoint` is where `--resume` continues."""

    global_step: int | None  # None: not known to the process that raised it (WorkersInterrupted)

    def __init__(self, signum: int, checkpoint: Path, global_step: int, where: str):
        self.signum, self.checkpoint, self.global_step = signum, checkpoint, global_step
        super().__init__(
            f"training stopped by {signal.Signals(signum).name} after step {global_step} ({where}); "
            f"checkpoint {checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        return SHELL_SIGNAL_EXIT + self.signum


class WorkersInterrupted(TrainingInterrupted):
    """SIGTERM or SIGINT to the process that launched msrun: msrun killed the workers (they cannot stop
    at one step together), so training since the newest checkpoint in `checkpoint` (the directory),
    at most train.checkpoint_minutes, is lost; a rerun resumes there."""

    def __init__(self, signum: int, workers: int, directory: Path):
        self.signum, self.checkpoint, self.global_step = signum, directory, None
        KeyboardInterrupt.__init__(
            self,
            f"data-parallel training stopped by {signal.Signals(signum).name}: its {workers} workers were stopped "
            f"(msrun kills them), so the steps since the newest checkpoint in {directory} are lost",
        )


class StopRequest:
    """A context manager recording the first SIGTERM or SIGINT in `signum` instead of acting on it."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: int | None = None
        self.previous: dict[int, Handler] = {}

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self.previous = take_stop_signals(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _record(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        log.warning(
            "%s: finishing this step, then checkpointing and stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def _restore(self) -> None:
        put_back(self.previous)
        self.previous = {}
