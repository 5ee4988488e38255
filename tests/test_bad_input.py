"""Bad input and a full disk: one line naming the problem and the fix, exit 2, no traceback, nothing
checkpointed lost."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm import checkpoint as ckpt
from ddpm.config import load_config
from ddpm.data import steps_per_epoch
from ddpm.errors import describe
from tests.faults import runs_of, store
from tests.test_pipeline import run

ROOT = Path(__file__).resolve().parents[1]
DISK_BYTES = 256 * 2**10  # the tmpfs under mlruns/: filled up before the training logs anything there


def ddpm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or ": error: " in line]


def test_a_data_limit_below_one_batch_is_one_config_error(tmp_path):
    result = ddpm("train", "--params", str(ROOT / "params.yaml"), "--set", "data.limit=16", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)  # the config error, listing each bad field below it
    assert "invalid configuration" in line
    assert "data.limit: 16 images give no full batch of train.batch_size 32" in result.stderr
    assert "raise data.limit (0 for all) or lower train.batch_size" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("value", ["16,x", "16,,128", "0", "-16"])
def test_a_bad_benchmark_batch_list_is_refused_by_the_parser(tmp_path, value):
    result = ddpm("benchmark", f"--train-batch={value}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert f"argument --train-batch: must be integers >= 1 separated by commas, got {value!r}" in line
    assert "Traceback" not in result.stderr


def test_a_full_disk_names_the_destination_of_a_copy_and_enospc():
    error = OSError(errno.ENOSPC, "No space left on device", "/tmp/grid.png", None, "mlruns/1/artifacts/grid.png")
    line = describe(error)
    assert line.startswith("no space left on device (ENOSPC: No space left on device) writing mlruns/1/artifacts")
    assert "free space on its file system, or point that directory elsewhere" in line


@pytest.fixture
def full_disk_at(tmp_path):
    """Mount a small, full tmpfs at a directory (needs root with mount rights; skipped otherwise)."""
    mounted: list[Path] = []

    def mount(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(directory)
        with open(directory / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
        return directory

    yield mount
    for directory in mounted:
        if directory.is_mount():  # the test may have freed it already
            subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_disk_under_mlruns_is_one_line_and_a_rerun_resumes(project, full_disk_at):
    """The train stage on a local store whose artifact directory (mlruns/) is full; then freed."""
    stage = [sys.executable, "-m", "flows.stages", "train"]
    full_disk_at(project / "mlruns")
    result = run(stage, project, {"MLFLOW_TRACKING_URI": ""}, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    # MLflow writes the artifact through an open file, so the error carries no path: the full file system is named
    assert f"no space left on device (ENOSPC: No space left on device) writing a file on {project / 'mlruns'}:" in line
    assert "free space on its file system" in line and "Traceback" not in result.stderr
    (training,) = runs_of(store(project))
    assert training.info.status == "FAILED"
    assert "No space left on device" in training.data.tags["failure"]
    newest = sorted((project / "checkpoints").glob("epoch_*.ckpt"))[-1]
    assert ckpt.load_checkpoint(newest).epoch >= 1  # what was checkpointed loads

    subprocess.run(["umount", str(project / "mlruns")], check=True)  # space freed
    rerun = run(stage, project, {"MLFLOW_TRACKING_URI": ""}, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (resumed,) = runs_of(store(project))
    assert resumed.info.run_id == training.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed"] == "1" and "failure" not in resumed.data.tags
    config = load_config(project / "params.yaml")
    steps = config.train.epochs * steps_per_epoch(config.data.limit, config.train.batch_size)
    logged = store(project).get_metric_history(resumed.info.run_id, "train_loss")
    assert sorted(m.step for m in logged) == list(range(1, steps + 1))  # each step logged once, none lost
