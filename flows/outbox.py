"""Metrics and sample grids on their way to the training's MLflow run, sent by a background thread so
that training never waits for a tracking server that is down.

Each request is tried once, without MLflow's minutes of retries: while the server is unreachable,
what was not logged waits here (and, at each checkpoint, in a file beside it), one warning says so,
and it is logged when the server answers again, or by the resumed training after a crash. A metric
keeps the timestamp of when it was measured, so a request the server stored but could not confirm
stores nothing new when it is sent again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from ddpm.errors import full_disk
from ddpm.logs import DemoteToDebug
from flows.steps import read_json, write_json

log = logging.getLogger(__name__)

UNSENT_FILE = "mlflow_unsent.json"  # beside the checkpoints: metrics not logged yet when one was written
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
MAX_BATCH = 1000  # metrics per log-batch request (MLflow's limit)
RETRY_SECONDS = 5.0  # between attempts while the server is unreachable
TRANSIENT = {429, 500, 502, 503, 504}  # the statuses MLflow's own client retries: not a refusal
RETRY_LOGGER = "urllib3.connectionpool"  # where MLflow's HTTP retries are logged
STEP, EPOCH = "step", "epoch"  # what a record's step counts: global steps, or epochs


@dataclasses.dataclass(frozen=True)
class Record:
    """What one callback logs: a step's metrics (scope STEP) or an epoch's (scope EPOCH)."""

    scope: str
    step: int
    timestamp: int  # ms, when it was measured: a resend of the same record stores nothing new
    values: dict[str, float]

    def metrics(self) -> list[Metric]:
        return [Metric(key, value, self.timestamp, self.step) for key, value in self.values.items()]


def record(scope: str, step: int, values: dict[str, float]) -> Record:
    return Record(scope, step, int(time.time() * 1000), dict(values))


def save_unsent(directory: Path, run_id: str, records: list[Record]) -> None:
    """What a resume must still log, beside the checkpoint about to be written (none: no file)."""
    path = directory / UNSENT_FILE
    if records:
        write_json(path, {"run_id": run_id, "records": [dataclasses.asdict(r) for r in records]})
    else:
        path.unlink(missing_ok=True)


def load_unsent(directory: Path, run_id: str) -> list[Record]:
    """The records a previous attempt of this run left unlogged at its last checkpoint."""
    saved = read_json(directory / UNSENT_FILE)
    if saved is None or saved.get("run_id") != run_id:
        return []
    return [Record(**fields) for fields in saved["records"]]


def shown(uri: str) -> str:
    """The store's address without any user:password in it: never log a secret."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def reason(error: BaseException) -> str:
    """The gist of a failed request (`Connection refused`, `HTTP 503`), not MLflow's paragraph."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error)) or re.search(r"timed out", str(error))
    if found:
        return found.group(found.lastindex or 0)
    status = error.get_http_status_code() if isinstance(error, MlflowException) else None
    return f"HTTP {status}" if status else type(error).__name__


def unreachable(error: BaseException) -> bool:
    """A server that is down, restarting or overloaded, as opposed to one refusing the request. A local
    file error (a full disk under mlruns/, no permission) is no outage: retrying would wait forever."""
    if isinstance(error, MlflowException):  # a full SQLite store is MLflow's 503 too, yet no outage
        return error.get_http_status_code() in TRANSIENT and full_disk(error) is None
    return isinstance(error, (requests.RequestException, ConnectionError, TimeoutError, socket.gaierror))


def mlflow_retry(record: logging.LogRecord) -> bool:
    """urllib3's `Retrying (...)` warning. Once a training logs through an outbox these are debug lines:
    during an outage MLflow's own requests (its system metrics monitor asks for the run every few
    seconds) retry too, and the outbox's one warning already says the server is down. A request that
    fails for good still raises."""
    return record.levelno == logging.WARNING and str(record.msg).startswith("Retrying")


QUIET_RETRIES = DemoteToDebug(mlflow_retry)


class Outbox:
    """The queue of one run's metrics and grids, and the thread that sends them in order."""

    def __init__(self, uri: str, run_id: str, timeout: float, image_key: str):
        self.uri, self.run_id, self.timeout, self.image_key = uri, run_id, timeout, image_key
        self.records: collections.deque[Record] = collections.deque()
        self.grids: dict[int, np.ndarray] = {}  # epoch -> grid
        self.down: str | None = None  # why the server is unreachable, while it is
        self.error: BaseException | None = None  # a refusal: raised in the training's thread
        self.closed = False
        self.retry_now = False
        self.lock = threading.Condition()
        # for the rest of the process: MLflow's system metrics thread may still be retrying after close()
        logging.getLogger(RETRY_LOGGER).addFilter(QUIET_RETRIES)
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    def put(self, item: Record) -> None:
        with self.lock:
            self.records.append(item)
            self.lock.notify_all()

    def put_grid(self, epoch: int, grid: np.ndarray) -> None:
        with self.lock:
            self.grids[epoch] = grid
            self.lock.notify_all()

    def unsent(self) -> list[Record]:
        with self.lock:
            return list(self.records)

    def wait(self, patience: float = 0.0) -> bool:
        """Wait until everything is logged, or at once (`patience` 0) the server is found unreachable,
        or `patience` seconds of it passed; whether everything is logged. A refusal is raised."""
        with self.lock:
            if patience and self.down:
                self.retry_now = True
                self.lock.notify_all()
            self.lock.wait_for(
                lambda: self.error is not None or self._empty() or (not patience and self.down is not None),
                timeout=patience or None,
            )
            if self.error is not None:
                raise self.error
            return self._empty()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def _empty(self) -> bool:
        return not self.records and not self.grids

    def _run(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.closed or not self._empty())
                if self.closed:
                    return
                batch = self._next_batch()
                # a grid goes with MLflow's own retries: only while the server answers (an empty batch asks)
                grid = next(iter(self.grids.items())) if not batch and self.down is None else None
            try:
                if grid is not None:
                    MlflowClient(self.uri).log_image(
                        self.run_id, grid[1], key=self.image_key, step=grid[0], synchronous=True
                    )
                else:
                    self._log_batch([m for item in batch for m in item.metrics()])
            except Exception as e:  # classified here: only an outage is retried
                if not unreachable(e):
                    with self.lock:
                        self.error = e
                        self.lock.notify_all()
                    return
                self._went_down(e)
                continue
            with self.lock:
                for _ in batch:
                    self.records.popleft()
                if grid is not None:
                    del self.grids[grid[0]]
                if self.down is not None:
                    log.info("tracking server %s is back; logging the queued metrics", shown(self.uri))
                    self.down = None
                self.lock.notify_all()

    def _next_batch(self) -> list[Record]:
        """The oldest records, up to MAX_BATCH metrics in all (one request, stored in one transaction)."""
        batch: list[Record] = []
        count = 0
        for item in self.records:
            if batch and count + len(item.values) > MAX_BATCH:
                break
            batch.append(item)
            count += len(item.values)
        return batch

    def _log_batch(self, metrics: list[Metric]) -> None:
        if not self.uri.startswith(("http://", "https://")):  # a local store: no server to be down
            MlflowClient(self.uri).log_batch(self.run_id, metrics=metrics, synchronous=True)
            return
        body = {
            "run_id": self.run_id,
            "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics],
        }
        response = http_request(
            get_default_host_creds(self.uri), LOG_BATCH, "POST", max_retries=0, timeout=self.timeout, json=body
        )
        verify_rest_response(response, LOG_BATCH)

    def _went_down(self, error: BaseException) -> None:
        """Warn once per outage, then try again every RETRY_SECONDS (or at once when asked to)."""
        with self.lock:
            if self.down is None:
                self.down = reason(error)
                queued = sum(len(item.values) for item in self.records)
                log.warning(
                    "tracking server %s unreachable (%s); training continues, %d metrics queued, logged when it "
                    "is back or on resume",
                    shown(self.uri),
                    self.down,
                    queued,
                )
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.closed or self.retry_now, timeout=RETRY_SECONDS)
            self.retry_now = False
