import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpm import config as ddpm_config
from ddpm.config import ConfigError
from ddpm.params_file import read_params
from flows.config import (
    DVC_EXAMPLE,
    PATH_SETTINGS,
    PIPELINE_SECTIONS,
    dvc_set_params,
    flatten,
    hydra_value,
    load_params,
    params_from_dict,
)
from flows.config import main as config_main
from tests.servers import BIN

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


def test_an_error_of_either_half_is_named_once_with_its_file():
    with pytest.raises(ConfigError) as info:
        params_from_dict(
            {"nosuch": {}, "tracking": {"colour": "red"}, "fetch": None},
            {"trainepochs": 2, "workspace": 1},
            {"nosuch": "a.yaml", "tracking.colour": "b.yaml"},
        )
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    for line in (
        "override 'workspace': expected section.key=value",
        "fetch: must be a mapping of keys, got a NoneType",  # as for an ML section: an overlay's would drop its base's
        "tracking.colour: unknown key in b.yaml (known: connect_timeout, experiment, log_every, uri)",
        "override 'trainepochs': expected section.key=value",
    ):
        assert lines.count(f"  {line}") == 1, line
    assert sum(line.startswith("  nosuch: unknown section in a.yaml") for line in lines) == 1


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


def test_a_checkpoint_dir_of_its_own_is_accepted():
    for directory in ("checkpoints", "runs/a", str(ROOT / "runs" / "b")):
        config, _ = load_params(ROOT / "params.yaml", {"train.checkpoint_dir": directory}, repo=ROOT)
        assert config.train.checkpoint_dir == directory


@pytest.mark.parametrize("key", PATH_SETTINGS)
def test_a_path_setting_outside_the_checkout_is_refused(tmp_path, key):
    """A deployment's overrides come from whoever may start a run: they must not reach other files of the
    worker, by an absolute path, `..` or a symlink in the checkout."""
    repo, outside = tmp_path / "checkout", tmp_path / "elsewhere"
    repo.mkdir()
    outside.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "link").symlink_to(outside)
    for value in (str(outside / "x"), "../elsewhere/x", "data/../../elsewhere", "link/x"):
        with pytest.raises(ConfigError, match=rf"{key}: .* is outside the checkout .* the pipeline reads and writes"):
            load_params(repo / "params.yaml", {key: value}, repo=repo)
    inside, _ = load_params(repo / "params.yaml", {key: "runs/x"}, repo=repo)
    free, _ = load_params(repo / "params.yaml", {key: str(outside / "x")})  # no checkout (msrun's workers): no rule
    assert flatten(inside.to_dict())[key] == "runs/x" and flatten(free.to_dict())[key] == str(outside / "x")


# The quick start's budget (docs/results.md): the keys configs/quickstart.yaml changes.
QUICKSTART_CHANGES = {
    "data.limit",
    "train.epochs",
    "train.batch_size",  # four times the steps: the quick start is short of steps
    "train.warmup_steps",
    "train.ema_decay",
    "train.precision",  # fp32: at batch 8 bf16 is barely faster and scored worse (where auto would be bf16)
    "diffusion.prediction",  # v wins at 30,000 images; after an hour it trades FID for class balance
    "diffusion.loss_weighting",  # sigmoid: measured at the quick start's budget only
    "diffusion.sigmoid_bias",  # 1: the best of -1 to 3 at the quick start's budget
    "sample.sampler",
    "sample.steps",
    "evaluate.fid_samples",
}
OVERLAYS = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", OVERLAYS)
def test_an_overlay_gives_exactly_params_yaml_plus_its_keys(name):
    overlay = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert overlay.pop("extends") == "../params.yaml"
    keys = flatten(overlay)
    params = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert not {k for k in keys if params.get(k) == keys[k]}, f"configs/{name} repeats params.yaml's values"
    resolved = read_params(ROOT / "configs" / name)
    assert flatten(resolved.sections) == {**params, **keys}
    assert load_params(ROOT / "configs" / name, repo=ROOT) == load_params(ROOT / "params.yaml", keys, repo=ROOT)


