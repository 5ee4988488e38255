"""Integration: the pipeline against a real `mlflow server`, a real `prefect server` and process
worker, and real `dvc` in a temporary git repository with a local remote, on real images."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from tests import servers
from tests.conftest import TINY_CLASSIFIER

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["params.yaml", "dvc.yaml", "data.dvc", "prefect.yaml", ".dvcignore", ".gitignore", ".dvc/.gitignore"]
PROJECT_PACKAGES = ["ddpm", "flows"]  # dvc.yaml's stages depend on the code
TINY: dict[str, dict[str, Any]] = {
    "data": {"limit": 64, "num_workers": 1},
    "model": {"dim": 8, "dim_mults": [1, 2]},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.002,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "device": "CPU",
        "ema_decay": 0.9,
    },
    "diffusion": {"timesteps": 50},
    "sample": {"num": 16, "steps": 5},
    "evaluate": {"num_images": 100, "t_points": 5, "fid_samples": 64},
    "classifier": TINY_CLASSIFIER,
}
POSTHOC = {
    "posthoc_ema": [0.05, 0.1],
    "posthoc_every": 2,
    "posthoc_lengths": [0.07],
}  # the main job chooses its weights
QUALITY = ("fid", "fid_floor", "fid_ratio", "class_kl", "class_kl_floor", "sample_seconds")


def make_project(tmp: Path, **overrides: dict) -> Path:
    """A git repository holding the project's pipeline files, a tiny params.yaml (with `overrides` by
    section) and a local DVC remote."""
    repo = tmp / "project"
    (repo / ".dvc").mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, repo / name)
    for name in PROJECT_PACKAGES:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update({**values, **overrides.get(section, {})})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".dvc" / "config").write_text(
        f"[core]\n    remote = local\n    analytics = false\n['remote \"local\"']\n    url = {tmp / 'dvc-remote'}\n"
    )
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


def run(args: list[str], repo: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **env,
    }
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    process, uri = servers.start_mlflow(tmp)
    yield tmp, make_project(tmp, train=POSTHOC), uri
    servers.stop(process)


def flow_env(tmp: Path, uri: str) -> dict[str, str]:
    """The MLflow server, an ephemeral Prefect API with its own database (read again after the run),
    and system metrics sampled every second so that a short training has some."""
    return {
        "MLFLOW_TRACKING_URI": uri,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }


@pytest.fixture(scope="module")
def first_run(workspace):
    """The main job, `python -m flows.pipeline`, on an ephemeral Prefect API and a real MLflow server;
    its output, as a file would hold it, in flow.log."""
    tmp, repo, uri = workspace
    result = run([sys.executable, "-m", "flows.pipeline"], repo, flow_env(tmp, uri))
    (tmp / "flow.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PROGRESS_LINE = re.compile(r"sampling ddim: (\d+)/\1 img \(100%\), [\d.]+ img/s")  # the evaluation's samples


def flow_run_record(tmp: Path, uri: str, repo: Path, flow_run_id: str) -> dict:
    """The flow run's name and artifacts, read from its Prefect database through Prefect's client."""
    code = """
import asyncio, json, sys
import flows  # the ephemeral API's start-up timeout
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

async def main(flow_run_id):
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        mine = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        artifacts = {a.key: {"type": a.type, "data": a.data, "description": a.description}
                     for a in await client.read_artifacts(artifact_filter=mine)}
    print(json.dumps({"name": flow_run.name, "artifacts": artifacts}))

