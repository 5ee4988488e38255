"""Atomic file writes: a temporary beside the file, renamed onto it once whole, so a reader (or a
crash) sees the previous file or the new one, never half of one.

One naming rule for the temporary, `.<stem>.partial<suffix>` (epoch_0001.ckpt -> .epoch_0001.partial.ckpt):
hidden, and with the file's own suffix because writers choose their format by it (MindSpore appends
.ckpt to any other name). Standard library only: flows/ uses it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o600  # files that may hold a secret (a URL's credentials): their owner reads them, nobody else
PARTIAL_MARK = ".partial"
PARTIAL_FILE = re.compile(rf"^\.(?P<stem>.+){re.escape(PARTIAL_MARK)}(?P<suffix>\.[^.]+)?$")


def partial_path(path: str | Path) -> Path:
    """The temporary that `path` is written to before it is renamed onto `path`."""
    path = Path(path)
    return path.with_name(f".{path.stem}{PARTIAL_MARK}{path.suffix}")


def is_partial(name: str) -> bool:
    """Whether a file of this name is a temporary, one an interrupted write may have left behind."""
    return PARTIAL_FILE.match(name) is not None


def final_name(name: str) -> str:
    """The name of the file a temporary of this name stands in for; any other name unchanged."""
    match = PARTIAL_FILE.match(name)
    return match["stem"] + (match["suffix"] or "") if match else name


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield the temporary to write `path` to; rename it onto `path` when the block succeeds, delete
    it and re-raise when it fails (Ctrl-C included), leaving `path` as it was. `durable` fsyncs the
    file before the rename and the directory after it, so the rename survives a power loss."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException:
        remove_leftover(tmp)
        raise


def open_private(path: str | Path, mode: str) -> IO[str]:
    """Open a text file as `open(path, mode)` does, readable and writable by its owner only: a new file
    is created so, and one that was there (a leftover, or made under another umask) is made so."""
    f = open(path, mode, opener=_private_opener)  # noqa: SIM115 (returned: the caller closes it)
    try:
        os.fchmod(f.fileno(), PRIVATE_MODE)  # O_CREAT's mode applies to new files only
    except BaseException:
        f.close()
        raise
    return f


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, PRIVATE_MODE)


def remove_leftover(path: Path) -> None:
    """Delete a failed write's temporary if it is there; never raise over the error that left it."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # e.g. its directory is not one: nothing was left there
        log.debug("could not remove %s: %s", path, e)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
