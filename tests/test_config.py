import dataclasses
from pathlib import Path

import pytest

from ddpm.config import (
    ClassifierConfig,
    Config,
    ConfigError,
    TrainConfig,
    build_config,
    config_from_dict,
    load_config,
    parse_sets,
)
from ddpm.params_file import read_params, yaml_problem_kind

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
        ({"train": {"adam_beta2": 1.0}}, {}, "train.adam_beta2: must be in (0, 1)"),
        ({"diffusion": {"sigmoid_bias": float("nan")}}, {}, "diffusion.sigmoid_bias: must be a finite number"),
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


def test_build_config_returns_the_errors_as_data_and_no_config():
    errors, config = build_config(Config, {"train": {"lr": "fast"}, "nosuch": {}}, {"x": 1}, {"nosuch": "a.yaml"})
    assert config is None
    assert errors[0] == "override 'x': expected section.key=value"
    assert errors[1].startswith("nosuch: unknown section in a.yaml (known: data, model,")
    assert errors[2:] == ["train.lr: expected float, got 'fast'"]
    assert build_config(Config, {"train": {"epochs": 2}}) == ([], Config(train=TrainConfig(epochs=2)))
    errors, config = build_config(Config, {"sample": {"steps": 500}})  # across sections, once each section is valid
    assert config is None and errors == ["sample.steps: 500 exceeds diffusion.timesteps 200"]


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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_an_overlay_chain_merges_onto_its_bases_key_by_key(tmp_path):
    write(tmp_path / "params.yaml", "train: {epochs: 7, lr: 0.002}\nmodel: {dim: 16, dim_mults: [1, 2, 4]}\n")
    write(tmp_path / "configs" / "small.yaml", "extends: ../params.yaml\nmodel: {dim_mults: [1, 2]}\n")
    top = write(tmp_path / "configs" / "runs" / "one.yaml", "extends: ../small.yaml\ntrain: {epochs: 1}\n")
    config = load_config(top)
    assert (config.train.epochs, config.train.lr) == (1, 0.002)  # the top's key, the root's beside it
    assert (config.model.dim, config.model.dim_mults) == (16, (1, 2))  # a list is replaced, not merged
    assert read_params(top).sections == {
        "train": {"epochs": 1, "lr": 0.002},
        "model": {"dim": 16, "dim_mults": [1, 2]},
    }


