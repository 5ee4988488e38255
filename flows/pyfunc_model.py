"""The registered model, logged from code (MLflow has no MindSpore flavor).

`mlflow.pyfunc.load_model("models:/ddpm-fashion-mnist@champion").predict(pd.DataFrame({"num": [16],
"sampler": ["ddim"], "steps": [50], "seed": [0], "eta": [1.0]}))` returns (16, 1, 28, 28) float32 images
in [-1, 1]. Each row is one request and the answer concatenates them in row order; every column but
num is optional: sampler defaults to ddim, seed to 0, steps and eta to the model's own sample config.
`mlflow models serve` answers the same rows over HTTP (README, "Serve the champion").
Values are checked by ddpm.sampling before anything is drawn; a bad one is an MlflowException with
INVALID_PARAMETER_VALUE (HTTP 400) naming every bad value and its range.
The `ddpm` package travels with the model (code_paths), so loading needs only its dependencies.
"""

from __future__ import annotations

import math
import threading

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel  # mlflow.pyfunc is a lazy loader, opaque to type checkers

DEFAULT_SAMPLER = "ddim"  # DDIM-50 takes a quarter of the full ddpm chain's time (docs/results.md)


def _given(value):
    """None for what pandas marks missing (NaN, None), else the value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class DdpmSampler(PythonModel):
    def load_context(self, context):
        import ddpm  # noqa: F401  (sets MindSpore's environment before it loads)
        from ddpm.sampling import load_sampler

        self.sampler = load_sampler(context.artifacts["checkpoint"], device="auto")
        self.lock = threading.Lock()  # the scoring server predicts in threads; one network, one request at a time

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from ddpm.sampling import SampleRequestError

        rows = [
            {key: _given(value) for key, value in row.items()} for row in pd.DataFrame(model_input).to_dict("records")
        ]
        rows = [{**row, "sampler": DEFAULT_SAMPLER if row.get("sampler") is None else row["sampler"]} for row in rows]
        try:
            requests = self.sampler.requests(rows)
        except SampleRequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from e
        with self.lock:
            return np.concatenate([self.sampler.sample(request) for request in requests])  # (sum num, 1, 28, 28)


mlflow.models.set_model(DdpmSampler())