def test_the_quick_start_changes_only_its_budget():
    keys = flatten(yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()))
    assert keys.keys() - {"extends"} == QUICKSTART_CHANGES
    config, _ = load_params(ROOT / "configs" / "quickstart.yaml")
    assert config.train.epochs == 1 and config.sample.sampler == "dpmpp_2m" and config.model.dim == 16
    assert flatten(config.to_dict())["train.epochs"] == 1  # what MLflow logs and the workers read: resolved values


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout holding params.yaml, the working directory (as for the flow and its deployment), beside
    a credentials file outside it."""
    repo = tmp_path / "checkout"
    (repo / "configs").mkdir(parents=True)
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "credentials").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    monkeypatch.chdir(repo)
    return repo


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
OUTSIDE_RULE = r"outside .*checkout; params files are read only from inside it \(symlinks resolved\)"


def test_a_deployment_given_a_params_file_outside_the_checkout_refuses_it_unread(checkout, monkeypatch):
    from flows.pipeline import ddpm_pipeline

    opened: list[Path] = []

    def read_bytes(self: Path) -> bytes:
        opened.append(self)
        return b""

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for params in (str(checkout.parent / "credentials"), "../credentials", "configs/../../credentials"):
        with pytest.raises(ConfigError, match=OUTSIDE_RULE):
            ddpm_pipeline.fn(params=params)  # the flow's body, as a deployment's run calls it with its parameters
    assert opened == []  # refused before it is opened


def test_a_symlink_or_an_overlay_cannot_lead_out_of_the_checkout(checkout):
    (checkout / "configs" / "link.yaml").symlink_to(checkout.parent / "credentials")
    with pytest.raises(ConfigError, match=OUTSIDE_RULE):
        load_params("configs/link.yaml", repo=checkout)
    (checkout / "configs" / "q.yaml").write_text("extends: ../../credentials\ntrain: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=OUTSIDE_RULE) as info:
        load_params("configs/q.yaml", repo=checkout)
    assert SECRET not in str(info.value)
    (checkout / "configs" / "ok.yaml").write_text("extends: ../params.yaml\ntrain: {epochs: 1}\n")
    assert load_params("configs/ok.yaml", repo=checkout)[0].train.epochs == 1


def test_the_pipeline_given_a_credentials_file_exits_2_and_never_logs_it(checkout, capsys, caplog):
    from flows import pipeline

    (checkout / "credentials").write_text((checkout.parent / "credentials").read_text())
    (checkout / "token.yaml").write_text(f"token: *{SECRET}\n")
    for params in ("credentials", "token.yaml", "../credentials"):
        assert pipeline.main(["--params", params]) == 2
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err + caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0] == (
        "credentials: not valid YAML at line 2, column 1 (expected '<document start>', but found '<scalar>')"
    )
    assert errors[1] == "token.yaml: not valid YAML at line 1, column 8 (found undefined alias)"
    assert re.search(OUTSIDE_RULE, errors[2]) and len(errors) == 3


@pytest.mark.parametrize(
    "value", ["x y", "it's", "a\\", "a\\'b", "sqlite:///m.db", "", "1e-4", "true", 3, 0.995, 1e-07, True, None, [1, 2]]
)
def test_dvc_set_params_values_read_back_as_they_were(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(f"++a.b={hydra_value(value)}").value() == value


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_exp_run_with_an_overlays_set_params_runs_the_stages_on_its_resolved_values(tmp_path):
    """The documented way to run the DVC stages with an overlay, run for real in a git repository."""
    (tmp_path / "configs").mkdir()
    for name in ("params.yaml", "configs/quickstart.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    stage = {"cmd": "echo ran > out.txt", "params": ["train", "sample.sampler"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": stage}}))
    expected = load_params(tmp_path / "configs" / "quickstart.yaml")
    command = " && ".join(
        [
            "git init -q",
            f"{BIN / 'dvc'} init -q",
            "git add -A",
            "git -c user.name=t -c user.email=t@example.com commit -qm init",
            DVC_EXAMPLE.replace("uv run python", sys.executable).replace("uv run dvc", str(BIN / "dvc")),
        ]
    )
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.txt").read_text() == "ran\n"
    assert load_params(tmp_path / "params.yaml") == expected  # the experiment's params.yaml
    params = (tmp_path / "params.yaml").read_text()
    assert "epochs: 1" in params and "# 420,000 images" in params  # DVC keeps the comments


def test_dvc_set_params_sets_each_key_that_differs_and_removes_each_key_the_file_lacks(tmp_path):
    overlay = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    del overlay["extends"]
    expected = [f"--set-param=++{key}={hydra_value(value)}" for key, value in flatten(overlay).items()]
    assert dvc_set_params(ROOT / "configs" / "quickstart.yaml", ROOT / "params.yaml") == expected
    (tmp_path / "base.yaml").write_text("train: {epochs: 7, lr: 0.002}\nsample: {steps: 50}\n")
    (tmp_path / "full.yaml").write_text("train: {epochs: 7, lr: 0.001}\n")  # no `extends`: a whole file
    assert dvc_set_params(tmp_path / "full.yaml", tmp_path / "base.yaml") == [
        "--set-param=++train.lr=0.001",
        "--set-param=~sample.steps",
    ]


def test_the_dvc_options_command_prints_them_or_exits_2(checkout, capsys, caplog):
    (checkout / "configs" / "q.yaml").write_text("extends: ../params.yaml\ntrain: {epochs: 1}\n")
    assert config_main(["configs/q.yaml"]) == 0
    assert capsys.readouterr().out == "--set-param=++train.epochs=1\n"
    (checkout / "configs" / "bad.yaml").write_text("extends: ../params.yaml\ntrain: {epochs: 0}\n")
    assert config_main(["configs/bad.yaml"]) == 2 and config_main(["../credentials"]) == 2
    assert capsys.readouterr().out == "" and "train.epochs: must be >= 1" in caplog.text
