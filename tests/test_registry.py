"""The promotion gate against a real MLflow registry (SQLite store): FID, lower is better."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from ddpm.config import ConfigError, parse_sets
from flows.config import RegistryConfig, load_params
from flows.gate import promote
from flows.registry import register_model

ROOT = Path(__file__).resolve().parents[1]

REGISTRY = RegistryConfig(model_name="gate-test")


@pytest.fixture
def client(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # put back after the test (tests/conftest.py)
    return MlflowClient()


def add_version(client, fid=None, metric="fid") -> str:
    """A registered version whose run carries `fid`, aliased @candidate like the pipeline does."""
    if not client.search_registered_models(f"name='{REGISTRY.model_name}'"):
        client.create_registered_model(REGISTRY.model_name)
    with mlflow.start_run() as run:
        if fid is not None:
            mlflow.log_metric(metric, fid)
    version = client.create_model_version(
        REGISTRY.model_name, f"{run.info.artifact_uri}/model", run.info.run_id
    ).version
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
    assert not worse.promoted and worse.version == str(v2) and champion(client) == v1
    assert worse.reason == f"refused: v{v2} has fid=35.5, champion v{v1} has fid=30; lower is better"

    add_version(client, 30.0)
    assert not promote(REGISTRY).promoted and champion(client) == v1  # a tie is not an improvement

    v4 = add_version(client, 25.0)
    better = promote(REGISTRY)
    assert better.promoted and better.previous_champion == str(v1) and champion(client) == v4
    assert not promote(REGISTRY, v4).promoted  # already champion


def test_explicit_version_and_greater_is_better(client):
    registry = RegistryConfig(model_name=REGISTRY.model_name, metric="score", greater_is_better=True)
    v1 = add_version(client, 30.0, "score")
    add_version(client, 10.0, "score")
    assert promote(registry, v1).promoted
    assert not promote(registry).promoted and champion(client) == v1  # 10 < 30 and higher is better


def test_version_without_the_metric_is_an_error(client):
    add_version(client, None)
    with pytest.raises(mlflow.exceptions.MlflowException, match="no metric 'fid'"):
        promote(REGISTRY)


def test_version_with_a_nan_metric_is_an_error_even_without_a_champion(client):
    add_version(client, float("nan"))
    with pytest.raises(mlflow.exceptions.MlflowException, match="finite values only"):
        promote(REGISTRY)
    assert REGISTRY.champion_alias not in client.get_registered_model(REGISTRY.model_name).aliases


@pytest.mark.parametrize(
    "override, named",
    [
        ("registry.candidate_alias=champion", "must differ from champion_alias"),
        ("registry.candidate_alias=Champion", "must differ from champion_alias"),
        ("registry.champion_alias=candidate", "must differ from champion_alias"),
        ("registry.candidate_alias=''", "registry.candidate_alias: MLflow aliases are 1-255"),
        ("registry.champion_alias=latest", "registry.champion_alias: MLflow aliases"),
        ("registry.greater_is_better=true", "fid is lower-is-better"),
    ],
)
def test_params_that_would_bypass_the_gate_are_refused(override, named):
    with pytest.raises(ConfigError, match=named):
        load_params(ROOT / "params.yaml", parse_sets([override]))


def test_gate_cannot_be_bypassed_by_aliasing_candidates_as_champion(client, tmp_path):
    """Built around the config check, the same settings still cannot move @champion: registration and
    promotion refuse them before touching the registry."""
    bypass = RegistryConfig(model_name=REGISTRY.model_name, candidate_alias="champion")
    v1 = add_version(client, 30.0)
    assert promote(REGISTRY).promoted
    add_version(client, 99.0)  # worse
    with pytest.raises(ConfigError, match="must differ from champion_alias"):
        register_model("no-run", "no-model", bypass)
    with pytest.raises(ConfigError, match="must differ from champion_alias"):
        promote(bypass)
    assert champion(client) == v1 and len(client.search_model_versions(f"name='{REGISTRY.model_name}'")) == 2


def test_promote_command_refuses_a_bypassing_params_file(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["registry"]["candidate_alias"] = params["registry"]["champion_alias"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "flows.promote", "--params", "params.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "must differ from champion_alias" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "mlflow.db").exists()


def add_evaluated_model(client, fid: float, **measured) -> str:
    """A version registered from a logged model carrying its evaluation, as the pipeline registers them."""
    from flows.steps import MEASURED_PREFIX

    if not client.search_registered_models(f"name='{REGISTRY.model_name}'"):
        client.create_registered_model(REGISTRY.model_name)
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
        mlflow.log_metrics({"fid": fid, "fid_floor": 5.18}, model_id=model.model_id)
    client.set_logged_model_tags(
        model.model_id,
        {MEASURED_PREFIX + k: str(v) for k, v in {"fid_samples": 2000, "sampler": "ddim-50", **measured}.items()},
    )
    version = client.create_model_version(
        REGISTRY.model_name, f"models:/{model.model_id}", run.info.run_id, model_id=model.model_id
    ).version
    client.set_registered_model_alias(REGISTRY.model_name, REGISTRY.candidate_alias, version)
    return version


def test_the_gate_reads_the_logged_models_scores_and_refuses_fids_measured_differently(client):
    v1 = add_evaluated_model(client, 40.0)
    assert promote(REGISTRY).promoted and champion(client) == v1
    add_evaluated_model(client, 10.0, fid_samples=200)  # better on paper, but on 200 samples
    decision = promote(REGISTRY)
    assert not decision.promoted and champion(client) == v1
    assert "scored differently (fid_samples 200 vs 2000)" in decision.reason and "do not compare" in decision.reason
    v3 = add_evaluated_model(client, 30.0)  # measured the same way, and better
    assert promote(REGISTRY).promoted and champion(client) == v3


def test_the_sampler_and_its_steps_are_part_of_how_a_fid_was_measured(client):
    v1 = add_evaluated_model(client, 40.0)  # DDIM-50
    assert promote(REGISTRY).promoted and champion(client) == v1
    add_evaluated_model(client, 10.0, sampler="ddim-20")  # better on paper, with fewer steps
    fewer_steps = promote(REGISTRY)
    assert not fewer_steps.promoted and champion(client) == v1
    assert "scored differently (sampler ddim-20 vs ddim-50)" in fewer_steps.reason
    add_evaluated_model(client, 10.0, sampler="ddpm-200")  # the full chain
    other_sampler = promote(REGISTRY)
    assert not other_sampler.promoted and champion(client) == v1
    assert "scored differently (sampler ddpm-200 vs ddim-50)" in other_sampler.reason


def test_a_registered_version_carries_its_card_as_description(client):
    """The version page shows what the version is: score, how it was measured, what trained it."""
    from ddpm.config import config_from_dict
    from flows.steps import MEASURED_PREFIX
    from flows.steps.evaluate import measurement

    with mlflow.start_run(tags={"git_commit": "0123abc"}) as run:  # what the train step logs
        mlflow.log_metric("images_seen", 480_000, step=30_000)
        model = mlflow.initialize_logged_model(name="model")
    mlflow.log_metrics(
        {"fid": 72.91, "fid_floor": 5.18, "fid_ratio": 14.075, "classifier_accuracy": 0.9205},
        run_id=run.info.run_id,
        model_id=model.model_id,
    )  # what the evaluate step logs
    how = measurement(
        config_from_dict(
            {"evaluate": {"fid_samples": 2000, "seed": 0}, "sample": {"sampler": "ddim", "steps": 50, "eta": 1.0}}
        )
    )
    client.set_logged_model_tags(model.model_id, {MEASURED_PREFIX + k: v for k, v in how.items()})

    registration = register_model(run.info.run_id, model.model_id, REGISTRY)
    card = client.get_model_version(REGISTRY.model_name, registration.version).description
    assert card == (
        "**FID 72.91** (floor 5.18, ratio 14.1) on N = 2000 samples\n\n"
        "- sampler: DDIM, 50 steps, eta 1, clip_x0 True, seed 0\n"
        "- images seen: 480,000\n"
        "- classifier accuracy: 92.05% (the FID feature network)\n"
        "- commit: 0123abc\n"
        f"- run: {run.info.run_id}"
    )
    again = register_model(run.info.run_id, model.model_id, REGISTRY)  # a rerun finds the version it made
    assert again.version == registration.version
    assert client.get_model_version(REGISTRY.model_name, again.version).description == card

    with mlflow.start_run() as bare:  # registered before any evaluation, from outside the pipeline
        unscored = mlflow.initialize_logged_model(name="model")
    card = client.get_model_version(
        REGISTRY.model_name, register_model(bare.info.run_id, unscored.model_id, REGISTRY).version
    ).description
    assert card == f"**not evaluated**: its logged model has no fid\n\n- commit: unknown\n- run: {bare.info.run_id}"


SAMPLE_SETTINGS = {"steps": 20, "eta": 0.5}  # T is 200 by default: 20 steps must not read as 200


@pytest.mark.parametrize(
    "sampler, tag, card_line",
    [
        ("ddpm", "ddpm-200", "- sampler: DDPM, 200 steps, clip_x0 True, seed 0"),  # DDPM walks the whole chain
        ("ddim", "ddim-20", "- sampler: DDIM, 20 steps, eta 0.5, clip_x0 True, seed 0"),
        ("dpmpp_2m", "dpmpp_2m-20", "- sampler: DPMPP_2M, 20 steps, clip_x0 True, seed 0"),
    ],
)
def test_the_measurement_records_the_sampler_that_ran_and_the_card_says_so(client, sampler, tag, card_line):
    """Steps as the sampler walks them; eta only for DDIM, the one sampler that draws noise by it."""
    from ddpm.config import config_from_dict
    from flows.steps import MEASURED_PREFIX
    from flows.steps.evaluate import measurement

    how = measurement(config_from_dict({"sample": {"sampler": sampler, **SAMPLE_SETTINGS}}))
    assert how["sampler"] == tag and ("eta" in how) == (sampler == "ddim")
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
    mlflow.log_metrics({"fid": 50.0}, run_id=run.info.run_id, model_id=model.model_id)
    client.set_logged_model_tags(model.model_id, {MEASURED_PREFIX + k: v for k, v in how.items()})
    version = register_model(run.info.run_id, model.model_id, REGISTRY).version
    card = client.get_model_version(REGISTRY.model_name, version).description
    assert card_line in card.splitlines(), card


def test_dpmpp_2m_scored_with_different_steps_do_not_compare(client):
    from ddpm.config import config_from_dict
    from flows.steps.evaluate import measurement

    def how(steps: int) -> dict[str, str]:
        return measurement(config_from_dict({"sample": {"sampler": "dpmpp_2m", "steps": steps}}))

    v1 = add_evaluated_model(client, 40.0, **how(50))
    assert promote(REGISTRY).promoted and champion(client) == v1
    add_evaluated_model(client, 10.0, **how(20))
    decision = promote(REGISTRY)
    assert not decision.promoted and champion(client) == v1
    assert "sampler dpmpp_2m-20 vs dpmpp_2m-50" in decision.reason


def test_a_dpmpp_2m_score_recorded_before_its_steps_were_compares_with_nothing(client):
    """Before issue 30 the evaluate step recorded DPM-Solver++(2M) as dpmpp_2m-T whatever its steps (and an
    eta for every sampler): two such records may hide 20 and 50 steps, so they never compare."""
    old = {"sampler": "dpmpp_2m-200", "eta": "0", "clip_x0": "True", "seed": "0"}
    v1 = add_evaluated_model(client, 40.0, **old)
    assert promote(REGISTRY).promoted and champion(client) == v1
    add_evaluated_model(client, 10.0, **old)
    decision = promote(REGISTRY)
    assert not decision.promoted and champion(client) == v1
    assert "sampler dpmpp_2m-unrecorded vs dpmpp_2m-unrecorded" in decision.reason
    from flows.registry import model_card

    assert "- sampler: DPMPP_2M, unrecorded steps, clip_x0 True, seed 0" in model_card(client, REGISTRY.model_name, v1)


@pytest.mark.parametrize(
    "sampler, recorded, scored_again",
    [
        ("dpmpp_2m", "dpmpp_2m-200", ["sampler dpmpp_2m-unrecorded vs dpmpp_2m-200"]),  # its steps are unknown
        ("ddim", "ddim-200", []),  # DDIM's steps were recorded right
        ("ddpm", "ddpm-200", []),  # so were DDPM's, whose eta never acted
    ],
)
def test_a_rerun_scores_again_only_an_evaluation_recorded_wrongly_before(sampler, recorded, scored_again):
    """The evaluate step's `skip_done` on a record written before issue 30 (eta for every sampler), asked
    for 200 steps (T), the one step count the old dpmpp_2m tag could be mistaken for."""
    from ddpm.config import config_from_dict
    from flows.steps.evaluate import remeasure_reasons

    config = config_from_dict({"sample": {"sampler": sampler, "steps": 200}})
    old = {"fid_samples": "2000", "seed": "0", "sampler": recorded, "eta": "0", "clip_x0": "True"}
    assert remeasure_reasons(config, old) == scored_again
