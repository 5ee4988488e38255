"""The pipeline's steps, one module each (classifier, train, evaluate, register), shared by the DVC
stages (flows.stages), the Prefect flow (flows.pipeline) and the CLI. Steps exchange paths and ids
through small files in outputs/, never tensors. This module holds what they share; it loads neither
MindSpore nor MLflow, so a stage imports only the code it runs (dvc.yaml lists exactly that).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ddpm.errors import USER_ERRORS as DDPM_USER_ERRORS
from ddpm.files import atomic_path
from flows.errors import RegistrationError, TrackingError
from flows.workspace import WorkspaceBusy

OUTPUTS = Path("outputs")
# the finished training (run, checkpoint, logged model), read by evaluate and register
TRAIN_JSON = OUTPUTS / "train.json"
METRICS_JSON = OUTPUTS / "metrics.json"  # DVC metrics of the evaluation
LOSS_CSV = OUTPUTS / "loss.csv"  # DVC plot: train_loss per step
EVAL_LOSS_CSV = OUTPUTS / "eval_loss_per_t.csv"  # DVC plot: the held-out loss per timestep
SAMPLES_DIR = OUTPUTS / "samples"  # DVC image plots: each epoch's preview grid, epoch_NNNN.png
MEASURED_PREFIX = "measured."  # logged model tags: how its evaluation was measured (N, sampler, steps, eta)
UNRECORDED_STEPS = "unrecorded"  # the steps of a DPM-Solver++(2M) evaluation recorded before they were
PER_T_PREFIX = "eval_loss_t"  # ddpm.evaluate's per-timestep losses, eval_loss_tNNNN
# ddpm.evaluate's predicted-class shares of the samples and the real images, class_frac_K, real_class_frac_K
CLASS_FRACTION, REAL_CLASS_FRACTION = "class_frac_", "real_class_frac_"
REPORT_PNG = OUTPUTS / "report.png"  # DVC image plot: the figure of a training and its evaluation
REGISTERED_JSON = OUTPUTS / "registered.json"
CLASSIFIER_JSON = OUTPUTS / "classifier.json"  # DVC metrics of the FID feature network
# In the checkpoint dir, beside a finished training: the Prefect flow took it and has not reached its
# end yet, so a rerun of the flow takes it up again, registered or not (a failure after register).
FLOW_UNFINISHED = "flow_unfinished"
# What the entry points (flow, DVC stages) report as one clear line, exit 2, rather than a traceback.
USER_ERRORS = (*DDPM_USER_ERRORS, TrackingError, RegistrationError, WorkspaceBusy)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished training: its MLflow run, final checkpoint, last epoch's metrics and the logged model."""

    run_id: str
    checkpoint: str
    metrics: dict
    model_id: str  # the MLflow LoggedModel holding its sampling weights: models:/<model_id>

    def save(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Trained:
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run the train step first (`dvc repro train`)")
        return cls(**json.loads(path.read_text()))


def flow_finished(checkpoint_dir: Path) -> None:
    """The Prefect flow reached its end with the training in `checkpoint_dir`: its next run trains anew."""
    (checkpoint_dir / FLOW_UNFINISHED).unlink(missing_ok=True)


def upgrade_measurement(recorded: dict[str, str]) -> dict[str, str]:
    """A logged model's measurement (MEASURED_PREFIX tags) as flows.steps.evaluate.measurement writes it
    now. Before issue 30 it recorded an eta for every sampler and DPM-Solver++(2M) as dpmpp_2m-T whatever
    its steps; such a record (a non-DDIM sampler with an eta) has its eta dropped, and DPM-Solver++(2M)'s
    steps marked unrecorded, which compare equal to nothing."""
    measured = dict(recorded)
    sampler, _, _ = measured.get("sampler", "").partition("-")
    if sampler not in ("", "ddim") and "eta" in measured:  # written before issue 30
        del measured["eta"]
        if sampler == "dpmpp_2m":
            measured["sampler"] = f"dpmpp_2m-{UNRECORDED_STEPS}"
    return measured


def read_json(path: Path) -> dict[str, Any] | None:
    """A record a step wrote, or None if there is none (or only half of one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader sees the old record or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
