"""Credentials in a tracking URI (`http://user:password@host`): accepted as MLflow's own client accepts
them, and shown nowhere: no log line, run tag or param, artifact or lock record."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ddpm.errors import DataError, describe
from ddpm.files import PRIVATE_MODE
from ddpm.logs import redact
from flows.config import params_from_dict
from flows.errors import TrackingError
from flows.tracking import CREDENTIAL_VARS, FAILURE_TAG, connect, end_run_with_failure
from flows.workspace import LOCK_FILE, workspace_lock
from tests import servers
from tests.faults import EXPERIMENT
from tests.test_pipeline import run

SECRET = "s3cret-pa55word"
TRAINER = ("trainer", SECRET)


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://trainer:{SECRET}@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        (f"uri https://{SECRET}@example.com/api and s3://key:{SECRET}@bucket/x", "uri https://***@example.com/api "),
        (f"http://trainer:p%40{SECRET}@host/path@x", "http://***@host/path@x"),  # an encoded "@" in the password
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://host/a@b", "http://host/a@b"),  # an "@" in the path is no userinfo
    ],
)
def test_redact_hides_any_urls_userinfo_and_nothing_else(text, shown):
    assert redact(text).startswith(shown)
    assert SECRET not in redact(text)


@pytest.fixture
def credential_vars(monkeypatch):
    """connect() sets MLFLOW_TRACKING_USERNAME/PASSWORD: put them back as they were after the test."""
    for key in CREDENTIAL_VARS:
        monkeypatch.delenv(key, raising=False)


def pipeline_for(uri: str):
    _, pipeline = params_from_dict({"tracking": {"uri": uri, "experiment": EXPERIMENT, "connect_timeout": 5.0}})
    return pipeline


def test_an_unreachable_server_with_credentials_is_named_without_them(mlflow_state, credential_vars):
    port = servers.free_port()  # nothing listens there
    with pytest.raises(TrackingError) as refused:
        connect(pipeline_for(f"http://trainer:{SECRET}@127.0.0.1:{port}"))
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_the_lock_record_is_its_owners_and_holds_no_credentials(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).write_text("")
    (tmp_path / LOCK_FILE).chmod(0o644)  # as an older version left it
    monkeypatch.setattr(sys, "argv", ["flows/pipeline.py", "--set", f"tracking.uri=http://trainer:{SECRET}@host"])
    with workspace_lock(tmp_path, timeout=1):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert stat.S_IMODE((tmp_path / LOCK_FILE).stat().st_mode) == PRIVATE_MODE
    assert record["command"] == "flows/pipeline.py --set tracking.uri=http://***@host"
    new = tmp_path / "new"
    new.mkdir()
    with workspace_lock(new, timeout=1):
        assert stat.S_IMODE((new / LOCK_FILE).stat().st_mode) == PRIVATE_MODE


def test_the_error_line_and_the_failure_tag_hold_no_credentials(tmp_path, mlflow_state):
    error = DataError(f"could not fetch https://trainer:{SECRET}@example.com/fashion-mnist")
    assert describe(error) == "could not fetch https://***@example.com/fashion-mnist"
    connect(pipeline_for(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    run = mlflow.start_run()
    end_run_with_failure(run.info.run_id, error)
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags[FAILURE_TAG] == "DataError: could not fetch https://***@example.com/fashion-mnist"


def test_no_log_line_shows_a_urls_credentials_whoever_logs_it():
    script = (
        "import logging; from ddpm.logs import configure_logging; configure_logging(); "
        f"logging.getLogger('urllib3').warning('retrying %s', 'http://trainer:{SECRET}@host/api')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "WARNING urllib3: retrying http://***@host/api" in result.stderr
    assert SECRET not in result.stderr


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server with the user `trainer`; yields its work directory and URI."""
    from mlflow.server.auth.client import AuthServiceClient

    tmp = tmp_path_factory.mktemp("mlflow-secrets")
    process, uri = servers.start_mlflow_basic_auth(tmp)
    saved = {key: os.environ.get(key) for key in CREDENTIAL_VARS}
    try:
        os.environ.update(zip(CREDENTIAL_VARS, servers.MLFLOW_ADMIN, strict=True))
        AuthServiceClient(uri).create_user(*TRAINER)
        yield tmp, uri
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
        servers.stop(process)


def with_credentials(uri: str, user: str, password: str) -> str:
    return uri.replace("http://", f"http://{user}:{password}@")


def stage_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in CREDENTIAL_VARS}


def files_holding(root: Path, secret: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and secret in path.read_bytes()]


@pytest.mark.integration
@pytest.mark.slow
def test_a_stage_trains_with_credentials_in_the_uri_and_shows_them_nowhere(auth_server, project):
    server_dir, uri = auth_server
    result = run(
        [sys.executable, "-m", "flows.stages", "train"],
        project,
        {**stage_env(), "MLFLOW_TRACKING_URI": with_credentials(uri, *TRAINER)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    admin = MlflowClient(uri)
    os.environ.update(zip(CREDENTIAL_VARS, servers.MLFLOW_ADMIN, strict=True))  # the fixture restores them
    experiment = admin.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (training,) = admin.search_runs([experiment.experiment_id])
    assert training.info.status == "FINISHED"
    assert training.data.tags["mlflow.user"] == TRAINER[0]  # sent as basic auth: the server knows who
    shown = json.dumps([training.data.tags, training.data.params])
    assert SECRET not in shown
    assert files_holding(project, SECRET.encode()) == []  # checkpoints, outputs/, the lock record
    assert files_holding(server_dir / "artifacts", SECRET.encode()) == []  # the logged model and sample grids
    assert SECRET.encode() not in (server_dir / "mlflow.db").read_bytes()  # tags, params, metrics
    assert stat.S_IMODE((project / LOCK_FILE).stat().st_mode) == PRIVATE_MODE


@pytest.mark.integration
@pytest.mark.slow
def test_a_wrong_password_in_the_uri_exits_2_with_one_line_without_it(auth_server, project):
    _, uri = auth_server
    wrong = "not-" + SECRET
    result = run(
        [sys.executable, "-m", "flows.stages", "train"],
        project,
        {**stage_env(), "MLFLOW_TRACKING_URI": with_credentials(uri, TRAINER[0], wrong)},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"the tracking server {uri} refused the credentials (user 'trainer')" in errors[0]
    assert wrong not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (project / "checkpoints").exists()
