"""One log line format for every command: the ddpm CLI, the DVC stages, msrun workers, data and promote.
No line shows the credentials of a URL (`http://user:password@host`): `redact` them wherever a URI or a
command line is shown, and every handler `configure_logging` sets up redacts them again, for lines
from other libraries."""

from __future__ import annotations

import contextlib
import logging
import re

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
# A URL's userinfo: after the scheme, up to the last "@" before the path, as urllib splits a netloc
URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
REDACTED = "***"


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
