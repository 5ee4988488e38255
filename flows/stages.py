"""DVC stage entry points: `python -m flows.stages classifier|train|evaluate|register`. Each parses
params.yaml (with the values `dvc exp run -S` set there) and calls its one step, importing only that
step's module: dvc.yaml lists exactly the code each stage runs (tests/test_dvc_stages.py checks it)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from ddpm.errors import describe
from ddpm.interrupt import TrainingInterrupted
from ddpm.logs import configure_logging
from flows.config import load_params
from flows.steps import TRAIN_JSON, USER_ERRORS, Trained
from flows.tracking import connect
from flows.workspace import hold_workspace

log = logging.getLogger("flows.stages")

STAGES = ("classifier", "train", "evaluate", "register")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    configure_logging()
    repo = Path.cwd()
    try:
        config, pipeline = load_params(args.params, repo=repo)
        connect(pipeline)  # every stage: taking the workspace ends this checkout's stale MLflow runs
        step = importlib.import_module(f"flows.steps.{args.stage}")
        with hold_workspace(repo, pipeline):  # a Prefect run of the pipeline in this checkout waits, or we do
            if args.stage == "classifier":
                step.classifier(config, repo)
            elif args.stage == "train":
                step.train(config, pipeline, repo)  # DVC runs it because an input changed: train anew
            elif args.stage == "evaluate":
                step.evaluate(config, pipeline, repo, Trained.load(repo / TRAIN_JSON))
            else:
                step.register(pipeline, repo, Trained.load(repo / TRAIN_JSON))
    except USER_ERRORS as e:
        log.error("%s", describe(e))
        return 2
    except TrainingInterrupted as e:  # SIGTERM or Ctrl-C: checkpointed at the step, run ended KILLED
        log.warning("%s; `dvc repro` continues from there", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
