"""One msrun worker of a data-parallel pipeline training (started by flows.parallel, not by hand).

python -m flows.worker --run-id RUN_ID --repo REPO [--resume] --params CHECKPOINT_DIR/worker_params.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from ddpm.distributed import init_world
from ddpm.logs import configure_logging
from ddpm.train import fit
from flows.config import load_params
from flows.parallel import save_fit_result
from flows.steps.train import training_callbacks
from flows.tracking import connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    config, pipeline = load_params(args.params)
    world = init_world(config.train.device)  # before any side effect: msrun's scheduler runs this too
    configure_logging(label=f"rank {world.rank}")
    callbacks = []
    if world.is_main:
        connect(pipeline)
        mlflow.start_run(run_id=args.run_id)  # the pipeline's run: it sets the final status
        callbacks = training_callbacks(config, pipeline, Path(args.repo))
    result = fit(config, callbacks, resume=args.resume, progress=False)
    if world.is_main:
        save_fit_result(result, Path(args.repo) / config.train.checkpoint_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
