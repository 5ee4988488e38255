"""Real signals and real write faults against a real `ddpm train` process: SIGTERM mid-epoch, a
full disk (a small tmpfs, and RLIMIT_FSIZE), a read-only checkpoint directory. docs/reliability.md
maps each fault to its test here."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddpm import checkpoint as ckpt
from ddpm.train import fit

SIGNAL_DEADLINE = 300  # seconds to wait for the first mid-epoch checkpoint of a run
DISK_BYTES = 4 * 2**20  # the tmpfs: room for about three tiny checkpoints (1.1 MB each)
FILE_SIZE_LIMIT = 2**19  # RLIMIT_FSIZE: half a tiny checkpoint


def write_params(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def ddpm_train(params: Path, *args: str, cwd: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddpm", "train", "--params", str(params), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        **popen,
    )


def log_lines(stderr: str, level: str) -> list[str]:
    """The lines our logging wrote at `level` (MindSpore's own lines look different)."""
    return [line for line in stderr.splitlines() if f" {level} " in line]


@pytest.mark.slow
def test_sigterm_stops_ddpm_train_mid_epoch_and_the_resume_equals_an_uninterrupted_run(tiny_config, tmp_path, freezer):
    """SIGTERM lands while the process is stopped (tests/freeze.py) as it opens its first mid-epoch
    checkpoint, so there is no race: after SIGCONT it writes that checkpoint, stops there, exits 143."""
    config = tiny_config(data={"limit": 1600}, train={"checkpoint_minutes": 0.001, "checkpoint_dir": "ck"})
    params = write_params(config, tmp_path / "params.yaml")
    directory = tmp_path / "ck"
    freezer.arm("ck/.epoch_0001_step_")  # 100 steps, one or a few done: it cannot finish the epoch first
    with open(tmp_path / "stderr.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ddpm", "train", "--params", str(params)],
            cwd=tmp_path,
            stderr=log,
            text=True,
            env={**os.environ, **freezer.env},
        )
    try:
        pid = freezer.wait_frozen(alive=lambda: process.poll() is None, timeout=SIGNAL_DEADLINE)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{(tmp_path / 'stderr.log').read_text()[-3000:]}") from None
    finally:
        freezer.disarm()
    assert pid == process.pid
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert process.wait(timeout=SIGNAL_DEADLINE) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.log").read_text()
    [stop_line] = [line for line in log_lines(stderr, "WARNING") if "training stopped by SIGTERM after step" in line]
    [name] = [p.name for p in ckpt.list_checkpoints(directory)]
    assert f"checkpoint ck/{name}" in stop_line
    assert stop_line.endswith(f"continue with `ddpm train --params {params} --resume`")
    assert "Traceback" not in stderr and not log_lines(stderr, "ERROR")
    stopped = ckpt.load_checkpoint(directory / name)
    assert stopped.progress is not None
    assert 0 < stopped.global_step == stopped.progress.step < 100 and name.startswith("epoch_0001_step_")

    resumed = ddpm_train(params, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["epoch_0001.ckpt"]
    b = ckpt.load_checkpoint(directory / "epoch_0001.ckpt")
    a = ckpt.load_checkpoint(fit(tiny_config(data={"limit": 1600}), progress=False).checkpoint)
    assert a.global_step == b.global_step == 100
    assert a.metrics["train_loss_epoch"] == pytest.approx(b.metrics["train_loss_epoch"], rel=1e-5)
    for key in a.params:
        np.testing.assert_allclose(a.params[key].asnumpy(), b.params[key].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of DISK_BYTES (a tmpfs: needs root with mount rights)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers it")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Write into `disk` until it is full."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def assert_one_error_and_epoch_1_intact(result, directory: Path, reason: str) -> None:
    assert result.returncode == 2, result.stderr
    [line] = log_lines(result.stderr, "ERROR")
    assert f"could not write checkpoint {directory / 'epoch_0002.ckpt'} ({reason}" in line
    assert "previous checkpoints are intact" in line and "--resume" in line and "Traceback" not in result.stderr
    assert "CRITICAL" not in result.stderr  # MindSpore's own line about the failed save is not shown
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_0001.ckpt"]  # no partial file
    assert ckpt.load_checkpoint(directory / "epoch_0001.ckpt").epoch == 1


def test_a_full_disk_while_checkpointing_is_one_error_and_the_previous_checkpoint_survives(
    tiny_config, small_disk, tmp_path
):
    config = tiny_config(train={"checkpoint_dir": str(small_disk / "ck")})
    fit(config, progress=False)
    fill(small_disk)
    result = ddpm_train(
        write_params(config, tmp_path / "params.yaml"), "--set", "train.epochs=2", "--resume", cwd=tmp_path
    )
    assert_one_error_and_epoch_1_intact(result, small_disk / "ck", "ENOSPC: No space left on device")


def test_a_file_size_limit_while_checkpointing_is_one_error_and_the_previous_checkpoint_survives(tiny_config, tmp_path):
    """RLIMIT_FSIZE makes a write fail with EFBIG, as a full disk fails one with ENOSPC (simulated)."""
    config = tiny_config()
    fit(config, progress=False)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    result = ddpm_train(
        write_params(config, tmp_path / "params.yaml"),
        "--set",
        "train.epochs=2",
        "--resume",
        cwd=tmp_path,
        preexec_fn=limit_file_size,
    )
    assert_one_error_and_epoch_1_intact(result, Path(config.train.checkpoint_dir), "EFBIG: File too large")


def test_an_unwritable_checkpoint_directory_fails_before_training(tiny_config, tmp_path):
    config = tiny_config()
    fit(config, progress=False)
    directory = Path(config.train.checkpoint_dir)
    bound = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True, text=True
    )
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here ({bound.stderr.strip()})")
    try:
        with pytest.raises(
            ckpt.CheckpointWriteError,
            match=f"cannot write checkpoints to {directory} "
            r"\(EROFS: Read-only file system\)",
        ):
            fit(tiny_config(train={"epochs": 2}), resume=True, progress=False)
    finally:
        subprocess.run(["umount", str(directory)], check=True)
    assert [p.name for p in directory.iterdir()] == ["epoch_0001.ckpt"]
    assert ckpt.load_checkpoint(directory / "epoch_0001.ckpt").epoch == 1

    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ckpt.CheckpointWriteError, match=f"{tmp_path / 'a_file'} is a file, not a directory"):
        fit(tiny_config(train={"checkpoint_dir": str(tmp_path / "a_file" / "ck")}), progress=False)
