"""The gate fails closed on real faults, not simulated ones: a SQLite store locked by another process,
a real `mlflow server --app-name basic-auth` answering 403, a real `mlflow server` answering 503 when its
PostgreSQL stops. A failed read refuses, the champion stays on v1 and the candidate gets no record.

All reads of a registered model need READ on it on a basic-auth server (GetRegisteredModel, which the
gate reads the champion from, and GetModelVersionByAlias, GetModelVersion, which it reads the candidate
from), so a user denied the model fails on its first read, the candidate's; a 403 on the champion read
itself needs the permission withdrawn between the two. Likewise a store locked, or a database stopped,
from the start fails the candidate read. Each test that targets the champion read therefore starts the
real fault (the lock, the DENY, the stop) when the gate calls the champion read, and the read itself goes
to the real store or server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient

from flows.errors import RegistrationError
from flows.gate import promote
from tests import servers
from tests.test_auth import CREDENTIAL_VARS, credentials
from tests.test_registry import REGISTRY, ROOT, add_evaluated_model, champion

HOLDER_TIMEOUT = 30  # seconds to start or stop the lock-holding process; only a hang reaches it
# Holds SQLite's exclusive lock on the store (readers then get "database is locked" after their busy
# timeout, 20 s in MLflow's sessions: PRAGMA busy_timeout in mlflow.store.db.utils, no setting shortens
# it) until the test closes its stdin.
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""
OUTSIDER = ("outsider", "outsider-password")  # denied the registered model from the start
REVOKED = ("revoked", "revoked-password")  # denied it after the gate read the candidate, as it reads the champion


def record(client: MlflowClient, version: str) -> dict[str, str]:
    tags = client.get_model_version(REGISTRY.model_name, version).tags
    return {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}


def write_params(path: Path, **tracking) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = REGISTRY.model_name
    params["tracking"].update(tracking)
    path.write_text(yaml.safe_dump(params))
    return path


def start_at_the_champion_read(monkeypatch, fault) -> list[str]:
    """Run the context manager `fault()` around the gate's first read of the champion (the registered
    model's alias list); the read itself is MLflow's own. Returns the names read under the fault."""
    real = MlflowClient.get_registered_model
    faulted: list[str] = []

    def read(self, name):
        if faulted:
            return real(self, name)
        faulted.append(name)
        with fault():
            return real(self, name)

    monkeypatch.setattr(MlflowClient, "get_registered_model", read)
    return faulted


@contextmanager
def exclusive_lock(db: Path) -> Iterator[None]:
    """Another process holds BEGIN EXCLUSIVE on the SQLite file `db` inside the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.close()
        assert holder.wait(HOLDER_TIMEOUT) == 0


