"""Integration: the pipeline against `mlflow server` on a real PostgreSQL backend store (loopback)."""

import json
import sys

import pytest
import sqlalchemy
from mlflow import MlflowClient

from tests import servers
from tests.test_pipeline import make_project, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def mlflow_on_postgres(tmp_path):
    with servers.mlflow_on_postgres(tmp_path) as running:
        yield running.uri, running.backend


def test_pipeline_tracks_and_registers_on_postgresql(mlflow_on_postgres, tmp_path):
    uri, backend = mlflow_on_postgres
    repo = make_project(tmp_path)
    result = run(
        [sys.executable, "-m", "flows.pipeline", "--set", "train.epochs=1"], repo, {"MLFLOW_TRACKING_URI": uri}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(uri)
    run_ = client.get_run(summary["run_id"])
    assert run_.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate").run_id == run_.info.run_id
    promoted = run([sys.executable, "-m", "flows.promote"], repo, {"MLFLOW_TRACKING_URI": uri})
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert client.get_model_version_by_alias("ddpm-fashion-mnist", "champion").version == summary["version"]
    with sqlalchemy.create_engine(backend).connect() as db:  # it is PostgreSQL that holds them
        assert (
            db.execute(
                sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_.info.run_id}
            ).scalar_one()
            == "FINISHED"
        )
        assert db.execute(sqlalchemy.text("SELECT count(*) FROM model_versions")).scalar_one() == 1
