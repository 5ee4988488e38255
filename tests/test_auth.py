"""Who can get in: a real `mlflow server --app-name basic-auth` and a real `prefect server start` with
PREFECT_SERVER_API_AUTH_STRING refuse clients without credentials (401), the pipeline's connect() says
which variables to set, and with credentials a run logs, a model version registers and a flow runs."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

from flows.config import params_from_dict
from flows.tracking import TrackingError, connect
from tests import servers

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two servers: 2-4 min on 2 busy cores

ROOT = Path(__file__).resolve().parents[1]
MODEL = "auth-test-model"
TRAINER = ("trainer", "trainer-password")
READER = ("reader", "reader-password")
PREFECT_AUTH = "admin:prefect-test-secret"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One basic-auth server for the module, with users `trainer` and `reader` created by the admin."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    process, uri = servers.start_mlflow_basic_auth(tmp)
    try:
        with credentials(servers.MLFLOW_ADMIN):
            admin = AuthServiceClient(uri)
            for user, password in (TRAINER, READER):
                admin.create_user(user, password)
        yield uri
    finally:
        servers.stop(process)


@contextmanager
def credentials(user: tuple[str, str] | None):
    """MLFLOW_TRACKING_USERNAME/PASSWORD set to `user` (unset for None) inside the block."""
    saved = {key: os.environ.pop(key, None) for key in CREDENTIAL_VARS}
    if user is not None:
        os.environ.update(zip(CREDENTIAL_VARS, user, strict=True))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def pipeline_for(uri: str, experiment: str):
    _, pipeline = params_from_dict({"tracking": {"uri": uri, "experiment": experiment, "connect_timeout": 10.0}})
    return pipeline


def status_of(url: str, auth: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_mlflow_refuses_an_unauthenticated_request_but_answers_health(mlflow_server):
    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status_of(search) == 401
    assert status_of(search, "admin:not-the-password") == 401
    assert status_of(search, ":".join(servers.MLFLOW_ADMIN)) == 200
    assert status_of(f"{mlflow_server}/health") == 200  # what connect() probes, open to load balancers


@pytest.mark.parametrize("user, named", [(None, "none given"), (("trainer", "wrong-password"), "user 'trainer'")])
def test_connect_with_no_or_wrong_credentials_names_the_variables(mlflow_server, mlflow_state, user, named):
    started = time.monotonic()
    with credentials(user), pytest.raises(TrackingError) as refused:
        connect(pipeline_for(mlflow_server, "ddpm-auth-test"))
    message = str(refused.value)
    assert f"the tracking server {mlflow_server} refused the credentials ({named})" in message
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
    assert "wrong-password" not in message
    assert time.monotonic() - started < 10


def test_connect_as_a_user_denied_the_experiment_names_user_and_experiment(mlflow_server, mlflow_state):
    with credentials(TRAINER):
        experiment_id = MlflowClient(mlflow_server).create_experiment("ddpm-auth-denied")
    with credentials(servers.MLFLOW_ADMIN):
        AuthServiceClient(mlflow_server).grant_user_permission(READER[0], "experiment", experiment_id, "DENY")
    with credentials(READER), pytest.raises(TrackingError) as refused:
        connect(pipeline_for(mlflow_server, "ddpm-auth-denied"))
    assert "denies user 'reader' access to experiment 'ddpm-auth-denied'" in str(refused.value)


def test_a_stage_without_credentials_exits_2_with_one_line(mlflow_server, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {key: value for key, value in os.environ.items() if key not in CREDENTIAL_VARS}
    result = subprocess.run(
        [sys.executable, "-m", "flows.stages", "train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "refused the credentials (none given)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def register_version(client: MlflowClient, name: str, run_id: str, artifact_uri: str) -> str:
    """A version of `name` at the run's `model` artifacts, aliased @champion; returns its number."""
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{artifact_uri}/model", run_id=run_id).version
    client.set_registered_model_alias(name, "champion", version)
    return version


