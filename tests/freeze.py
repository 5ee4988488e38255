"""Deterministic fault injection: stop a pipeline process at the moment it opens a given file.

tests/freeze_at_open.c is compiled once per test session and preloaded into the processes a test
starts (`Freezer.env`). `arm(pattern)` makes the next process that opens a path containing
`pattern` stop itself before the open (`arm(pattern, nth)`: before its nth such open);
`wait_frozen()` returns its pid once it is stopped, so the test can SIGKILL it there, or send it a
signal that it handles when continued: after the step before, never racing a tiny training that is
faster than a poll."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("freeze_at_open.c")
FREEZE_DEADLINE = 900  # seconds a test waits for the process to reach the file


class Freezer:
    def __init__(self, directory: Path):
        self.library = directory / "freeze_at_open.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.library), str(SOURCE), "-ldl"], check=True)
        self.control = directory / "freeze.control"
        self.pidfile = directory / "freeze.control.pid"

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "FREEZE_CONTROL": str(self.control)}

    def arm(self, pattern: str, nth: int = 1) -> None:
        self.pidfile.unlink(missing_ok=True)
        self.control.write_text(f"{pattern}\n{nth}\n")

    def disarm(self) -> None:
        self.control.unlink(missing_ok=True)

    def wait_frozen(self, alive=lambda: True, timeout: float = FREEZE_DEADLINE) -> int:
        """The pid of the process stopped at the file; `alive()` returning False (the process under
        test exited) fails at once instead of waiting out the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pidfile.is_file() and (text := self.pidfile.read_text().strip()):
                pid = int(text)
                if _state(pid) == "T":
                    return pid
            assert alive(), "the process under test exited before it reached the file"
            assert time.monotonic() < deadline, f"no process reached the frozen file in {timeout} s"
            time.sleep(0.05)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None
