"""DVC stage entry points: `python -m flows.stages classifier|train|evaluate|register`. Each parses
params.yaml (with the values `dvc exp run -S` set there) and calls the one step that does the work."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ddpm.checkpoint import CheckpointError
from ddpm.config import ConfigError
from ddpm.data import DataError
from ddpm.distributed import WorkerError

from flows import steps
from flows.config import load_params
from flows.tracking import TrackingError, connect
from flows.workspace import WorkspaceBusy, hold_workspace

log = logging.getLogger("flows.stages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=("classifier", "train", "evaluate", "register"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    repo = Path.cwd()
    try:
        config, pipeline = load_params(args.params)
        if args.stage != "classifier":  # the feature network belongs to no run: no tracking server needed
            connect(pipeline)
        with hold_workspace(repo, pipeline):  # a Prefect run of the pipeline in this checkout waits, or we do
            if args.stage == "classifier":
                steps.classifier(config, repo)
            elif args.stage == "train":
                steps.train(config, pipeline, repo)
            elif args.stage == "evaluate":
                steps.evaluate(config, pipeline, repo, steps.Trained.load(repo))
            else:
                steps.register(pipeline, repo, steps.Trained.load(repo))
    except (ConfigError, DataError, CheckpointError, TrackingError, WorkspaceBusy, FileNotFoundError,
            FloatingPointError, WorkerError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
