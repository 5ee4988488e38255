"""The registered model, logged from code (MLflow has no MindSpore flavor).

`mlflow.pyfunc.load_model("models:/ddpm-fashion-mnist@champion").predict(pd.DataFrame({"num": [16],
"sampler": ["ddim"], "steps": [50], "seed": [0], "eta": [1.0]}))` returns (16, 1, 28, 28) float32 images
in [-1, 1]. Each row is one request and the answer concatenates them in row order; every column but
num is optional: sampler defaults to ddim, seed to 0, steps and eta to the model's own sample config.
`ddpm serve` (flows/serve.py) and `mlflow models serve` answer the same rows over HTTP (README, "Serve the
champion").
Values are checked by ddpm.checkpoint_sampler before anything is drawn; a bad one is an MlflowException with
INVALID_PARAMETER_VALUE (HTTP 400) naming every bad value and its range.
Served (`ddpm serve`, whose request timeout `-t` is 300 s unless set; `mlflow models serve`'s is 60 s), a
request is also refused (400) when its U-Net evaluations (num x steps) cannot be drawn within the timeout
at the rate measured when the model loads (DDPM_SERVING_EVALS_PER_SECOND overrides it); and a draw still
running at the timeout, which the server has already answered 504, abandons itself at its next step,
so that it never holds the network from the requests after it.
The `ddpm` package travels with the model (code_paths), so loading needs only its dependencies.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import mlflow
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel  # mlflow.pyfunc is a lazy loader, opaque to type checkers

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "ddim"  # DDIM-50 takes a quarter of the full ddpm chain's time (docs/results.md)
RATE_ENV = "DDPM_SERVING_EVALS_PER_SECOND"  # the rate the budget assumes, instead of the one measured at load
# Share of the timeout a request's estimate may fill: the rate is measured on an idle server, and the
# JSON of the answer takes its time too.
TIMEOUT_SHARE = 0.8


def _given(value):
    """None for what pandas marks missing (NaN, None), else the value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class DdpmSampler(PythonModel):
    def load_context(self, context):
        import ddpm  # noqa: F401  (sets MindSpore's environment before it loads)
        from ddpm.checkpoint_sampler import load_sampler

        self.sampler = load_sampler(context.artifacts["checkpoint"], device="auto")
        self.lock = threading.Lock()  # the scoring server predicts in threads; one network, one request at a time
        # The scoring server sets the variable for its workers; loaded in Python, a model has no timeout.
        self.timeout = (
            MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() if MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.defined else None
        )
        self.budget = self._budget(self.timeout) if self.timeout else None

    def _budget(self, timeout: int):
        from ddpm.checkpoint_sampler import EvaluationBudget

        given = os.environ.get(RATE_ENV)
        try:
            rate = float(given) if given else self.sampler.evaluations_per_second()
        except ValueError:
            raise ValueError(
                f"{RATE_ENV}={given!r}: give U-Net evaluations per second as a number, or unset it"
            ) from None
        budget = EvaluationBudget(
            int(rate * timeout * TIMEOUT_SHARE),
            f"this server draws within its {timeout} s request timeout at {rate:,.0f} evaluations/s "
            "(`ddpm serve -t SECONDS` sets a longer one)",
        )
        log.info("at most %s U-Net evaluations per request: %s", f"{budget.evaluations:,}", budget.why)
        return budget

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from ddpm.checkpoint_sampler import DrawAbandoned, SampleRequestError

        deadline = time.monotonic() + self.timeout if self.timeout else None  # when the server answers 504

        rows = [
            {key: _given(value) for key, value in row.items()} for row in pd.DataFrame(model_input).to_dict("records")
        ]
        rows = [{**row, "sampler": DEFAULT_SAMPLER if row.get("sampler") is None else row["sampler"]} for row in rows]
        try:
            requests = self.sampler.requests(rows, budget=self.budget)
        except SampleRequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from e
        if not self.lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
            raise MlflowException(
                f"the server was drawing for other requests until this one's {self.timeout} s timeout; retry",
                TEMPORARILY_UNAVAILABLE,
            )
        try:
            images = [self.sampler.sample(request, deadline=deadline) for request in requests]
        except DrawAbandoned as e:
            raise MlflowException(f"{e} after the server's {self.timeout} s request timeout", DEADLINE_EXCEEDED) from e
        finally:
            self.lock.release()
        return np.concatenate(images)  # (sum num, 1, 28, 28)


mlflow.models.set_model(DdpmSampler())
