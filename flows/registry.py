"""The registered model: logging the pyfunc, registering versions, aliases and the promotion gate."""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from ddpm.config import ConfigError, ModelConfig
from ddpm.errors import full_disk
from flows.config import RegistryConfig
from flows.errors import RegistrationError, TrackingError
from flows.steps import MEASURED_PREFIX, upgrade_measurement
from flows.tracking import IMAGES_SEEN

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
DDPM_PACKAGE = Path(__file__).resolve().parents[1] / "ddpm"
MEASURED_METRICS = ("fid_floor", "classifier_accuracy")  # the floor (N and reference images) and the feature network
LOGGED_MODEL_SOURCE = re.compile(r"models:/(m-[0-9a-f]+)")
MODEL_NAME = "model"  # the logged model's name in its training run: runs:/<run_id>/model
MODEL_REQUIREMENTS = ["mindspore==2.10.0", "numpy<2", "pyyaml", "tqdm", "pillow", "pandas"]
# One row per request: how many images, which sampler, how many steps, which seed, DDIM's eta (0
# deterministic, 1 stochastic); the answer concatenates the rows' images, (sum of num, C, H, W). Omitted:
# sampler ddim, seed 0, steps and eta from the model's config. Columns, not inference params, so each row
# is a whole request; ddpm.checkpoint_sampler states and checks the ranges.
REQUEST_SCHEMA = Schema(
    [
        ColSpec("long", "num"),
        ColSpec("string", "sampler", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("double", "eta", required=False),
    ]
)


def signature(model: ModelConfig) -> ModelSignature:
    """The registered model's columns in, images of the trained network's shape out."""
    images = TensorSpec(np.dtype(np.float32), (-1, model.channels, model.image_size, model.image_size))
    return ModelSignature(inputs=REQUEST_SCHEMA, outputs=Schema([images]))


# MLflow loads the logged model and predicts this before registering: a broken model never registers.
INPUT_EXAMPLE = pd.DataFrame({"num": [2], "sampler": ["ddim"], "steps": [2], "seed": [0]})


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str


def log_sampler_model(checkpoint: str, model: ModelConfig) -> str:
    """Log the slim sampling checkpoint as a pyfunc model (an MLflow LoggedModel) in the active run,
    the training's; returns its model id. MLflow loads it and predicts the input example first, so
    a model that cannot sample is never logged."""
    from ddpm.checkpoint import export_weights

    run = mlflow.active_run()
    assert run is not None, "log_sampler_model is called inside the training's run"
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            slim = export_weights(checkpoint, Path(tmp) / "model.ckpt")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(DDPM_PACKAGE)],
                pip_requirements=MODEL_REQUIREMENTS,
                signature=signature(model),
                input_example=INPUT_EXAMPLE,
            )
    except (MlflowException, OSError) as e:
        if full_disk(e) is not None:
            raise  # the entry point's one line names the full disk (and no query text)
        raise TrackingError(
            f"logging the model of run {run_id} failed ({e}). The training and its checkpoint "
            f"{checkpoint} are intact: rerun to log, evaluate and register it."
        ) from None
    log.info("logged the model of run %s as %s", run_id, info.model_uri)
    return info.model_id


def registered_version(registry: RegistryConfig, run_id: str) -> str | None:
    """The version of the registered model that holds run `run_id`'s model, if one does."""
    versions = MlflowClient().search_model_versions(f"name = '{registry.model_name}' and run_id = '{run_id}'")
    return str(versions[0].version) if versions else None


def register_model(run_id: str, model_id: str, registry: RegistryConfig) -> Registration:
    """Register the training run's logged model (once: a rerun finds the version it made) and alias
    it candidate. The training run is not touched, so a failure here leaves it FINISHED."""
    require_gate(registry)
    client = MlflowClient()
    try:
        version = registered_version(registry, run_id)
        if version is None:
            version = str(mlflow.register_model(f"runs:/{run_id}/{MODEL_NAME}", registry.model_name).version)
        else:
            log.info("run %s is registered already as %s v%s", run_id, registry.model_name, version)
        client.update_model_version(
            registry.model_name, version, description=model_card(client, registry.model_name, version)
        )
        client.set_registered_model_alias(registry.model_name, registry.candidate_alias, version)
    except MlflowException as e:
        if full_disk(e) is not None:
            raise
        raise RegistrationError(
            f"registering model {model_id} of run {run_id} as {registry.model_name} failed ({e.message}). The "
            f"training run and its evaluation are intact: rerun the pipeline (or `dvc repro register`) to "
            f"register it."
        ) from None
    log.info("registered %s version %s as @%s", registry.model_name, version, registry.candidate_alias)
    return Registration(registry.model_name, version, run_id)


