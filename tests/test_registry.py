"""The promotion gate against a real MLflow registry (SQLite store): FID, lower is better."""
import mlflow
import pytest
from mlflow import MlflowClient

from flows.config import RegistryConfig
from flows.registry import promote

REGISTRY = RegistryConfig(model_name="gate-test")


@pytest.fixture
def client(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield MlflowClient()
    mlflow.set_tracking_uri(None)


def add_version(client, fid=None) -> str:
    """A registered version whose run carries `fid`, aliased @candidate like the pipeline does."""
    if not client.search_registered_models(f"name='{REGISTRY.model_name}'"):
        client.create_registered_model(REGISTRY.model_name)
    with mlflow.start_run() as run:
        if fid is not None:
            mlflow.log_metric("fid", fid)
    version = client.create_model_version(REGISTRY.model_name, f"{run.info.artifact_uri}/model", run.info.run_id).version
    client.set_registered_model_alias(REGISTRY.model_name, REGISTRY.candidate_alias, version)
    return version


def champion(client):
    return client.get_model_version_by_alias(REGISTRY.model_name, REGISTRY.champion_alias).version


def test_gate_is_on_fid_by_default():
    assert REGISTRY.metric == "fid" and not REGISTRY.greater_is_better


def test_gate_promotes_first_refuses_worse_and_equal_promotes_better(client):
    v1 = add_version(client, 30.0)
    first = promote(REGISTRY)
    assert first.promoted and "no champion" in first.reason and champion(client) == v1

    v2 = add_version(client, 35.5)
    worse = promote(REGISTRY)
    assert not worse.promoted and worse.version == v2 and champion(client) == v1
    assert worse.reason == f"refused: v{v2} has fid=35.5, champion v{v1} has fid=30; lower is better"

    add_version(client, 30.0)
    assert not promote(REGISTRY).promoted and champion(client) == v1  # a tie is not an improvement

    v4 = add_version(client, 25.0)
    better = promote(REGISTRY)
    assert better.promoted and better.previous_champion == v1 and champion(client) == v4
    assert not promote(REGISTRY, v4).promoted  # already champion


def test_explicit_version_and_greater_is_better(client):
    registry = RegistryConfig(model_name=REGISTRY.model_name, metric="fid", greater_is_better=True)
    v1 = add_version(client, 30.0)
    add_version(client, 10.0)
    assert promote(registry, v1).promoted
    assert not promote(registry).promoted and champion(client) == v1  # 10 < 30 and higher is better


def test_version_without_the_metric_is_an_error(client):
    add_version(client, None)
    with pytest.raises(mlflow.exceptions.MlflowException, match="no metric 'fid'"):
        promote(REGISTRY)
