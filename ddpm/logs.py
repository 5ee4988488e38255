"""One log line format for every command (the ddpm CLI, the DVC stages, msrun workers, data and
promote), and one way to show progress: a tqdm bar on a terminal, plain log lines anywhere else.
No line shows the credentials of a URL (`http://user:password@host`): `redact` them wherever a URI or a
command line is shown, and every handler `configure_logging` sets up redacts them again, for lines
from other libraries."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
# A URL's userinfo: after the scheme, up to the last "@" before the path, as urllib splits a netloc
URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
REDACTED = "***"
# Off a terminal, a progress line at most this often: so one at least every minute while steps
# shorter than the rest of the minute run, without flooding a log.
PROGRESS_SECONDS = 30.0

progress_log = logging.getLogger("ddpm.progress")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it (user, password or token) replaced by ***."""
    return URL_USERINFO.sub(rf"\1{REDACTED}@", text)


class RedactCredentials(logging.Filter):
    """Redact URL credentials in a record's message, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        # a malformed call (args not matching msg) is left for the handler to report as logging's own error
        with contextlib.suppress(TypeError, ValueError):
            record.msg, record.args = redact(record.getMessage()), None
        return True


REDACT_CREDENTIALS = RedactCredentials()  # one instance: a handler adds it once however often it is configured


def configure_logging(level: int = logging.INFO, label: str = "") -> None:
    """Log to stderr in the project's format; `label` (e.g. "rank 1") goes before the level."""
    line = LOG_FORMAT.replace("%(levelname)s", f"{label} %(levelname)s") if label else LOG_FORMAT
    logging.basicConfig(level=level, format=line, datefmt=LOG_DATE_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(REDACT_CREDENTIALS)


def on_terminal() -> bool:
    """Whether a redrawn bar reaches a person: in a file or a pipe its carriage returns pile up."""
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None,
    unit: str,
    enabled: bool = True,
    inner: bool = False,
    images_per_unit: int = 0,
    seconds: float = PROGRESS_SECONDS,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on a terminal; elsewhere the same counting as a log line every `seconds` (position,
    postfix such as the loss, images/s when a unit holds `images_per_unit` images, time left), and a
    last line when the bar would stay on screen (`leave`, tqdm's default). An `inner` bar (one per
    batch inside another bar) shows on a terminal only: a log has the outer bar's lines."""
    if not enabled or (inner and not on_terminal()):
        return tqdm(iterable, total=total, disable=True)
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, **kwargs)
    return ProgressLines(iterable, desc=desc, total=total, unit=unit, images=images_per_unit, seconds=seconds, **kwargs)


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


class ProgressLines(tqdm):
    """tqdm's counting and rates, reported as log lines instead of a bar redrawn in place."""

    def __init__(self, iterable: Iterable | None, *, images: int, seconds: float, **kwargs: Any):
        self.images = images
        # miniters=1: only the clock decides (tqdm's adaptive count could wait past a minute)
        super().__init__(iterable, file=_Discard(), mininterval=seconds, miniters=1, **kwargs)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # the clock decides when a line is due

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if msg is None and self.n > self.initial:  # msg '': tqdm clearing a bar that does not stay
            progress_log.info("%s", self.line())

    def line(self) -> str:
        """e.g. `epoch 1/7: 120/469 step (26%), loss=0.0412, 55.1 img/s, 06:20 left`; last `..., done in 08:31`."""
        info = self.format_dict
        n, total, rate = info["n"], info["total"], info["rate"]
        if rate is None and info["elapsed"]:
            rate = (n - self.initial) / info["elapsed"]
        parts = [f"{n}/{total} {self.unit}" + (f" ({100 * n / total:.0f}%)" if total else "")]
        if info["postfix"]:
            parts.append(info["postfix"])
        if rate:
            parts.append(f"{rate * self.images:.1f} img/s" if self.images else f"{rate:.2f} {self.unit}/s")
            if total and n < total:
                parts.append(f"{tqdm.format_interval((total - n) / rate)} left")
        if total and n >= total:
            parts.append(f"done in {tqdm.format_interval(info['elapsed'])}")
        return f"{self.desc}: " + ", ".join(parts)


class DemoteToDebug(logging.Filter):
    """A logger filter that logs the records `matches` picks at debug level: a library's warning or
    traceback about something our own one line already reports."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self.matches(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)  # it passed the check at its level
        return True
