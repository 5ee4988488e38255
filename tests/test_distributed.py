"""Data-parallel training under msrun: two workers end with the weights one process gets at the same
global batch, flips, t and noise included."""

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ddpm import checkpoint as ckpt
from ddpm import distributed
from ddpm.__main__ import main as ddpm_main
from ddpm.config import config_from_dict, load_config
from ddpm.distributed import WORKER_PARAMS, write_worker_params
from ddpm.files import PRIVATE_MODE, partial_path
from flows.config import load_params, params_from_dict

# Float32 sums in another order (the all-reduce, half-batch means), amplified a little by Adam's
# normalisation over 8 steps; a real difference (a missed batch, other noise, no mean) is far larger.
# The comparison runs in fp32: in bf16, oneDNN picks other kernels for a half batch, so the rounding of
# the convs' inputs differs and Adam's normalisation turns that into differences of lr x steps, which
# no tolerance tells from a real mistake (seen on a Xeon with AMX: 3.7e-3 after 8 steps).
RTOL, ATOL = 1e-4, 1e-5


def train(params, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddpm", "train", "--params", str(params), *(f"--set={s}" for s in sets)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def params(tiny_config, tmp_path):
    config = tiny_config(train={"epochs": 2, "batch_size": 16, "ema_decay": 0.9, "lr": 2e-3, "precision": "fp32"})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


@pytest.mark.slow
def test_two_workers_equal_one_process_on_the_same_global_batch(params, tmp_path):
    single = train(params, f"train.checkpoint_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = train(params, f"train.checkpoint_dir={tmp_path / 'two'}", "train.workers=2")
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "worker_logs").glob("worker_*.log")) == [
        "worker_0.log",
        "worker_1.log",
    ]
    a = ckpt.load_checkpoint(tmp_path / "one" / "epoch_0002.ckpt")
    b = ckpt.load_checkpoint(tmp_path / "two" / "epoch_0002.ckpt")
    assert a.global_step == b.global_step == 8  # 64 images / global batch 16 x 2 epochs
    assert set(a.params) == set(b.params) and any(k.startswith("ema.") for k in a.params)
    for name in a.params:
        np.testing.assert_allclose(
            b.params[name].asnumpy(), a.params[name].asnumpy(), rtol=RTOL, atol=ATOL, err_msg=name
        )


def test_a_batch_that_does_not_split_over_the_workers_is_refused(params):
    result = train(params, "train.workers=3")
    assert result.returncode == 2 and "does not split evenly over train.workers=3" in result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_trains_on_two_workers_into_one_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from tests.test_pipeline import make_project, run

    repo = make_project(tmp_path)
    uri = f"sqlite:///{repo / 'mlflow.db'}"  # the embedded default store, shared by the workers
    result = run(
        [sys.executable, "-m", "flows.pipeline", "--set", "train.workers=2"], repo, {"MLFLOW_TRACKING_URI": uri}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(uri)
    run_ = client.get_run(summary["run_id"])
    assert run_.info.status == "FINISHED" and run_.data.params["train.workers"] == "2"
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "train_loss")] == list(range(1, 9))
    images = [a.path for a in client.list_artifacts(run_.info.run_id, "images")]
    assert any("samples+step+2+" in p for p in images)
    assert client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate").run_id == run_.info.run_id
    assert len(client.search_runs([run_.info.experiment_id])) == 1


# Tuples, an exponent PyYAML reads as a string, a URL with credentials: what must survive the file.
RESOLVED = {
    "model": {"dim": 8, "dim_mults": [1, 2]},
    "classifier": {"channels": [8, 16], "checkpoint": "models/c.ckpt"},
    "train": {"lr": 1e-7, "min_lr": 0.0, "workers": 2, "batch_size": 4},
}


def test_the_worker_params_read_back_to_what_the_launcher_validated(tmp_path):
    config = config_from_dict(RESOLVED)
    _, pipeline = params_from_dict(
        {"fetch": {"sources": ["/srv/fashion", "http://mirror"]}, "tracking": {"uri": "http://u:secret@host:5000"}}
    )
    path = write_worker_params(tmp_path / "ckpt", config, [pipeline])
    assert path == tmp_path / "ckpt" / WORKER_PARAMS
    assert load_params(path) == (config, pipeline)  # what flows.worker reads
    alone = write_worker_params(tmp_path / "cli", config)
    assert load_config(alone) == config  # what `ddpm train` under msrun reads


def test_the_worker_params_are_the_owners_alone_even_over_a_readable_file(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for leftover in (directory / WORKER_PARAMS, partial_path(directory / WORKER_PARAMS)):
        leftover.write_text("train: {epochs: 99}\n")
        leftover.chmod(0o644)
    path = write_worker_params(directory, config_from_dict({}))
    assert stat.S_IMODE(path.stat().st_mode) == PRIVATE_MODE
    assert load_config(path).train.epochs != 99
    assert [p.name for p in directory.iterdir()] == [WORKER_PARAMS]  # the temporary renamed onto it


MSRUN = "mindspore.parallel.cluster.run"


class FakeMsrun:
    """Stands in for msrun's process: exits 0 at once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def wait(self):
        return 0


def test_ddpm_train_hands_its_workers_the_config_it_validated_not_the_users_flags(tmp_path, monkeypatch):
    launched, popen = [], subprocess.Popen

    def start(args, **kwargs):  # msrun's command line is recorded; anything else (lscpu) runs
        if MSRUN not in args:
            return popen(args, **kwargs)
        launched.append(list(args))
        return FakeMsrun()

    monkeypatch.setattr(distributed.subprocess, "Popen", start)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(RESOLVED))
    directory = tmp_path / "ckpt"
    sets = [f"--set=train.checkpoint_dir={directory}", "--set=model.dim_mults=[1, 2]", "--set=train.epochs=3"]
    assert ddpm_main(["train", "--params", str(params), *sets, "--resume"]) == 0
    [args] = launched
    worker = args[args.index("python") + 1 :]
    assert worker == ["-m", "ddpm", "train", "--resume", "--params", str(directory / WORKER_PARAMS)]
    assert load_config(directory / WORKER_PARAMS) == load_config(
        params, {"train.checkpoint_dir": str(directory), "model.dim_mults": [1, 2], "train.epochs": 3}
    )