def model_card(client: MlflowClient, name: str, version: str) -> str:
    """The version's description (markdown, shown on its page in the MLflow UI): its score and how it
    was measured, the training behind it and the commit that trained it."""
    scores = scores_of(client, name, version)
    run_id = client.get_model_version(name, version).run_id
    assert run_id is not None  # versions are registered from a training's run
    run = client.get_run(run_id)
    metrics, how = scores.metrics, scores.measured
    if "fid" not in metrics:
        lines = ["**not evaluated**: its logged model has no fid", ""]
    else:
        floor = (
            f"floor {metrics['fid_floor']:.4g}, ratio {metrics['fid_ratio']:.3g}"
            if "fid_ratio" in metrics
            else "no floor"
        )
        lines = [f"**FID {metrics['fid']:.4g}** ({floor}) on N = {how.get('fid_samples', 'unknown')} samples", ""]
    if "sampler" in how:  # flows.steps.evaluate.measurement: "ddim-50" or "ddpm-200"; eta only for DDIM
        sampler, _, steps = how["sampler"].partition("-")
        keys = ("eta", "clip_x0", "seed")
        settings = [f"{sampler.upper()}, {steps} steps", *(f"{key} {how[key]}" for key in keys if key in how)]
        lines.append(f"- sampler: {', '.join(settings)}")
    if IMAGES_SEEN in run.data.metrics:
        lines.append(f"- images seen: {run.data.metrics[IMAGES_SEEN]:,.0f}")
    if "classifier_accuracy" in metrics:
        lines.append(f"- classifier accuracy: {metrics['classifier_accuracy']:.2%} (the FID feature network)")
    lines += [f"- commit: {run.data.tags.get('git_commit', 'unknown')}", f"- run: {run.info.run_id}"]
    return "\n".join(lines)


def require_gate(registry: RegistryConfig) -> None:
    """Refuse a registry config that would move the champion alias without the gate (RegistryConfig.check)."""
    if errors := registry.check():
        raise ConfigError("invalid registry configuration:\n  " + "\n  ".join(errors))


@dataclasses.dataclass(frozen=True)
class Scores:
    """A version's evaluation: its metrics and how they were measured (the logged model's
    MEASURED_PREFIX tags, and the floor and classifier behind the FID)."""

    metrics: dict[str, float]
    measured: dict[str, str]


def scores_of(client: MlflowClient, name: str, version: str) -> Scores:
    """From the version's logged model (MLflow 3), else, for versions registered without one, its run."""
    model_version = client.get_model_version(name, version)
    model_id = model_version.model_id or logged_model_of(model_version.source)
    if model_id:
        model = client.get_logged_model(model_id)
        metrics = {m.key: m.value for m in model.metrics or []}
        measured = upgrade_measurement(
            {k.removeprefix(MEASURED_PREFIX): v for k, v in model.tags.items() if k.startswith(MEASURED_PREFIX)}
        )
    else:
        run_id = model_version.run_id  # None for a version registered from neither: no metrics
        metrics, measured = (client.get_run(run_id).data.metrics if run_id else {}), {}
    measured.update({key: f"{metrics[key]:.6g}" for key in MEASURED_METRICS if key in metrics})
    return Scores(metrics, measured)


def logged_model_of(source: str | None) -> str | None:
    """The LoggedModel id a version was registered from (its source is models:/<model id>); the SQLite
    registry does not return ModelVersion.model_id."""
    match = LOGGED_MODEL_SOURCE.fullmatch(source or "")
    return match.group(1) if match else None


def champion_version(registry: RegistryConfig) -> str | None:
    """The version @champion points at, or None if the registered model holds no such alias. Read from
    the model's alias list, not inferred from an error: MLflow answers a missing alias with
    INVALID_PARAMETER_VALUE, the code of any malformed request too, and a busy store, a 5xx or a 403
    must not read as "no champion" (the gate would promote without comparing)."""
    name, alias = registry.model_name, registry.champion_alias
    try:
        aliases = MlflowClient().get_registered_model(name).aliases
    except MlflowException as e:
        reason = e.message.strip().partition("\n")[0]  # SQLAlchemy's text goes on with the query and its values
        raise RegistrationError(
            f"reading @{alias} of {name} failed ({e.error_code}: {reason}); the gate does not promote without "
            "knowing the champion: rerun when the registry answers (a permission error: as a user with EDIT on "
            "the model)"
        ) from None
    version = aliases.get(alias)
    return None if version is None else str(version)
