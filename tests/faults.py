"""What the fault tests share beside tests/conftest.py's `template` and `project` fixtures (a project
with its data fetched through DVC once, and a copy of it per test): kill helpers and the check that a
resumed training equals an uninterrupted one."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from mlflow import MlflowClient

from ddpm import checkpoint as ckpt
from ddpm.callbacks import Callback
from ddpm.train import fit
from flows.config import load_params
from flows.workspace import LOCK_FILE
from tests import servers
from tests.freeze import Freezer
from tests.test_pipeline import run

EPOCHS = 3  # killed after the first, so the rerun has epochs left to resume
STEPS = EPOCHS * 4  # TINY trains 64 images in batches of 16
EXPERIMENT = "ddpm-fashion-mnist"


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def store(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def runs_of(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


FIRST_EPOCH_DONE = "checkpoints/.epoch_0002"  # epoch 2's checkpoint being written: epoch 1's is on disk


def start(args: list[str], repo: Path, env: dict, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **env,
    }
    return subprocess.Popen(
        args, cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def start_frozen(
    args: list[str], repo: Path, env: dict, log: Path, freezer: Freezer, pattern: str, nth: int = 1
) -> tuple[subprocess.Popen, int]:
    """Start `args` (`start`) and wait until one of its processes stops itself at its `nth` open of a
    file matching `pattern`; the process and the stopped pid. A process that exits first, or never
    gets there, fails with its log's tail."""
    freezer.arm(pattern, nth)
    process = start(args, repo, {**env, **freezer.env}, log)
    try:
        return process, freezer.wait_frozen(alive=lambda: process.poll() is None)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{log.read_text()[-3000:]}") from None
    finally:
        freezer.disarm()


def kill_at(args: list[str], repo: Path, env: dict, log: Path, freezer: Freezer, pattern: str) -> None:
    """Start `args` in its own process group and SIGKILL the whole group when one of its processes
    opens a file matching `pattern` (it stops there first: no race with a fast training)."""
    process, _ = start_frozen(args, repo, env, log, freezer, pattern)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def kill_after_first_epoch(args: list[str], repo: Path, env: dict, log: Path, freezer: Freezer) -> None:
    kill_at(args, repo, env, log, freezer, FIRST_EPOCH_DONE)
    left = ckpt.list_checkpoints(repo / "checkpoints")
    assert [p.name for p in left] == ["epoch_0001.ckpt"], left


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, global_step, metrics):
        self.losses.append(metrics["train_loss"])


def uninterrupted(repo: Path, references: Path) -> tuple[list[float], ckpt.Checkpoint]:
    """The same training, same seed, in one go: per-step losses and the final checkpoint. Trained once per
    test session for each configuration (~30 s), by the first fault test that asks, in `references` (shared
    by the session's processes); the data is the same in every copy of the template (SHA-256 checked)."""
    config, _ = load_params(repo / "params.yaml", {"data.root": str(repo / "data" / "fashion-mnist")})
    unplaced = replace(config, data=replace(config.data, root=""), train=replace(config.train, checkpoint_dir=""))
    directory = references / hashlib.sha256(repr(unplaced).encode()).hexdigest()[:16]
    record = directory / "losses.json"
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training the same reference
        if not record.is_file():
            shutil.rmtree(directory, ignore_errors=True)  # what a failed attempt left
            losses = Losses()
            placed = replace(config, train=replace(config.train, checkpoint_dir=str(directory)))
            result = fit(placed, [losses], progress=False)
            record.write_text(json.dumps({"losses": losses.losses, "checkpoint": str(result.checkpoint)}))
    reference = json.loads(record.read_text())
    return reference["losses"], ckpt.load_checkpoint(reference["checkpoint"])


def assert_resumed_exactly(repo: Path, references: Path, client: MlflowClient) -> str:
    """One FINISHED run holding each step and epoch once, with the losses and final weights of an
    uninterrupted training (`uninterrupted`); returns its id."""
    runs = runs_of(client)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run_ = runs[0]
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED" and "failure" not in run_.data.tags and run_.data.tags["resumed"] == "1"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(1, STEPS + 1))
    for key in ("train_loss_epoch", "epoch_seconds", "images_per_second"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, EPOCHS + 1)), key
    grids = sorted(
        int(a.path.split("+")[2]) for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")
    )
    assert grids == list(range(1, EPOCHS + 1))
    rows = (repo / "outputs" / "loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, STEPS + 1))

    losses, reference = uninterrupted(repo, references)
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    np.testing.assert_allclose(logged, losses, rtol=1e-4, atol=1e-6)
    latest = ckpt.latest_checkpoint(repo / "checkpoints")
    assert latest is not None
    final = ckpt.load_checkpoint(latest)
    assert final.epoch == EPOCHS and final.global_step == reference.global_step == STEPS
    for name in reference.params:
        np.testing.assert_allclose(
            final.params[name].asnumpy(), reference.params[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )
    return run_id


def prefect(*args: str, repo: Path, env: dict) -> subprocess.CompletedProcess:
    return run([str(servers.BIN / "prefect"), *args], repo, env)


def deploy_with_worker(repo: Path, env: dict, freezer: Freezer, log: Path) -> subprocess.Popen:
    """Create the process work pool, deploy prefect.yaml's deployments and start a worker on the pool,
    whose flow runs inherit the freezer; the worker (its own session), logging to `log`."""
    for args in (["work-pool", "create", "ddpm-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        result = prefect(*args, repo=repo, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(servers.BIN / "prefect"), "worker", "start", "--pool", "ddpm-process"],
            cwd=repo,
            env={
                **os.environ,
                **env,
                **freezer.env,
                "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
                "PREFECT_WORKER_QUERY_SECONDS": "2",  # picks a run up within 2 s, not 10
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def flow_run(flow_run_id: str, repo: Path, env: dict) -> dict:
    """The flow run as Prefect's API returns it: from the server's REST API when there is one (cheap
    enough to poll), else through `prefect flow-run inspect` (which starts the ephemeral API)."""
    if api := env.get("PREFECT_API_URL"):
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=30) as response:
            return json.load(response)
    shown = prefect("flow-run", "inspect", flow_run_id, "-o", "json", repo=repo, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return json.loads(shown.stdout)


def flow_run_state(flow_run_id: str, repo: Path, env: dict) -> str:
    return flow_run(flow_run_id, repo, env)["state"]["type"]


def dead_holder(repo: Path) -> dict:
    """The record a killed pipeline leaves in the workspace lock file."""
    return json.loads((repo / LOCK_FILE).read_text())
