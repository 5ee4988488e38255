"""DVC stage entry points: `python -m flows.stages classifier|train|evaluate|register`. Each parses
params.yaml (with the values `dvc exp run -S` set there) and calls its one step, importing only that
step's module: dvc.yaml lists exactly the code each stage runs (tests/test_dvc_stages.py checks it).

DVC hashes a stage's params after the stage ran, so an edit of params.yaml while it ran would land
in dvc.lock beside outputs made with the old values: a stage whose params changed meanwhile fails
instead (exit 2, naming them), and DVC records nothing."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import ConfigError, run_entry_point
from ddpm.logs import configure_logging
from ddpm.params_file import read_params
from flows.config import flatten, load_params
from flows.steps import TRAIN_JSON, USER_ERRORS, Trained
from flows.tracking import connect
from flows.workspace import hold_workspace

log = logging.getLogger("flows.stages")

STAGES = ("classifier", "train", "evaluate", "register")
DVC_YAML = "dvc.yaml"
MISSING = "(absent)"  # how a key that is not in the file shows in the error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    configure_logging()
    return run_entry_point(
        lambda: run_stage(args.stage, args.params), log, USER_ERRORS, "`dvc repro` continues from there"
    )


def run_stage(stage: str, params: str) -> int:
    repo = Path.cwd()
    keys = stage_params(repo, stage)
    started_with = param_values(params, keys)  # before the stage reads them
    config, pipeline = load_params(params, repo=repo)
    connect(pipeline)  # every stage: taking the workspace ends this checkout's stale MLflow runs
    step = importlib.import_module(f"flows.steps.{stage}")
    with hold_workspace(repo, pipeline):  # a Prefect run of the pipeline in this checkout waits, or we do
        if stage == "classifier":
            step.classifier(config, repo)
        elif stage == "train":
            step.train(config, pipeline, repo)  # DVC runs it because an input changed: train anew
        elif stage == "evaluate":
            step.evaluate(config, pipeline, repo, Trained.load(repo / TRAIN_JSON))
        else:
            step.register(pipeline, repo, Trained.load(repo / TRAIN_JSON))
    refuse_changed_params(stage, params, started_with, param_values(params, keys))
    return 0


def stage_params(repo: Path, stage: str) -> list[str] | None:
    """The params keys dvc.yaml lists for `stage` (those DVC records in dvc.lock); None (all) without dvc.yaml."""
    path = repo / DVC_YAML
    if not path.is_file():
        return None
    listed = yaml.safe_load(path.read_text())["stages"][stage].get("params", [])
    return [key for key in listed if isinstance(key, str)]  # a mapping names another params file


def param_values(path: str, keys: list[str] | None) -> dict[str, Any]:
    """The file's values under `keys` (a section or a dotted key), flattened to dotted leaf keys."""
    values = flatten(read_params(path).sections)
    if keys is None:
        return values
    return {name: value for name, value in values.items() if any(name == k or name.startswith(f"{k}.") for k in keys)}


def refuse_changed_params(stage: str, path: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key, MISSING) != after.get(key, MISSING))
    if changed:
        edits = ", ".join(f"{key} {before.get(key, MISSING)!r} -> {after.get(key, MISSING)!r}" for key in changed)
        raise ConfigError(
            f"{path} changed while the {stage} stage ran ({edits}): its outputs were made with the values it read "
            f"at its start, and DVC would record the new ones beside them in dvc.lock; rerun `dvc repro` to run it "
            "with the new values"
        )


if __name__ == "__main__":
    sys.exit(main())
