"""Progress off a terminal: plain log lines at an interval, never a bar redrawn with carriage returns."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from ddpm.logs import ProgressLines, progress_bar


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def piped(monkeypatch) -> Pipe:
    stderr = Pipe()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_off_a_terminal_progress_is_log_lines_with_position_loss_rate_and_time_left(piped, caplog):
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    bar = progress_bar(range(4), desc="epoch 1/2", total=4, unit="step", images_per_unit=16, seconds=0.0)
    assert isinstance(bar, ProgressLines)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 + 1, lines  # every step (interval 0), then the bar's last line (leave)
    assert lines[1].startswith("epoch 1/2: 2/4 step (50%), loss=0.5000, ")  # the second step's loss
    assert re.search(r", [\d.]+ img/s, \d\d:\d\d left$", lines[1]), lines[1]
    assert lines[-1].startswith("epoch 1/2: 4/4 step (100%), loss=0.2500, ") and lines[-1].endswith(", done in 00:00")
    assert piped.getvalue() == ""  # nothing written past the logger


def test_lines_come_at_the_interval_not_per_step(piped, caplog):
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    bar = progress_bar(range(100), desc="sampling", total=100, unit="img", leave=False, seconds=3600)
    for _ in bar:
        bar.set_postfix(loss="0.1")  # a postfix does not force a line
    assert caplog.records == []  # under an hour, and a bar that does not stay leaves no last line


def test_inner_bars_and_disabled_bars_log_nothing(piped, caplog):
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    for bar in (
        progress_bar(range(3), desc="batch 1/1", total=None, unit="step", inner=True, seconds=0.0),
        progress_bar(range(3), desc="off", total=3, unit="step", enabled=False, seconds=0.0),
    ):
        assert list(bar) == [0, 1, 2]
    assert caplog.records == [] and piped.getvalue() == ""


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch, caplog):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(range(3), desc="epoch 1/1", total=3, unit="step", file=terminal)
    assert not isinstance(bar, ProgressLines)
    assert list(bar) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "epoch 1/1" in terminal.getvalue()
    assert caplog.records == []
