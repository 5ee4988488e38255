"""Real MLflow and Prefect servers on loopback for integration tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 180  # mlflow server takes 15-60 s to start on a 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    process.kill()
    raise TimeoutError(f"{url} not healthy after {SERVER_START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def start(args: list[str], health: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               start_new_session=True)
    wait_healthy(health, process, log)
    return process


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, 9)


def start_mlflow(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                     "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
                    f"http://127.0.0.1:{port}/health", workdir / "mlflow.log")
    return process, f"http://127.0.0.1:{port}"


def prefect_env(workdir: Path, port: int) -> dict[str, str]:
    return {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_prefect(workdir: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    env = prefect_env(workdir, port)
    process = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    f"http://127.0.0.1:{port}/api/health", workdir / "prefect.log", env)
    return process, env
