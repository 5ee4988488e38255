"""`ddpm serve`'s body limit (flows/serve.py BodyLimit) on ASGI messages, without a server; the real server
is asked in tests/test_serving.py (slow)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.serve import BodyLimit

LIMIT = 100
ROOT = Path(__file__).resolve().parents[1]


class App:
    """An ASGI app that reads the whole body, records it, and answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, chunks: list[bytes], declared: int | None = None) -> tuple[int, bytes]:
    """Run one POST through BodyLimit(app, LIMIT): `chunks` as it streams in, `declared` its Content-Length."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(BodyLimit(app, LIMIT)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_declared_length_over_the_limit_is_refused_before_the_app_reads_anything():
    app = App()
    status, text = call(app, [b"x" * 10], declared=LIMIT + 1)
    assert status == 413 and b"a body of 101 bytes is over this server's limit of 100 bytes" in text
    assert app.bodies == []


def test_a_streamed_body_over_the_limit_is_refused_without_a_length():
    app = App()
    status, text = call(app, [b"x" * 60, b"x" * 60])
    assert status == 413 and b"a body of unknown size is over" in text
    assert app.bodies == []


@pytest.mark.parametrize("declared", [None, LIMIT])
def test_a_body_within_the_limit_reaches_the_app_whole(declared):
    app = App()
    chunks = [b"a" * 40, b"b" * 40, b"c" * 20]
    assert call(app, chunks, declared) == (200, b"ok")
    assert app.bodies == [b"".join(chunks)]


def test_bad_options_are_one_line_and_exit_2():
    done = subprocess.run(
        [sys.executable, "-m", "flows.serve", "--max-body-bytes", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "--timeout and --max-body-bytes must be positive" in done.stderr


def test_a_model_that_is_not_registered_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows.serve", "-m", "models:/missing@champion", "--params", str(ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert "cannot serve models:/missing@champion: Registered Model with name=missing not found" in line
    assert "`ddpm promote`" in line and "Traceback" not in done.stderr
