"""The errors ddpm raises for bad input or a bad environment: each says what is wrong and how to fix
it, and how every entry point (the ddpm CLI, the DVC stages, the pipeline, promote) turns an error
into an exit code: `run_entry_point` reports a user error as one line, exit 2. No MindSpore here, so
that anything can name them."""

import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from ddpm.interrupt import TrainingInterrupted
from ddpm.logs import redact


class ConfigError(ValueError):
    """A params file or override that does not describe a valid configuration."""


class DataError(RuntimeError):
    """The dataset is missing, truncated or altered."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back intact."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that cannot be written (full disk, unwritable directory); the previous one is intact."""


class DeviceError(RuntimeError):
    """The configured device cannot be used on this machine."""


class WorkerError(RuntimeError):
    """A data-parallel training run (msrun) failed."""


class SampleRequestError(ValueError):
    """A sampling request outside the stated ranges; the message names every bad value and its range."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss."""


# An OS error whose errno says the disk is full: the file system, or the user's quota on it
DISK_FULL = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}

# SQLite's full disk (or a database at its page limit): its error carries no path and no errno
SQLITE_FULL = "SQLITE_FULL"

FULL_BYTES = 2**20  # less free than this counts as full: the failed write's partial file may be gone by now

# What an entry point reports as one clear line rather than a traceback (flows adds its own).
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    DeviceError,
    WorkerError,
    SampleRequestError,
    FloatingPointError,
    OSError,  # the machine's, not the code's: a missing, unwritable or blocked path, a full disk
)


OUR_PACKAGES = {"ddpm", "flows"}

USER_ERROR_EXIT = 2  # as argparse exits on a bad command line: the input or the machine, not the code

Errors = tuple[type[BaseException], ...]


def run_entry_point(
    body: Callable[[], int], log: logging.Logger, errors: Errors = USER_ERRORS, resume: str = "rerun to continue"
) -> int:
    """Run an entry point's `body` and return its exit code: a user error (one of `errors`, or a full
    disk behind a library's own error) is one line on `log`, exit 2; a training stopped by a signal
    exits as a shell reports it (130 SIGINT, 143 SIGTERM), saying how to `resume`; a bug raises."""
    try:
        return body()
    except errors as e:
        log.error("%s", describe(e))
        return USER_ERROR_EXIT
    except TrainingInterrupted as e:  # checkpointed at the step; a caller's run ended KILLED
        log.warning("%s; %s", e, resume)
        return e.exit_code
    except Exception as e:
        if full_disk(e) is None:
            raise
        log.error("%s", describe(e))
        return USER_ERROR_EXIT


def full_disk(e: BaseException) -> BaseException | None:
    """The full-disk error behind `e`, if any: an OS error with ENOSPC or EDQUOT, or SQLite's SQLITE_FULL,
    which SQLAlchemy and then MLflow wrap in errors of their own (their text holds the query)."""
    for cause in causes(e):
        if (isinstance(cause, OSError) and cause.errno in DISK_FULL) or sqlite_full(cause):
            return cause
    return None


def sqlite_full(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and e.sqlite_errorcode == sqlite3.SQLITE_FULL


def causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and the errors behind it, as Python's traceback shows them (a context raised `from None` is not)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def describe(e: BaseException) -> str:
    """The one line an entry point reports for a user error: an OS error on a path names the path and
    what to do about it; our own errors already say both. A URL's credentials are never in it."""
    return redact(_describe(e))


def _describe(e: BaseException) -> str:
    if not isinstance(e, USER_ERRORS) and (full := full_disk(e)) is not None:
        e = full  # a library's error (MLflow's, SQLAlchemy's) around a full disk: the disk is the news
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return no_space(f"{DISK_FULL[e.errno]}: {e.strerror}", written(e))
    if sqlite_full(e):  # its own text only: the wrappers' hold the query and its parameters
        return no_space(f"{SQLITE_FULL}: {e}", "a SQLite database" + on_full_here())
    if isinstance(e, OSError) and e.filename is not None:
        fix = (
            "check the path"
            if isinstance(e, FileNotFoundError)
            else "make it writable here, or clear what is in its way"
        )
        return f"{e.filename}: {e.strerror}; {fix}, then rerun"
    if not is_ours(e):  # a library's (MLflow's): SQLAlchemy's query and its parameters follow the first line
        return str(e).split("\n", 1)[0]
    return str(e)


def is_ours(e: BaseException) -> bool:
    """Raised by ddpm or flows, whose messages are written to be shown whole (a config error lists its fields)."""
    return type(e).__module__.split(".", 1)[0] in OUR_PACKAGES


def no_space(reason: str, where: str) -> str:
    return (
        f"no space left on device ({reason}) writing {where}: free space on its file system, or point that "
        f"directory elsewhere, then rerun (a training resumes from its last checkpoint)"
    )


def written(e: OSError) -> str:
    """The file a failed write went to: the error's (a copy names the source, then the destination),
    else the full file systems here; a write to an open file carries no path."""
    path = e.filename2 or e.filename
    if path is not None:
        return str(path)
    return "a file" + on_full_here()


def on_full_here() -> str:
    full = full_here()
    return " on " + " and ".join(full) if full else ""


def full_here() -> list[str]:
    """Where a write that failed without naming its file most likely went: the file systems of the
    working directory and of the directories mounted just under it (mlruns/, outputs/, ...) that are
    full now."""
    cwd = Path.cwd()
    mounts = [cwd, *(p for p in sorted(cwd.iterdir()) if p.is_dir() and p.is_mount())]
    return [str(p) for p in mounts if (s := os.statvfs(p)).f_bavail * s.f_frsize < FULL_BYTES]
