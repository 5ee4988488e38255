"""DVC stage entry points: `python -m flows.stages classifier|train|evaluate|register`. Each parses
params.yaml (with the values `dvc exp run -S` set there) and calls the one step that does the work."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flows import steps
from flows.config import load_params
from flows.tracking import connect
from flows.workspace import hold_workspace

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
        connect(pipeline)  # every stage: taking the workspace ends this checkout's stale MLflow runs
        with hold_workspace(repo, pipeline):  # a Prefect run of the pipeline in this checkout waits, or we do
            if args.stage == "classifier":
                steps.classifier(config, repo)
            elif args.stage == "train":
                steps.train(config, pipeline, repo)
            elif args.stage == "evaluate":
                steps.evaluate(config, pipeline, repo, steps.Trained.load(repo))
            else:
                steps.register(pipeline, repo, steps.Trained.load(repo))
    except steps.USER_ERRORS as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
