from pathlib import Path

import pytest
import yaml

from ddpm import config as ddpm_config
from ddpm.config import ConfigError
from flows.config import PIPELINE_SECTIONS, flatten, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_has_both_halves():
    config, pipeline = load_params(ROOT / "params.yaml", {"train.epochs": 1, "tracking.log_every": 5})
    assert config.train.epochs == 1 and pipeline.tracking.log_every == 5
    assert pipeline.registry.model_name == "ddpm-fashion-mnist" and pipeline.tracking.experiment == "ddpm-fashion-mnist"
    assert set(PIPELINE_SECTIONS) == set(ddpm_config.PIPELINE_SECTIONS)


def test_one_error_lists_bad_fields_of_both_halves():
    with pytest.raises(ConfigError) as info:
        params_from_dict(
            {"tracking": {"log_every": 0, "colour": "red"}, "train": {"lr": "fast"}},
            {"registry.model_name": None, "model.dim": 3},
        )
    text = str(info.value)
    for fragment in (
        "tracking.log_every: must be >= 1",
        "tracking.colour: unknown key",
        "train.lr: expected float",
        "registry.model_name",
        "model.dim: must be even",
    ):
        assert fragment in text


def test_environment_overrides_service_addresses(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    _, pipeline = params_from_dict({"tracking": {"uri": "sqlite:///a.db"}, "fetch": {"remote": "local"}})
    assert pipeline.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'a.db'}" and pipeline.dvc_remote == "local"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DDPM_DVC_REMOTE", "s3remote")
    assert pipeline.tracking_uri == "http://127.0.0.1:5000" and pipeline.dvc_remote == "s3remote"


def test_flatten():
    assert flatten({"train": {"lr": 1, "x": {"y": 2}}, "a": 3}) == {"train.lr": 1, "train.x.y": 2, "a": 3}


def test_unreadable_params_are_a_config_error_not_a_traceback(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad_yaml)
    not_sections = tmp_path / "list.yaml"
    not_sections.write_text("- train\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(not_sections)
    with pytest.raises(ConfigError) as info:
        params_from_dict({"tracking": "http://x", "workspace": {"lock_timeout": -1}})
    assert "tracking: must be a mapping" in str(info.value) and "workspace.lock_timeout: must be >= 0" in str(
        info.value
    )


def test_a_relative_sqlite_store_is_the_checkouts_even_in_a_dvc_temporary_copy(monkeypatch, tmp_path):
    """DVC runs queued and --temp experiments in a copy of the checkout, deleted afterwards, with
    DVC_ROOT naming the original: their runs and models must land in the original's store."""
    copy = tmp_path / "checkout" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "checkout"))
    _, pipeline = params_from_dict({"tracking": {"uri": "sqlite:///mlflow.db"}})
    assert pipeline.tracking_uri == f"sqlite:///{(tmp_path / 'checkout').resolve() / 'mlflow.db'}"
    _, absolute = params_from_dict({"tracking": {"uri": "sqlite:////srv/mlflow.db"}})
    assert absolute.tracking_uri == "sqlite:////srv/mlflow.db"


@pytest.mark.parametrize("directory", [".", "", "./", "..", str(ROOT), "checkpoints/../.."])
def test_a_checkpoint_dir_that_is_the_checkout_or_holds_it_is_refused(directory):
    with pytest.raises(ConfigError, match=r"train\.checkpoint_dir: .* is the checkout"):
        load_params(ROOT / "params.yaml", {"train.checkpoint_dir": directory}, repo=ROOT)


def test_a_checkpoint_dir_of_its_own_is_accepted(tmp_path):
    for directory in ("checkpoints", "runs/a", str(tmp_path / "elsewhere")):
        config, _ = load_params(ROOT / "params.yaml", {"train.checkpoint_dir": directory}, repo=ROOT)
        assert config.train.checkpoint_dir == directory


# The quick start's budget (docs/quality.md): everything else is params.yaml's, kept in step by this test.
QUICKSTART_CHANGES = {
    "data.limit",
    "train.epochs",
    "train.warmup_steps",
    "train.ema_decay",
    "diffusion.prediction",  # v wins at 30,000 images; after an hour it trades FID for class balance
    "sample.sampler",
    "sample.steps",
    "evaluate.fid_samples",
}


def test_the_quick_start_is_params_yaml_with_a_smaller_budget():
    defaults = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    quick = flatten(yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()))
    assert quick.keys() == defaults.keys(), "configs/quickstart.yaml lacks or adds keys: copy them from params.yaml"
    changed = {key for key in defaults if quick[key] != defaults[key]}
    assert changed == QUICKSTART_CHANGES, "configs/quickstart.yaml must differ from params.yaml only in its budget"
    config, _ = load_params(ROOT / "configs" / "quickstart.yaml")
    assert config.train.epochs == 1 and config.sample.sampler == "dpmpp_2m"
