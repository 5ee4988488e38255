"""The registered model, logged from code (MLflow has no MindSpore flavor).

`mlflow.pyfunc.load_model("models:/ddpm-fashion-mnist@champion").predict({"num": [16], "sampler":
["ddim"], "steps": [50], "seed": [0], "eta": [1.0]})` returns (num, 1, 28, 28) float32 images in [-1, 1];
every column but num is optional: sampler defaults to ddim, seed to 0, steps and eta to the model's own
sample config.
The `ddpm` package travels with the model (code_paths), so loading needs only its dependencies.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class DdpmSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import ddpm  # noqa: F401  (sets MindSpore's environment before it loads)
        from ddpm.sampling import load_sampler

        self.sampler = load_sampler(context.artifacts["checkpoint"], device="auto")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        row = model_input.iloc[0]
        num, seed = int(row["num"]), int(row.get("seed", 0))
        sampler = str(row.get("sampler", "ddim"))
        steps = int(row["steps"]) if pd.notna(row.get("steps")) else None
        eta = float(row["eta"]) if pd.notna(row.get("eta")) else None
        return self.sampler.draw(num, seed, sampler, steps, eta)


mlflow.models.set_model(DdpmSampler())