def test_a_created_user_logs_a_run_and_registers_a_model_version(mlflow_server, mlflow_state, tmp_path):
    with credentials(TRAINER):
        connect(pipeline_for(mlflow_server, "ddpm-auth-test"))
        with mlflow.start_run() as run:
            mlflow.log_metric("fid", 12.5, step=1)
            (tmp_path / "note.txt").write_text("weights would be here")
            mlflow.log_artifact(str(tmp_path / "note.txt"), "model")  # through the server's artifact proxy
        client = MlflowClient()
        version = register_version(client, "trained-by-trainer", run.info.run_id, run.info.artifact_uri)
        assert client.get_run(run.info.run_id).data.metrics["fid"] == 12.5
        assert client.get_model_version_by_alias("trained-by-trainer", "champion").version == version
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/note.txt"]


def test_only_users_with_edit_on_the_model_can_move_its_champion(mlflow_server):
    """What loading @champion runs is decided by whoever may write the registered model."""
    with credentials(TRAINER):  # its creator, so it holds MANAGE on it
        client = MlflowClient(mlflow_server)
        run = client.create_run(client.create_experiment("ddpm-auth-permissions"))
        version = register_version(client, MODEL, run.info.run_id, run.info.artifact_uri)
    with credentials(READER):  # default_permission = READ: it may load the champion, not change it
        client = MlflowClient(mlflow_server)
        assert client.get_model_version_by_alias(MODEL, "champion").version == version
        for change in (
            lambda: client.set_registered_model_alias(MODEL, "champion", version),
            lambda: client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id),
        ):
            with pytest.raises(MlflowException) as denied:
                change()
            assert denied.value.get_http_status_code() == 403
    with credentials(servers.MLFLOW_ADMIN):
        AuthServiceClient(mlflow_server).grant_user_permission(READER[0], "registered_model", MODEL, "EDIT")
    with credentials(READER):
        client.set_registered_model_alias(MODEL, "candidate", version)
        assert client.get_model_version_by_alias(MODEL, "candidate").version == version


def test_the_admin_changes_its_own_password(mlflow_server):
    user, bootstrap = servers.MLFLOW_ADMIN
    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    with credentials(servers.MLFLOW_ADMIN):
        AuthServiceClient(mlflow_server).update_user_password(
            user, "rotated-admin-password", current_password=bootstrap
        )
    try:
        assert status_of(search, f"{user}:{bootstrap}") == 401
        assert status_of(search, f"{user}:rotated-admin-password") == 200
    finally:
        with credentials((user, "rotated-admin-password")):
            AuthServiceClient(mlflow_server).update_user_password(
                user, bootstrap, current_password="rotated-admin-password"
            )


FLOW = """
from prefect import flow
from prefect.runtime import flow_run


@flow
def hello() -> str:
    return flow_run.id


print(f"FLOW_RUN_ID={hello()}")
"""


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect-auth")
    (tmp / "hello.py").write_text(FLOW)
    process, env = servers.start_prefect_with_auth(tmp, PREFECT_AUTH)
    yield tmp, env
    servers.stop(process)


def run_flow(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    inherited = {key: value for key, value in os.environ.items() if key != "PREFECT_API_AUTH_STRING"}
    return subprocess.run(
        [sys.executable, str(tmp / "hello.py")],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
        env={**inherited, **env},
    )


def test_prefect_refuses_a_client_without_the_auth_string(prefect_server):
    tmp, env = prefect_server
    flows = env["PREFECT_API_URL"] + "/flows/filter"
    assert status_of(flows, body=b"{}") == 401
    assert status_of(flows, "admin:wrong", body=b"{}") == 401
    assert status_of(flows, PREFECT_AUTH, body=b"{}") == 200
    result = run_flow(tmp, env)
    assert result.returncode != 0 and "401 Unauthorized" in result.stderr, result.stderr[-3000:]
    assert "FLOW_RUN_ID" not in result.stdout


def test_prefect_client_with_the_auth_string_runs_a_flow(prefect_server):
    tmp, env = prefect_server
    result = run_flow(tmp, {**env, "PREFECT_API_AUTH_STRING": PREFECT_AUTH})
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("FLOW_RUN_ID=", 1)[1].split()[0]
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/flow_runs/{run_id}",
        headers={"Authorization": "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["state"]["type"] == "COMPLETED"  # recorded by the authenticated server
