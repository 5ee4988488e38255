"""One log line format for every command: the ddpm CLI, the DVC stages, msrun workers, data and promote."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def configure_logging(level: int = logging.INFO, label: str = "") -> None:
    """Log to stderr in the project's format; `label` (e.g. "rank 1") goes before the level."""
    line = LOG_FORMAT.replace("%(levelname)s", f"{label} %(levelname)s") if label else LOG_FORMAT
    logging.basicConfig(level=level, format=line, datefmt=LOG_DATE_FORMAT)