asyncio.run(main(sys.argv[1]))
"""
    result = run([sys.executable, "-c", code, flow_run_id], repo, flow_env(tmp, uri))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_main_job_logs_what_a_user_compares_in_the_ui(workspace, first_run):
    tmp, repo, uri = workspace
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    run_ = client.get_run(first_run["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.info.run_name == "dim8x1-2 cosine lr0.002 0.128k img"  # what sets it apart in the runs table
    assert client.get_experiment(run_.info.experiment_id).name == "ddpm-fashion-mnist"
    assert run_.data.params["train.lr"] == "0.002" and run_.data.params["model.dim_mults"] == "[1, 2]"
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "train_loss")]
    assert steps == list(range(1, 9))  # 64 images / batch 16 x 2 epochs, every step once
    for key in ("train_loss_epoch", "epoch_seconds", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run_.info.run_id, key)] == [1, 2]
    assert len(client.get_metric_history(run_.info.run_id, "lr")) == 8
    images = [a.path for a in client.list_artifacts(run_.info.run_id, "images")]
    assert any("samples+step+1+" in p for p in images) and any("samples+step+2+" in p for p in images)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert run_.data.tags["git_commit"] == head
    data_hash = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert run_.data.tags["dvc_data_hash"] == data_hash
    assert run_.inputs is not None
    [data] = run_.inputs.dataset_inputs  # the run page's Datasets panel: Fashion-MNIST at its DVC version
    assert (data.dataset.name, data.dataset.digest) == ("fashion-mnist", data_hash)
    assert {tag.key: tag.value for tag in data.tags}["mlflow.data.context"] == "training"
    assert len(run_.data.tags["prefect_flow_run_id"]) == 36
    assert run_.data.tags["precision"] in ("fp32", "bf16")  # what train.precision (auto) resolved to
    assert run_.data.metrics["images_seen"] == 8 * 16
    assert "eval_loss" in run_.data.metrics and all(key in run_.data.metrics for key in QUALITY)
    # Post-hoc EMA: the EMA, the raw weights (length 0) and the average of length 0.07 scored; the
    # lowest evaluated and registered.
    raw, posthoc = sorted(client.get_metric_history(run_.info.run_id, "posthoc_eval_loss"), key=lambda m: m.step)
    ema_loss = run_.data.metrics["ema_eval_loss"]
    chosen = json.loads((repo / "outputs" / "train.json").read_text())["checkpoint"]
    expected = {
        ema_loss: ("ema", "checkpoints/epoch_0002.ckpt"),
        raw.value: ("raw", "checkpoints/posthoc/epoch_0002_sigma_0.000.ckpt"),
        posthoc.value: ("posthoc sigma_rel 0.070", "checkpoints/posthoc/epoch_0002_sigma_0.070.ckpt"),
    }[min(ema_loss, raw.value, posthoc.value)]
    assert (run_.data.tags["sampling_weights"], chosen.endswith(expected[1])) == (expected[0], True), chosen
    assert (raw.step, posthoc.step) == (0, 70)
    assert run_.data.metrics["eval_loss"] == pytest.approx(min(posthoc.value, ema_loss, raw.value))
    assert run_.data.metrics["fid_ratio"] == pytest.approx(run_.data.metrics["fid"] / run_.data.metrics["fid_floor"])
    version = client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate")
    assert version.version == first_run["version"] and version.run_id == run_.info.run_id
    metrics = json.loads((repo / "outputs" / "metrics.json").read_text())
    for key in ("eval_loss", *QUALITY):
        assert metrics[key] == pytest.approx(run_.data.metrics[key]), key
    assert first_run["fid"] == pytest.approx(metrics["fid"])
    # The evaluation belongs to the logged model too (the Models tab; searchable by fid), and the
    # held-out loss per timestep is one metric whose steps are the t of the DVC plot.
    models = client.search_logged_models([run_.info.experiment_id], filter_string="metrics.fid > 0")
    [model] = [m for m in models if m.model_id == first_run["model_id"]]
    assert model.metrics is not None
    assert {m.key: m.value for m in model.metrics}["fid"] == pytest.approx(metrics["fid"])
    assert model.source_run_id == run_.info.run_id
    with open(repo / "outputs" / "eval_loss_per_t.csv") as f:
        per_t = {int(row["t"]): float(row["eval_loss"]) for row in csv.DictReader(f)}
    history = client.get_metric_history(run_.info.run_id, "eval_loss_per_t")
    assert len(per_t) == 5 and [m.step for m in history] == sorted(per_t)
    assert [m.value for m in history] == pytest.approx([per_t[t] for t in sorted(per_t)], abs=1e-6)
    # The version's description is its card.
    card = version.description
    assert card is not None
    assert (
        card.startswith(f"**FID {metrics['fid']:.4g}** (floor {metrics['fid_floor']:.4g}, ")
        and "N = 64 samples" in card
    )
    for line in (
        "- sampler: DDIM, 5 steps, eta 1, clip_x0 True, seed 0",
        "- images seen: 128",
        f"- classifier accuracy: {metrics['classifier_accuracy']:.2%}",
        f"- commit: {head}",
    ):
        assert line in card, (line, card)
    # MLflow's system metrics, sampled while the run was open.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run_.data.metrics)
    classifier = json.loads((repo / "outputs" / "classifier.json").read_text())
    assert classifier["test_accuracy"] > 0.3 and not classifier["reused"]
    assert (repo / classifier["checkpoint"]).is_file()
    assert list(Path(tmp / "dvc-remote").rglob("*.dir")), "the bootstrapped data was pushed to the DVC remote"


def test_a_run_is_watchable_in_prefect_and_its_report_pictured(workspace, first_run):
    tmp, repo, uri = workspace
    client = MlflowClient(uri)
    run_ = client.get_run(first_run["run_id"])
    flow_run = flow_run_record(tmp, uri, repo, run_.data.tags["prefect_flow_run_id"])
    assert flow_run["name"] == run_.info.run_name  # the Prefect flow run is named as its MLflow run
    artifacts = flow_run["artifacts"]
    progress = artifacts["ddpm-training-progress"]
    assert progress["type"] == "progress" and progress["data"] == 100.0
    assert progress["description"].startswith("done: 2 epochs, 8 steps, this run trained ")
    link = artifacts["ddpm-mlflow-run"]
    assert link["type"] == "markdown" and f"/runs/{run_.info.run_id})" in link["data"]
    table = {row["metric"]: float(row["value"]) for row in json.loads(artifacts["ddpm-evaluation"]["data"])}
    assert artifacts["ddpm-evaluation"]["type"] == "table"
    assert table["fid"] == pytest.approx(run_.data.metrics["fid"], rel=1e-5) and "images_per_second" in table

    # The report figure: a DVC output, the same PNG in the MLflow run, embedded in the flow's summary.
    report = (repo / "outputs" / "report.png").read_bytes()
    assert report.startswith(b"\x89PNG")
    logged = mlflow.artifacts.download_artifacts(
        run_id=run_.info.run_id, artifact_path="report.png", dst_path=str(tmp), tracking_uri=uri
    )
    assert Path(logged).read_bytes() == report
    summary = artifacts["ddpm-summary"]["data"]
    version = first_run["version"]
    assert f"| MLflow run | [{run_.info.run_id}](" in summary
    serve_this = f'uv run ddpm serve -m "models:/ddpm-fashion-mnist/{version}"'
    assert f"This version, v{version}:\n\n```bash\n{serve_this}\n```" in summary
    assert "The champion, `@champion` (none yet" in summary  # as it was when this run published
    assert (
        '```bash\nuv run ddpm serve -m "models:/ddpm-fashion-mnist@champion"\n```\n\n'
        "Either answers POST requests at http://127.0.0.1:5001/invocations"
    ) in summary
    embedded = re.search(r"!\[report\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", summary)
    assert embedded is not None and base64.b64decode(embedded[1]) == report
    for prefix in ("class_frac_", "real_class_frac_"):  # the histograms of its class panel, in the run too
        assert sum(run_.data.metrics[f"{prefix}{k}"] for k in range(10)) == pytest.approx(1.0)

    # Its output in a file: log lines, progress among them, no bar redrawn with carriage returns.
    output = (tmp / "flow.log").read_text()
    assert "\r" not in output and PROGRESS_LINE.search(output), output[-3000:]


def test_gate_promotes_then_refuses_a_worse_model_trained_by_dvc(workspace, first_run):
    _, repo, uri = workspace
    env = {"MLFLOW_TRACKING_URI": uri}
    promoted = run([sys.executable, "-m", "flows.promote"], repo, env)
    assert promoted.returncode == 0 and "no champion" in promoted.stderr, promoted.stderr
    # A model that barely trained, via DVC's experiment runner with params set from the command line.
    exp = run(
        [
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            "-S",
            "train.lr=1e-7",
            "-S",
            "train.min_lr=0",
            "-S",
            "train.epochs=1",
        ],
        repo,
        env,
    )
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    # `dvc exp run > log`: progress lines, no carriage returns (the classifier's bar alone wrote 230 KB)
    assert "\r" not in exp.stdout + exp.stderr and PROGRESS_LINE.search(exp.stdout + exp.stderr), exp.stderr[-3000:]
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env)
    assert all(f'"{key}"' in shown.stdout for key in ("eval_loss", "fid", "fid_floor", "fid_ratio", "class_kl"))
    metrics = json.loads((repo / "outputs" / "metrics.json").read_text())
    assert metrics["fid"] > first_run["fid"]  # the barely trained model samples worse
    plots = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo, env)
    assert plots.returncode == 0, plots.stderr
    images = {path: entries for path, entries in json.loads(plots.stdout)["data"].items() if path.endswith(".png")}
    # its one epoch's grid (the flow's 2-epoch grids are gone), and the report figure of its evaluation
    assert sorted(images) == ["outputs/report.png", "outputs/samples/epoch_0001.png"]
    assert images["outputs/report.png"][0]["type"] == "image" and Path(images["outputs/report.png"][0]["url"]).is_file()
    assert images["outputs/samples/epoch_0001.png"][0]["type"] == "image"
    assert Path(images["outputs/samples/epoch_0001.png"][0]["url"]).is_file()  # dvc_plots/index.html shows it
    assert metrics["fid_floor"] == pytest.approx(first_run["fid_floor"])  # DVC's classifier equals the flow's
    client = MlflowClient(uri)
    candidate = client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate")
    assert candidate.version != first_run["version"]
    refused = run([sys.executable, "-m", "flows.promote"], repo, env)
    assert refused.returncode == 1 and "lower is better" in refused.stderr, refused.stderr
    assert (
        f"refused: v{candidate.version} has fid={metrics['fid']:.6g}, champion v{first_run['version']} has "
        f"fid={first_run['fid']:.6g}" in refused.stderr
    )
    champion = client.get_model_version_by_alias("ddpm-fashion-mnist", "champion")
    assert champion.version == first_run["version"]


def test_champion_loads_and_samples_through_pyfunc(workspace, first_run):
    tmp, _, uri = workspace
    code = (
        "import mlflow, pandas as pd, sys; mlflow.set_tracking_uri(sys.argv[1]);"
        "m = mlflow.pyfunc.load_model('models:/ddpm-fashion-mnist@champion');"
        "draw = lambda eta: m.predict(pd.DataFrame({'num': [3], 'sampler': ['ddim'], 'steps': [4], 'seed': [1], "
        "                                           'eta': [eta]}));"
        "x, same, stochastic = draw(0.0), draw(0.0), draw(1.0);"
        "print(x.shape, x.dtype, float(abs(x).max()) <= 1.0, (x == same).all(), (x != stochastic).any())"
    )
    result = run([sys.executable, "-c", code, uri], tmp, {})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(3, 1, 28, 28) float32 True True True"  # eta is honoured


def test_unreachable_tracking_server_fails_fast_before_training(workspace):
    _, repo, _ = workspace
    started = time.monotonic()
    result = run(
        [sys.executable, "-m", "flows.stages", "train"],
        repo,
        {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{servers.free_port()}"},
    )
    assert result.returncode == 2 and "unreachable" in result.stderr and "mlflow server" in result.stderr
    assert time.monotonic() - started < 60
