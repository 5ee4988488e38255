"""Training on several msrun workers from the pipeline (`train.workers` > 1).

The pipeline's process owns the MLflow run (params, tags, final status) and waits; msrun's workers
run `python -m flows.worker`, and rank 0 reopens that run for the per-step and per-epoch logging.
They read the params as the pipeline resolved them (ddpm.distributed.launch_workers writes both halves),
so CLI, DVC and deployment overrides reach them all.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ddpm.callbacks import FitResult
from ddpm.config import Config
from ddpm.distributed import launch_workers
from ddpm.files import atomic_path
from flows.config import PipelineConfig

FIT_RESULT = "fit_result.json"  # written by rank 0 when fit() returns


def fit_on_workers(config: Config, pipeline: PipelineConfig, repo: Path, run_id: str, resume: bool) -> FitResult:
    """Run fit() on `train.workers` processes under msrun; return rank 0's result."""
    directory = repo / config.train.checkpoint_dir
    (directory / FIT_RESULT).unlink(missing_ok=True)
    command = ["-m", "flows.worker", "--run-id", run_id, "--repo", str(repo), *(["--resume"] if resume else [])]
    launch_workers(config, command, directory, also=[pipeline])  # each worker: --params <both halves>
    return load_fit_result(directory)


def save_fit_result(result: FitResult, directory: Path) -> None:
    with atomic_path(directory / FIT_RESULT) as tmp:
        tmp.write_text(json.dumps({**dataclasses.asdict(result), "checkpoint": str(result.checkpoint)}))


def load_fit_result(directory: Path) -> FitResult:
    data = json.loads((directory / FIT_RESULT).read_text())
    return FitResult(Path(data["checkpoint"]), data["epochs"], data["global_step"], data["metrics"])
