"""The promotion gate under faults, against a real MLflow registry (SQLite store): a failed read of the
champion, a champion deleted by hand, two promotions at once; and the record each decision leaves."""

from __future__ import annotations

import threading

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE

from flows.errors import RegistrationError
from flows.gate import promote
from tests.test_registry import REGISTRY, ROOT, add_evaluated_model, champion

HANDSHAKE_TIMEOUT = 120  # seconds a promotion thread waits for the other; only a hang reaches it


@pytest.fixture
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for flows.promote, which connects itself
    mlflow.set_tracking_uri(uri)  # put back after the test by tests/conftest.py's autouse fixture
    return MlflowClient()


def record(client, version: str) -> dict[str, str]:
    tags = client.get_model_version(REGISTRY.model_name, version).tags
    return {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}


def fail_champion_reads_once(monkeypatch, error: MlflowException) -> list[str]:
    """Simulated: the next read of the champion alias raises `error`, however the gate reads it (the
    registered model's alias list, or the alias itself); every other call reaches the real store."""
    failed: list[str] = []

    def once(method_name: str):
        real = getattr(MlflowClient, method_name)

        def read(self, name, *args, **kwargs):
            reads_champion = method_name == "get_registered_model" or args[:1] == (REGISTRY.champion_alias,)
            if reads_champion and not failed:
                failed.append(method_name)
                raise error
            return real(self, name, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, method_name, read)

    once("get_registered_model")
    once("get_model_version_by_alias")
    return failed


@pytest.mark.parametrize(
    "error",
    [
        MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE),
        MlflowException("API request failed with error code 503", error_code=INTERNAL_ERROR),
        MlflowException("Permission denied", error_code=PERMISSION_DENIED),
    ],
    ids=["busy-store", "5xx", "403"],
)
def test_one_failed_read_of_the_champion_refuses_and_keeps_it(client, monkeypatch, error):
    v1 = add_evaluated_model(client, 30.0)
    assert promote(REGISTRY).promoted and champion(client) == v1
    v2 = add_evaluated_model(client, 99.0)
    failed = fail_champion_reads_once(monkeypatch, error)
    with pytest.raises(RegistrationError, match=f"reading @champion of gate-test failed \\({error.error_code}"):
        promote(REGISTRY)
    assert failed and champion(client) == v1 and "passed" not in record(client, v2)


def test_the_promote_command_exits_2_naming_the_failed_read(mlflow_state, client, monkeypatch, tmp_path, caplog):
    from flows.promote import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["registry"]["model_name"] = REGISTRY.model_name
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    v1 = add_evaluated_model(client, 30.0)
    assert main(["--params", str(tmp_path / "params.yaml")]) == 0 and champion(client) == v1
    add_evaluated_model(client, 99.0)
    fail_champion_reads_once(monkeypatch, MlflowException("Permission denied", error_code=PERMISSION_DENIED))
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "reading @champion of gate-test failed (PERMISSION_DENIED: Permission denied)" in caplog.text
    assert champion(client) == v1


def test_a_missing_alias_is_no_champion(client):
    """The one answer that means "no champion": the alias is not on the registered model."""
    v1 = add_evaluated_model(client, 30.0)
    first = promote(REGISTRY)
    assert first.promoted and first.previous_champion is None and champion(client) == v1


def test_with_the_champion_deleted_the_gate_compares_with_the_best_version_left(client):
    v1 = add_evaluated_model(client, 35.0)
    assert promote(REGISTRY).promoted
    v2 = add_evaluated_model(client, 30.0)
    assert promote(REGISTRY).promoted and champion(client) == v2
    client.delete_model_version(REGISTRY.model_name, v2)  # by hand, in the UI: the alias goes with it
    v3 = add_evaluated_model(client, 80.0)
    worse = promote(REGISTRY)
    assert (
        not worse.promoted and REGISTRY.champion_alias not in client.get_registered_model(REGISTRY.model_name).aliases
    )
    assert worse.reason == (
        f"refused: there is no champion; v{v3} has fid=80, the best scored version still registered, v{v1}, "
        "has fid=35; lower is better"
    )
    v4 = add_evaluated_model(client, 33.0)
    better = promote(REGISTRY)
    assert better.promoted and champion(client) == v4
    assert f"there was no champion, and it beats the best scored version still registered, v{v1} (35)" in better.reason
    assert record(client, v4)["compared_with"] == f"v{v1}" and record(client, v4)["previous_champion"] == "none"


def test_with_no_champion_and_only_versions_scored_otherwise_the_gate_refuses(client):
    v1 = add_evaluated_model(client, 35.0)
    assert promote(REGISTRY).promoted
    client.delete_registered_model_alias(REGISTRY.model_name, REGISTRY.champion_alias)
    v2 = add_evaluated_model(client, 10.0, fid_samples=200)
    decision = promote(REGISTRY)
    assert (
        not decision.promoted and f"scored versions still registered (v{v1}) were scored differently" in decision.reason
    )
    assert "fid_samples 200 vs 2000" in decision.reason and record(client, v2)["decision"] == "refused"


