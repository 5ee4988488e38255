"""Bad input and a full disk: one line naming the problem and the fix, exit 2, no traceback, nothing
checkpointed lost."""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from ddpm import checkpoint as ckpt
from ddpm.config import load_config
from ddpm.data import steps_per_epoch
from ddpm.errors import ConfigError, describe, run_entry_point
from ddpm.interrupt import TrainingInterrupted
from flows.outbox import unreachable
from tests.faults import EXPERIMENT, runs_of, store
from tests.test_pipeline import run

ROOT = Path(__file__).resolve().parents[1]
DISK_BYTES = 256 * 2**10  # the tmpfs under mlruns/: filled up before the training logs anything there
STORE_BYTES = 4 * 2**20  # the tmpfs holding mlflow.db: room for MLflow's schema (about 1 MB), then filled
SECRET_URI = "http://user:secret@example.com/"  # in the failed query's values: never shown
FULL_SQLITE_LINE = "no space left on device (SQLITE_FULL: database or disk is full) writing a SQLite database"


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


def full_sqlite_store_error() -> MlflowException:
    """MLflow's error for an INSERT into a full SQLite database, as its store raises it: SQLAlchemy's
    error (the query and its values in its text) from sqlite3's SQLITE_FULL, in an MlflowException."""
    engine = sqlalchemy.create_engine("sqlite://")
    with engine.connect() as connection, pytest.raises(sqlalchemy.exc.OperationalError) as full:
        connection.exec_driver_sql("PRAGMA max_page_count = 2")  # a database at its page limit: SQLITE_FULL
        connection.exec_driver_sql("CREATE TABLE tags (value TEXT)")
        connection.exec_driver_sql("INSERT INTO tags VALUES (?)", (SECRET_URI + "x" * 10_000,))
    try:
        raise MlflowException(message=str(full.value), error_code=TEMPORARILY_UNAVAILABLE) from full.value
    except MlflowException as e:
        return e


def test_a_full_sqlite_store_is_the_full_disk_line_without_the_query():
    error = full_sqlite_store_error()
    assert "[SQL: INSERT" in str(error)  # what MLflow's text would have shown
    line = describe(error)
    assert line.startswith(FULL_SQLITE_LINE)
    assert "free space on its file system" in line and "then rerun" in line
    assert "INSERT" not in line and "secret" not in line and "user" not in line


def test_an_entry_point_reports_a_user_error_or_a_wrapped_full_disk_as_one_line(caplog):
    log = logging.getLogger("tests.entry")

    def fail(error: BaseException) -> Callable[[], int]:
        def body() -> int:
            raise error

        return body

    with caplog.at_level(logging.WARNING, logger="tests.entry"):
        assert run_entry_point(fail(ConfigError("bad params")), log) == 2
        assert run_entry_point(fail(full_sqlite_store_error()), log) == 2  # MlflowException is in no USER_ERRORS
        stopped = TrainingInterrupted(signal.SIGTERM, Path("ckpt"), 7, "epoch 1")
        assert run_entry_point(fail(stopped), log, resume="`dvc repro` continues from there") == 143
        assert run_entry_point(lambda: 1, log) == 1  # the body's own code
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "bad params" and lines[1].startswith(FULL_SQLITE_LINE)
    assert lines[2].endswith("checkpoint ckpt; `dvc repro` continues from there")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_entry_point(fail(ZeroDivisionError("bug")), log)


def test_a_full_sqlite_store_is_no_outage_to_wait_out():
    assert not unreachable(full_sqlite_store_error())
    assert unreachable(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))


@pytest.fixture
def full_disk_at(tmp_path):
    """Mount a small, full tmpfs at a directory (needs root with mount rights; skipped otherwise);
    `before_filling` puts what the test needs there first."""
    mounted: list[Path] = []

    def mount(directory: Path, size: int = DISK_BYTES, before_filling: Callable[[Path], object] | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(directory)
        if before_filling is not None:
            before_filling(directory)
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


def create_store(uri: str) -> None:
    """The store with the pipeline's experiment, made by another process: ours would keep the file open."""
    make = f"from flows.tracking import use_experiment; use_experiment({uri!r}, {EXPERIMENT!r})"
    subprocess.run([sys.executable, "-c", make], cwd=ROOT, check=True, capture_output=True, timeout=300)


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_disk_under_the_sqlite_store_is_one_line_and_a_rerun_trains(project, full_disk_at):
    """The train stage on a SQLite store (mlflow.db) whose file system is full: SQLite's "database or disk
    is full" is the full-disk line, not MLflow's error with the query; then space is freed."""
    stage = [sys.executable, "-m", "flows.stages", "train"]
    uri = f"sqlite:///{project / 'store' / 'mlflow.db'}"
    # the store and the experiment exist (MLflow's schema needs room); the run's first write finds the disk full
    full_disk_at(project / "store", STORE_BYTES, lambda _: create_store(uri))
    result = run(stage, project, {"MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert f"{FULL_SQLITE_LINE} on {project / 'store'}: free space on its file system" in line
    assert "Traceback" not in result.stderr and "[SQL" not in result.stderr and "INSERT" not in result.stderr

    (project / "store" / "filler").unlink()  # space freed
    rerun = run(stage, project, {"MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(project / "store" / "mlflow.db")) as db:  # MLflow's would stay open
        assert db.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]


def test_a_librarys_error_is_its_first_line_without_the_query_behind_it():
    locked = MlflowException(
        "(sqlite3.OperationalError) database is locked\n"
        "[SQL: SELECT registered_models.name FROM registered_models WHERE registered_models.name = ?]\n"
        "[parameters: ('gate-test',)]"
    )
    assert describe(locked) == "(sqlite3.OperationalError) database is locked"
    ours = ConfigError("invalid configuration:\n  train.lr: must be > 0")
    assert describe(ours) == str(ours)  # written to be shown whole: each bad field on its line
