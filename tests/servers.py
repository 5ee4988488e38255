"""Real MLflow and Prefect servers on loopback for integration tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]  # the checkout
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
    with open(log, "w") as out:  # the server holds its own copy of the file
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    wait_healthy(health, process, log)
    return process


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s; a server already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_mlflow(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with its store in `workdir`; with `port`, on that one (a restart of the same server)."""
    return start_mlflow_on(workdir, f"sqlite:///{workdir / 'mlflow.db'}", port)


def prefect_env(workdir: Path, port: int) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def start_prefect(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` with its database in `workdir`; with `port`, on that one (a restart)."""
    port = port or free_port()
    env = prefect_env(workdir, port)
    process = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/api/health",
        workdir / "prefect.log",
        env,
    )
    return process, env


POSTGRES_USER = "postgres"  # PostgreSQL refuses to run as root; Debian's package creates this user


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL server binaries (package `postgresql`)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install -y postgresql`")
    return found[-1].parent


def start_postgres(database: str = "mlflow") -> tuple[subprocess.Popen, str, Path]:
    """A throwaway PostgreSQL cluster on loopback; returns the server, a SQLAlchemy URI and its directory."""
    import pwd
    import tempfile

    bin_dir = postgres_bin()
    as_user = ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="ddpm-pg-"))  # not under pytest's root-only tmp: the server's user reads it
    if as_user:
        user = pwd.getpwnam(POSTGRES_USER)
        os.chown(home, user.pw_uid, user.pw_gid)
    data = home / "data"
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", database],
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = run_postgres(home, port)
    subprocess.run(
        [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", database, database],
        check=True,
        capture_output=True,
    )
    return process, f"postgresql+psycopg2://{database}@127.0.0.1:{port}/{database}", home


def run_postgres(home: Path, port: int) -> subprocess.Popen:
    """The PostgreSQL server of the cluster in `home` (start_postgres's), on `port`, once it accepts connections."""
    bin_dir = postgres_bin()
    as_user = ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []
    with open(home / "postgres.log", "a") as out:
        process = subprocess.Popen(
            [
                *as_user,
                str(bin_dir / "postgres"),
                "-D",
                str(home / "data"),
                "-p",
                str(port),
                "-k",
                str(home),
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while (
        subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode
        != 0
    ):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start:\n{(home / 'postgres.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return process


def stop_postgres(process: subprocess.Popen) -> None:
    """PostgreSQL's fast shutdown (SIGINT): it ends its sessions, where SIGTERM waits for clients to leave."""
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=SERVER_START_TIMEOUT)


@dataclasses.dataclass
class MlflowOnPostgres:
    uri: str  # the MLflow server's
    backend: str  # PostgreSQL's, as SQLAlchemy takes it
    postgres: subprocess.Popen  # a test that restarts PostgreSQL (run_postgres) puts the new one here
    home: Path

    @property
    def port(self) -> int:
        port = urlsplit(self.backend).port
        assert port is not None
        return port


@contextlib.contextmanager
def mlflow_on_postgres(workdir: Path) -> Iterator[MlflowOnPostgres]:
    """`mlflow server` on a throwaway PostgreSQL cluster; both stopped and the cluster removed after."""
    postgres, backend, home = start_postgres()
    mlflow_server = running = None
    try:
        mlflow_server, uri = start_mlflow_on(workdir, backend)
        running = MlflowOnPostgres(uri, backend, postgres, home)
        yield running
    finally:
        if mlflow_server is not None:
            stop(mlflow_server)
        postgres = running.postgres if running is not None else postgres
        if postgres.poll() is None:  # the test may have stopped it
            stop_postgres(postgres)
        shutil.rmtree(home, ignore_errors=True)


def start_mlflow_on(workdir: Path, backend_uri: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with the given backend store (e.g. PostgreSQL) and local artifacts."""
    port = port or free_port()
    process = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--workers",
            "1",
        ],
        f"http://127.0.0.1:{port}/health",
        workdir / "mlflow.log",
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": NO_JOBS},
    )
    return process, f"http://127.0.0.1:{port}"


NO_JOBS = "false"  # MLflow's server otherwise starts 8 job consumers, for GenAI jobs we never run
MLFLOW_ADMIN = ("admin", "test-admin-password")  # MLflow ships no admin password and wants >= 12 characters


def start_mlflow_basic_auth(workdir: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server --app-name basic-auth` with its own user database; admin is MLFLOW_ADMIN."""
    config = workdir / "basic_auth.ini"
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_ADMIN[0]}\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": NO_JOBS,
    }
    port = free_port()
    process = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--workers",
            "1",
        ],
        f"http://127.0.0.1:{port}/health",
        workdir / "mlflow.log",
        env,
    )
    return process, f"http://127.0.0.1:{port}"


def start_prefect_with_auth(workdir: Path, auth_string: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` that answers only requests carrying `auth_string` ("user:password");
    the returned client env lacks PREFECT_API_AUTH_STRING: callers add it."""
    port = free_port()
    env = prefect_env(workdir, port)
    process = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/api/health",
        workdir / "prefect.log",
        {**env, "PREFECT_SERVER_API_AUTH_STRING": auth_string},
    )
    return process, env


def start_model_server(
    model_uri: str,
    workdir: Path,
    tracking_uri: str,
    options: tuple[str, ...] = (),
    env: dict | None = None,
    mlflow_serve: bool = False,
) -> tuple[subprocess.Popen, str]:
    """`ddpm serve` of a registered model, as the README serves @champion, or with `mlflow_serve` MLflow's
    own `mlflow models serve` in the local environment; `options` (e.g. ("-t", "3")) and `env` are added to
    its command and environment."""
    port = free_port()
    if mlflow_serve:
        command = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--workers", "1"]
    else:
        command = ["ddpm", "serve", "-m", model_uri, "--params", str(ROOT / "params.yaml")]
    process = start(
        [str(BIN / command[0]), *command[1:], "--host", "127.0.0.1", "-p", str(port), *options],
        f"http://127.0.0.1:{port}/ping",
        workdir / "model-server.log",
        {
            "MLFLOW_TRACKING_URI": tracking_uri,  # mlflow runs `uvicorn`, found on PATH as under `uv run`
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            **(env or {}),
        },
    )
    return process, f"http://127.0.0.1:{port}"