def test_two_promotions_at_once_end_on_the_best(client, monkeypatch):
    """Both read champion v1 (fid 40) before either moves it, and v3's (fid 35) move lands after v2's
    (fid 30) promotion has finished: once unserialised, v3 ended as champion."""
    v1 = add_evaluated_model(client, 40.0)
    assert promote(REGISTRY).promoted
    v2, v3 = add_evaluated_model(client, 30.0), add_evaluated_model(client, 35.0)
    both_about_to_move = threading.Barrier(2, timeout=HANDSHAKE_TIMEOUT)
    v2_finished = threading.Event()
    moved: set[str] = set()
    real_move = MlflowClient.set_registered_model_alias

    def move(self, name, alias, version):
        thread = threading.current_thread().name
        if alias == REGISTRY.champion_alias and thread not in moved:
            moved.add(thread)
            both_about_to_move.wait()  # both have read the champion and passed the gate against v1
            if thread == f"v{v3}":
                assert v2_finished.wait(HANDSHAKE_TIMEOUT)
        return real_move(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", move)
    decisions = promote_at_once(v2, v3, v2_finished)
    assert champion(client) == v2
    assert decisions[v2].promoted and decisions[v2].previous_champion == str(v1)
    assert not decisions[v3].promoted and decisions[v3].reason.startswith(f"outranked: v{v3} passed the gate")
    assert f"settled on v{v2}, fid=30" in decisions[v3].reason
    assert record(client, v2)["decision"] == "promoted" and record(client, v3)["decision"] == "outranked"


def test_each_decision_leaves_a_record_on_the_version_searchable_and_without_secrets(client, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    v1 = add_evaluated_model(client, 40.0)
    assert promote(REGISTRY).promoted
    v2 = add_evaluated_model(client, 30.0)
    assert promote(REGISTRY).promoted
    v3 = add_evaluated_model(client, 35.0)
    assert not promote(REGISTRY).promoted

    promoted = record(client, v2)
    assert {k: promoted[k] for k in ("decision", "metric", "value", "compared_with", "compared_value")} == {
        "decision": "promoted",
        "metric": "fid",
        "value": "30",
        "compared_with": f"v{v1}",
        "compared_value": "40",
    }
    assert promoted["previous_champion"] == f"v{v1}" and promoted["passed"] == "true"
    assert promoted["user"].startswith("alice@") and promoted["time"].endswith("+00:00")
    assert promoted["reason"] == f"v{v2} fid=30 beats champion v{v1} (40)"
    refused = record(client, v3)
    assert refused["decision"] == "refused" and refused["compared_with"] == f"v{v2}" and "passed" not in refused
    assert refused["reason"] == f"refused: v{v3} has fid=35, champion v{v2} has fid=30; lower is better"

    found = client.search_model_versions(f"name = '{REGISTRY.model_name}' and tags.`promotion.decision` = 'promoted'")
    assert sorted(v.version for v in found) == sorted([int(v1), int(v2)])
    every_value = [v for version in (v1, v2, v3) for v in record(client, version).values()]
    assert not any("s3cret" in value for value in every_value)

    assert not promote(REGISTRY, v1).promoted  # v1 passed once: a refusal now leaves its record as it was
    assert record(client, v1)["decision"] == "promoted" and record(client, v1)["passed"] == "true"


def test_a_move_that_lands_after_the_better_promotion_finished_is_undone_by_its_own_check(client, monkeypatch):
    """The lost update: v3's promotion reads the passed versions before v2's is tagged, so it moves the
    alias to v3, and that move lands after v2's promotion has moved it to v2 and returned; v3's
    promotion checks after its move, finds v2 passed and better, and moves it back."""
    add_evaluated_model(client, 40.0)
    assert promote(REGISTRY).promoted
    v2, v3 = add_evaluated_model(client, 30.0), add_evaluated_model(client, 35.0)
    v3_about_to_move, v2_finished = threading.Event(), threading.Event()
    real_move, real_tag = MlflowClient.set_registered_model_alias, MlflowClient.set_model_version_tag
    moves: list[tuple[str, str]] = []

    def move(self, name, alias, version):
        thread = threading.current_thread().name
        if thread == f"v{v3}" and not moves:  # v3's first move, computed without v2's record
            moves.append((thread, str(version)))
            v3_about_to_move.set()
            assert v2_finished.wait(HANDSHAKE_TIMEOUT)
        else:
            moves.append((thread, str(version)))
        return real_move(self, name, alias, version)

    def tag(self, name, version, key, value):
        if key == "promotion.passed" and threading.current_thread().name == f"v{v2}":
            assert v3_about_to_move.wait(HANDSHAKE_TIMEOUT)  # v2 passes only once v3 has read the passed ones
        return real_tag(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", move)
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tag)
    decisions = promote_at_once(v2, v3, v2_finished)
    v2_name, v3_name = f"v{v2}", f"v{v3}"
    assert moves == [(v3_name, str(v3)), (v2_name, str(v2)), (v3_name, str(v2))]  # v3's move undone by v3
    assert champion(client) == v2 and decisions[v2].promoted and not decisions[v3].promoted


def promote_at_once(v2: str, v3: str, v2_finished: threading.Event) -> dict:
    """Promote v2 and v3 from two threads named after them (the patched registry calls tell them
    apart by name); each one's Decision. `v2_finished` is set when v2's promotion returns."""
    decisions = {}

    def run(version: str) -> None:
        try:
            decisions[version] = promote(REGISTRY, version)
        finally:
            if version == v2:
                v2_finished.set()

    threads = [threading.Thread(target=run, args=(v,), name=f"v{v}") for v in (v2, v3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return decisions