@pytest.mark.slow  # MLflow's 20 s busy timeout, not settable
def test_a_store_locked_at_the_champion_read_refuses_in_one_line(mlflow_state, tmp_path, monkeypatch, caplog):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    params = write_params(tmp_path / "params.yaml")
    from flows.promote import main

    client = MlflowClient(f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    v1 = add_evaluated_model(client, 30.0)
    assert main(["--params", str(params)]) == 0 and champion(client) == v1
    v2 = add_evaluated_model(client, 99.0)
    caplog.clear()
    locked = start_at_the_champion_read(monkeypatch, lambda: exclusive_lock(db))
    assert main(["--params", str(params)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert locked == [REGISTRY.model_name] and len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(
        "reading @champion of gate-test failed (TEMPORARILY_UNAVAILABLE: (sqlite3.OperationalError) database is locked)"
    )
    assert champion(client) == v1 and record(client, v2) == {}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A basic-auth server on which the admin registered v1 (fid 30, @champion) and v2 (fid 99,
    @candidate), and created the users; its URI and the versions' experiment."""
    tmp = tmp_path_factory.mktemp("gate-auth")
    process, uri = servers.start_mlflow_basic_auth(tmp)
    try:
        with credentials(servers.MLFLOW_ADMIN):
            for user, password in (OUTSIDER, REVOKED):
                AuthServiceClient(uri).create_user(user, password)
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("gate-real")
            client = MlflowClient(uri)
            v1 = add_evaluated_model(client, 30.0)
            assert promote(REGISTRY).promoted and champion(client) == v1
            add_evaluated_model(client, 99.0)
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it
        yield uri, "gate-real"
    finally:
        servers.stop(process)


def as_admin_unmoved(uri: str) -> None:
    """Seen by the admin: @champion still on v1, v2 with no record of passing."""
    with credentials(servers.MLFLOW_ADMIN):
        client = MlflowClient(uri)
        assert champion(client) == "1" and "passed" not in record(client, "2")


@pytest.mark.integration
@pytest.mark.slow  # a server: 15-60 s to start on 2 cores
def test_a_user_denied_the_model_cannot_promote_exit_2_one_line(auth_server, tmp_path):
    uri, experiment = auth_server
    with credentials(servers.MLFLOW_ADMIN):
        AuthServiceClient(uri).grant_user_permission(OUTSIDER[0], "registered_model", REGISTRY.model_name, "DENY")
    params = write_params(tmp_path / "params.yaml", uri=uri, experiment=experiment)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **dict(zip(CREDENTIAL_VARS, OUTSIDER, strict=True))}
    result = subprocess.run(
        [sys.executable, "-m", "flows.promote", "--params", str(params)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    # its first read of the model, the candidate's alias, is the one refused
    assert "registered-models/alias failed with error code 403" in errors[0] and "Permission denied" in errors[0]
    assert OUTSIDER[1] not in result.stderr
    as_admin_unmoved(uri)


@pytest.mark.integration
@pytest.mark.slow
def test_a_403_on_the_champion_read_refuses_and_keeps_it(auth_server, mlflow_state, monkeypatch):
    uri, _ = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)

    @contextmanager
    def deny() -> Iterator[None]:
        with credentials(servers.MLFLOW_ADMIN):
            AuthServiceClient(uri).grant_user_permission(REVOKED[0], "registered_model", REGISTRY.model_name, "DENY")
        yield

    denied = start_at_the_champion_read(monkeypatch, deny)
    with credentials(REVOKED), pytest.raises(RegistrationError) as refused:
        promote(REGISTRY)
    assert denied == [REGISTRY.model_name]
    assert str(refused.value).startswith("reading @champion of gate-test failed (PERMISSION_DENIED: ")
    assert "registered-models/get failed with error code 403" in str(refused.value) and "\n" not in str(refused.value)
    as_admin_unmoved(uri)


@pytest.fixture
def mlflow_on_postgres(tmp_path) -> Iterator[servers.MlflowOnPostgres]:
    """`mlflow server` on PostgreSQL (the test stops and restarts PostgreSQL)."""
    try:
        servers.postgres_bin()
    except RuntimeError as e:
        pytest.skip(str(e))
    with servers.mlflow_on_postgres(tmp_path) as running:
        yield running


@pytest.mark.integration
@pytest.mark.slow  # two servers
def test_a_5xx_on_the_champion_read_refuses_and_keeps_it(mlflow_on_postgres, mlflow_state, monkeypatch):
    database = mlflow_on_postgres
    uri = database.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's client retries a 503 for minutes
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    v1 = add_evaluated_model(client, 30.0)
    assert promote(REGISTRY).promoted and champion(client) == v1
    v2 = add_evaluated_model(client, 99.0)

    @contextmanager
    def database_stopped() -> Iterator[None]:
        servers.stop_postgres(database.postgres)
        yield

    stopped = start_at_the_champion_read(monkeypatch, database_stopped)
    with pytest.raises(RegistrationError) as refused:
        promote(REGISTRY)
    assert stopped == [REGISTRY.model_name]
    assert str(refused.value).startswith("reading @champion of gate-test failed (") and "\n" not in str(refused.value)
    assert "registered-models/get" in str(refused.value) and "too many 503 error responses" in str(refused.value)
    database.postgres = servers.run_postgres(database.home, database.port)
    assert champion(client) == v1 and record(client, v2) == {}