def test_a_missing_base_names_the_overlay_and_the_path(tmp_path):
    overlay = write(tmp_path / "configs" / "q.yaml", "extends: ../nope.yaml\ntrain: {epochs: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(overlay)
    assert (
        str(info.value)
        == f"{overlay}: `extends: ../nope.yaml` names params file not found: {overlay.parent / '../nope.yaml'}"
    )


@pytest.mark.parametrize("extends", ["[a.yaml]", "''", "3"])
def test_extends_must_be_a_path(tmp_path, extends):
    overlay = write(tmp_path / "q.yaml", f"extends: {extends}\n")
    with pytest.raises(ConfigError, match="`extends` must be the path of the params file this one changes"):
        load_config(overlay)


def test_an_extends_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: ./a.yaml\n")
    with pytest.raises(ConfigError, match="`extends` loops back to"):
        load_config(tmp_path / "a.yaml")


def test_an_unknown_key_is_named_with_the_file_it_came_from(tmp_path):
    write(tmp_path / "params.yaml", "train: {epochs: 7, colour: red}\n")
    overlay = write(tmp_path / "q.yaml", "extends: params.yaml\ntrain: {epochs: 1, bogus: 2}\nnosuch: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(overlay, {"train.other": 3})
    text = str(info.value)
    assert f"train.bogus: unknown key in {overlay} (known:" in text
    assert f"train.colour: unknown key in {tmp_path / 'params.yaml'} (known:" in text
    assert f"nosuch: unknown section in {overlay} (known:" in text
    assert "train.other: unknown key (known:" in text  # an override's, in no file


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
CREDENTIALS = {  # files a user may pass as params by mistake, each holding SECRET
    "aws-ini": f"[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {SECRET}\n",
    "dotenv": f"AWS_SECRET_ACCESS_KEY={SECRET}\nOTHER=1\n",
    "yaml-alias": f"token: *{SECRET}\n",
    "yaml-tag": f"token: !{SECRET}'x 1\n",
    "quoted": f'token: "\\q{SECRET}"\n',
    "flow": f"{{token: {SECRET}\n",
    "tabs": f"token:\n\t{SECRET}\n",
    "mapping": f"password: {SECRET}\ntracking: {SECRET}\n",
    "json": f'{{"{SECRET}": {{"auth": "x"}}}}',  # the secret as a key: the file holds no section, no key is named
}


@pytest.mark.parametrize("name", CREDENTIALS)
def test_a_credentials_file_as_params_is_an_error_that_never_quotes_it(tmp_path, name):
    path = write(tmp_path / name, CREDENTIALS[name])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in str(info.value) and SECRET[:8] not in str(info.value)
    assert str(path) in str(info.value)


def test_yaml_errors_say_where_and_what_kind_only(tmp_path):
    ini = write(tmp_path / "credentials", CREDENTIALS["aws-ini"])
    with pytest.raises(ConfigError) as info:
        load_config(ini)
    assert (
        str(info.value)
        == f"{ini}: not valid YAML at line 2, column 1 (expected '<document start>', but found '<scalar>')"
    )
    alias = write(tmp_path / "alias.yaml", CREDENTIALS["yaml-alias"])
    with pytest.raises(ConfigError) as info:
        load_config(alias)
    assert str(info.value) == f"{alias}: not valid YAML at line 1, column 8 (found undefined alias)"
    binary = tmp_path / "key.der"
    binary.write_bytes(b"train:\n  x: \xff\xfe" + SECRET.encode())
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert str(info.value) == f"{binary}: not valid YAML at line 2, column 6 (not UTF-8 text)"
    control = write(tmp_path / "control.yaml", f"train:\n  x: \x00{SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_config(control)
    assert str(info.value) == f"{control}: not valid YAML at line 2, column 6 (a character YAML does not allow)"
    json = write(tmp_path / "config.json", CREDENTIALS["json"])
    with pytest.raises(ConfigError) as info:
        load_config(json)
    assert str(info.value).startswith(f"{json}: not a params file (none of its top-level keys is data, model,")
    scalar = write(tmp_path / "env", CREDENTIALS["dotenv"])
    with pytest.raises(ConfigError) as info:
        load_config(scalar)
    assert str(info.value) == f"{scalar}: top level must be a mapping of sections, got a str"


@pytest.mark.parametrize(
    "problem, kind",
    [
        ("expected ',' or '}', but got '<stream end>'", "expected ',' or '}', but got '<stream end>'"),
        ("found undefined alias 'hunter2'", "found undefined alias"),
        ("could not determine a constructor for the tag '!a'b'", "could not determine a constructor for the tag"),
        ('found unknown escape character "\'"', "found unknown escape character"),
        ("found character '\\t' that cannot start any token", "found character that cannot start any token"),
        ("found unknown escape character 'q'", "found unknown escape character"),
        ("expected ' ', but found 'ab'", "expected ' ', but found"),
        ("mapping values are not allowed here", "mapping values are not allowed here"),
        (None, "unreadable"),
    ],
)
def test_yaml_problem_kind_keeps_pyyamls_words_and_tokens_only(problem, kind):
    assert yaml_problem_kind(problem) == kind


def test_a_credentials_file_given_to_ddpm_train_exits_2_without_its_content(tmp_path, capsys, caplog):
    from ddpm.__main__ import main

    for name, text in CREDENTIALS.items():
        path = write(tmp_path / name, text)
        assert main(["train", "--params", str(path)]) == 2, name
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err + caplog.text
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == len(CREDENTIALS)
