"""The errors ddpm raises for bad input or a bad environment: each says what is wrong and how to fix
it, and how every entry point (the ddpm CLI, the DVC stages, the pipeline, promote) turns an error
into an exit code: `run_entry_point` reports a user error as one line, exit 2. No MindSpore here, so
that anything can name them."""

import errno
import logging
import os
from collections.abc import Callable
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


USER_ERROR_EXIT = 2  # as argparse exits on a bad command line: the input or the machine, not the code

Errors = tuple[type[BaseException], ...]


def run_entry_point(
    body: Callable[[], int], log: logging.Logger, errors: Errors = USER_ERRORS, resume: str = "rerun to continue"
) -> int:
    """Run an entry point's `body` and return its exit code: a user error (one of `errors`) is one line
    on `log`, exit 2; a training stopped by a signal exits as a shell reports it (130 SIGINT, 143
    SIGTERM), saying how to `resume`; a bug raises."""
    try:
        return body()
    except errors as e:
        log.error("%s", describe(e))
        return USER_ERROR_EXIT
    except TrainingInterrupted as e:  # checkpointed at the step; a caller's run ended KILLED
        log.warning("%s; %s", e, resume)
        return e.exit_code


def describe(e: BaseException) -> str:
    """The one line an entry point reports for a user error: an OS error on a path names the path and
    what to do about it; our own errors already say both. A URL's credentials are never in it."""
    return redact(_describe(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return no_space(f"{DISK_FULL[e.errno]}: {e.strerror}", written(e))
    if isinstance(e, OSError) and e.filename is not None:
        fix = (
            "check the path"
            if isinstance(e, FileNotFoundError)
            else "make it writable here, or clear what is in its way"
        )
        return f"{e.filename}: {e.strerror}; {fix}, then rerun"
    return str(e)


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
