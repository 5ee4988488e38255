import dataclasses
from pathlib import Path

import pytest

from ddpm.config import ClassifierConfig, Config, ConfigError, config_from_dict, load_config, parse_sets

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_shipped_params_files_load():
    assert load_config() == Config()
    params = load_config(ROOT / "params.yaml")
    tutorial = load_config(ROOT / "configs" / "tutorial.yaml")
    # params.yaml's network is the tutorial's U-Net at a smaller width
    assert params.model == dataclasses.replace(tutorial.model, dim=16) and tutorial.model.dim == 28
    assert tutorial.diffusion.schedule == "linear" and tutorial.train.ema_decay == 0.0
    assert params.diffusion.schedule == "cosine"
    assert params.evaluate.fid_samples == 2000 and params.classifier == ClassifierConfig()


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        ROOT / "params.yaml", parse_sets(["train.epochs=2", "model.dim_mults=[1, 2]", "data.flip=true"])
    )
    assert config.train.epochs == 2
    assert config.model.dim_mults == (1, 2)
    assert config.data.flip is True


def test_int_is_accepted_where_a_float_is_expected():
    assert config_from_dict({"train": {"lr": 1}}, {"train.lr": 0.5}).train.lr == 0.5


def test_exponent_without_a_dot_is_a_float():
    """PyYAML reads 1e-4 as a string; DVC writes `-S train.lr=1e-7` back as 1e-07."""
    assert config_from_dict({"train": {"lr": "1e-07"}}).train.lr == 1e-7
    assert config_from_dict({}, parse_sets(["train.lr=1e-4"])).train.lr == 1e-4


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"train": {"epochs": 0}}, {}, "train.epochs: must be >= 1"),
        ({"train": {"lr": 2.0}}, {}, "train.lr: must be in (0, 1)"),
        ({"train": {"bogus": 1}}, {}, "train.bogus: unknown key"),
        ({"nosuch": {}}, {}, "nosuch: unknown section"),
        ({"train": {"epochs": "ten"}}, {}, "train.epochs: expected int"),
        ({"train": {"epochs": True}}, {}, "train.epochs: expected int"),
        ({"diffusion": {"schedule": "zigzag"}}, {}, "diffusion.schedule: expected one of"),
        ({"model": {"dim_mults": [1, 2, 4, 8]}}, {}, "not divisible"),
        ({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}, {}, "need 0 < start < end < 1"),
        ({"sample": {"steps": 500}}, {}, "exceeds diffusion.timesteps"),
        ({"evaluate": {"fid_samples": 1}}, {}, "evaluate.fid_samples: must be >= 2"),
        ({"evaluate": {"fid_samples": 20_000}}, {}, "evaluate.fid_samples: the test split has 10,000 images"),
        ({"classifier": {"channels": [8, 16, 32, 64]}}, {}, "classifier.channels: need 1 to 3 positive ints"),
        ({"classifier": {"channels": []}}, {}, "classifier.channels: need 1 to 3 positive ints"),
        ({"classifier": {"lr": 0}}, {}, "classifier.lr: must be in (0, 1)"),
        ({"classifier": {"limit": 10, "batch_size": 16}}, {}, "classifier.limit: 10 gives no full batch of 16"),
        ({"classifier": {"checkpoint": ""}}, {}, "classifier.checkpoint: must not be empty"),
        ({"classifier": {"depth": 3}}, {}, "classifier.depth: unknown key"),
        ({}, {"trainepochs": 2}, "override 'trainepochs': expected section.key=value"),
    ],
)
def test_bad_values_are_errors(raw, overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        config_from_dict(raw, overrides)
    assert message in str(info.value)


def test_every_bad_field_is_listed_in_one_error():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"lr": "fast", "bogus": 1}, "model": {"dim": 3}, "extra": {}}, {"x": 1})
    text = str(info.value)
    for fragment in ("train.lr", "train.bogus", "model.dim", "extra: unknown section", "'x'"):
        assert fragment in text


def test_each_malformed_set_is_named_in_one_error_with_the_other_bad_values():
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, parse_sets(["trainepochs=2", "train.epochs", "train.lr=2.0", "=3", "model.dim=8"]))
    text = str(info.value)
    for key in ("'trainepochs'", "'train.epochs'", "''"):
        assert f"override {key}: expected section.key=value" in text
    assert "train.lr: must be in (0, 1)" in text and "model.dim" not in text


def test_extra_sections_are_left_to_their_reader():
    config = config_from_dict({"registry": {"name": "m"}}, extra_sections={"registry"})
    assert config == Config()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().train.epochs = 3  # type: ignore[misc]  # the assignment this test expects to fail


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_to_dict_round_trips():
    config = load_config(ROOT / "params.yaml")
    assert config_from_dict(config.to_dict()) == config
