"""The main job: fetch -> classifier -> train -> evaluate -> register as one Prefect flow.

    uv run python -m flows.pipeline [--set key=value ...]

Without PREFECT_API_URL Prefect runs an ephemeral API for the one flow run; with a server set, the
same flow runs as the `ddpm-pipeline/default` deployment (prefect.yaml).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from ddpm.__main__ import Parser
from ddpm.config import Config, parse_sets
from ddpm.data import DataError
from ddpm.errors import run_entry_point
from flows import PROJECT_LOGGERS, serve
from flows.config import PipelineConfig, RegistryConfig, load_params
from flows.data import fetch_data
from flows.steps import REPORT_PNG, USER_ERRORS, Trained, flow_finished
from flows.tracking import connect, run_name, run_url
from flows.workspace import hold_workspace

IO_RETRIES = 2  # DVC remote and network sources can fail transiently; training never retries
IO_RETRY_DELAY = 5  # seconds between those retries
TRAINING_METRICS = ("train_loss_epoch", "images_per_second", "epoch_seconds")  # the last epoch's, in the table
RUN_LINK = "The training's MLflow run: metrics per step, sample grids, system metrics, report figure, model"
EVALUATION = "Held-out loss and sample quality (FID beside its floor, class coverage) of the trained model"
PARAMS = "params.yaml"  # the flow's default parameters file

log = logging.getLogger("flows.pipeline")


def transient(task, task_run, state) -> bool:
    """Retry I/O failures, not data that was fetched and found corrupt: that fails the same way again."""
    return not isinstance(state.data, DataError)


@task(retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY, retry_condition_fn=transient)
def fetch(repo: str, data_root: str, sources: tuple[str, ...], remote: str) -> str:
    origin = fetch_data(repo, data_root, sources, remote)
    get_run_logger().info("Fashion-MNIST ready in %s (from %s)", data_root, origin)
    return origin


@task
def classifier(config: Config, repo: str) -> dict:
    from flows.steps.classifier import classifier

    return classifier(config, Path(repo))


@task
def train(config: Config, pipeline: PipelineConfig, repo: str) -> Trained:
    from flows.steps.train import train

    connect(pipeline)
    return train(config, pipeline, Path(repo), flow_run_id=str(flow_run.id), continue_finished=True)


@task
def evaluate(config: Config, pipeline: PipelineConfig, repo: str, trained: Trained) -> dict:
    from flows.steps.evaluate import evaluate

    connect(pipeline)
    return evaluate(config, pipeline, Path(repo), trained, skip_done=True)


@task
def register(pipeline: PipelineConfig, repo: str, trained: Trained) -> dict:
    from flows.steps.register import register

    connect(pipeline)
    return register(pipeline, Path(repo), trained).__dict__


def settings_name() -> str:
    """The flow run's name: its training's MLflow run name (flows.tracking.run_name), from its params."""
    parameters = flow_run.parameters
    try:
        config, _ = load_params(parameters.get("params", PARAMS), parameters.get("overrides"))
    except USER_ERRORS:  # the flow reports them as it starts; until then, Prefect's generated name
        return flow_run.name
    return run_name(config)


@flow(name="ddpm-pipeline", log_prints=False, flow_run_name=settings_name)
def ddpm_pipeline(overrides: dict[str, Any] | None = None, params: str = PARAMS) -> dict:
    """Fetch the data, train the FID feature network unless a matching one exists, train with MLflow
    tracking (resuming an interrupted training, or taking up a finished one that a failure kept from
    being registered), evaluate, register the model as @candidate."""
    show_project_logs()
    repo = os.getcwd()
    config, pipeline = load_params(params, overrides, repo=repo)  # invalid params fail here, before any work
    connect(pipeline)  # and so does an unreachable tracking server
    with hold_workspace(Path(repo), pipeline, str(flow_run.id)):  # one pipeline at a time in this checkout
        fetch(repo, config.data.root, pipeline.fetch.sources, pipeline.dvc_remote)
        classifier(config, repo)
        trained = train(config, pipeline, repo)
        metrics = evaluate(config, pipeline, repo, trained)
        registration = register(pipeline, repo, trained)
        publish_summary(
            trained,
            metrics,
            registration,
            run_url(pipeline, trained.run_id),  # reads the checkpoint
            pipeline.registry,
        )
        flow_finished(Path(repo) / config.train.checkpoint_dir)  # last: until here, a rerun takes this training up
    return {
        "run_id": trained.run_id,
        "model_id": trained.model_id,
        "eval_loss": metrics["eval_loss"],
        "fid": metrics["fid"],
        "fid_floor": metrics["fid_floor"],
        **registration,
    }


def evaluation_table(trained: Trained, metrics: dict) -> list[dict[str, Any]]:
    """The evaluation's scores and the training's last epoch, one row each."""
    from flows.steps.evaluate import QUALITY_METRICS

    scores = {key: metrics[key] for key in ("eval_loss", *QUALITY_METRICS)}
    trained_ = {key: trained.metrics[key] for key in TRAINING_METRICS if key in trained.metrics}
    return [{"metric": key, "value": f"{value:.6g}"} for key, value in {**scores, **trained_}.items()]


def show_project_logs() -> None:
    """Let ddpm's and flows' INFO lines (epochs, losses, paths) through Prefect's WARNING root logger."""
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def publish_summary(trained: Trained, metrics: dict, registration: dict, url: str, registry: RegistryConfig) -> None:
    """Artifacts of the flow run: a link to the MLflow run, the evaluation as a table, and a markdown
    summary with the report figure (final samples included) and how to serve this version and the
    champion."""
    from flows.registry import champion_version
    from flows.report import REPORT_ARTIFACT, logged_report

    create_link_artifact(url, link_text=f"MLflow run {trained.run_id}", key="ddpm-mlflow-run", description=RUN_LINK)
    create_table_artifact(evaluation_table(trained, metrics), key="ddpm-evaluation", description=EVALUATION)
    report = logged_report(trained.run_id)
    figure = (
        f"![report](data:image/png;base64,{base64.b64encode(report).decode()})"
        if report is not None
        else "(this run was evaluated before the pipeline drew report figures)"
    )
    name, version, champion = registration["name"], registration["version"], champion_version(registry)
    now = f"now v{champion}" if champion else "none yet: `python -m flows.promote` makes one"
    create_markdown_artifact(
        key="ddpm-summary",
        description="DDPM pipeline summary",
        markdown=f"""
# DDPM pipeline run

| | |
|---|---|
| MLflow run | [{trained.run_id}]({url}) |
| registered | `{name}` v{version} as @{registry.candidate_alias} (model `{trained.model_id}`) |
| FID (classifier features) | {metrics["fid"]:.4f}, {metrics["fid_ratio"]:.2f}x the floor {metrics["fid_floor"]:.4f} |
| class coverage: KL(classes \\|\\| uniform) | {metrics["class_kl"]:.4f} (0 balanced, 2.30 one class) |
| the same for real images (the floor) | {metrics["class_kl_floor"]:.4f} |
| eval_loss (held-out denoising MSE) | {metrics["eval_loss"]:.5f} |
| final train_loss (epoch mean) | {trained.metrics.get("train_loss_epoch", float("nan")):.5f} |
| throughput | {trained.metrics.get("images_per_second", float("nan")):.1f} img/s |
| checkpoint | `{trained.checkpoint}` |

Report: the training, its evaluation and final samples ([in MLflow]({url}/artifactPath/{REPORT_ARTIFACT}); in the
checkout `{REPORT_PNG}`, shown by `dvc plots show`):

{figure}

## Serve it

This version, v{version}:

```bash
uv run ddpm serve -m "models:/{name}/{version}"
```

The champion, `@{registry.champion_alias}` ({now}):

```bash
uv run ddpm serve -m "models:/{name}@{registry.champion_alias}"
```

Either answers POST requests at http://127.0.0.1:{serve.PORT}/invocations (README, "Serve the champion over HTTP").
""",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of `python -m flows.pipeline`, alias `ddpm pipeline` (flows/cli.py)."""
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. train.epochs=2"
    )
    parser.add_argument("--params", default="params.yaml", help="the settings file")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_entry_point(
        lambda: run_pipeline(args.set, args.params), log, USER_ERRORS, "the same command continues from there"
    )


def run_pipeline(sets: list[str], params: str) -> int:
    """Check the settings and the tracking store, run the flow, print its result as JSON."""
    overrides = parse_sets(sets)
    _, pipeline = load_params(params, overrides, repo=os.getcwd())  # before Prefect starts anything
    connect(pipeline)
    result = ddpm_pipeline(overrides, params)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
