"""The evaluate step: held-out denoising loss and sample quality (FID beside its floor, class
coverage) of a finished training, into its MLflow run and model and the DVC metrics file."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ddpm.config import Config
from flows.config import PipelineConfig
from flows.steps import EVAL_LOSS_CSV, METRICS_JSON, PER_T_PREFIX, Trained, upgrade_measurement, write_json

log = logging.getLogger(__name__)
UNRECORDED = "unrecorded"  # a setting one of two measurements does not record

QUALITY_METRICS = (
    "fid",
    "fid_floor",
    "fid_ratio",
    "class_kl",
    "class_kl_floor",
    "sample_seconds",
    "classifier_accuracy",
)


def evaluate(
    config: Config,
    pipeline: PipelineConfig,
    repo: Path,
    trained: Trained,
    progress: bool = True,
    skip_done: bool = False,
) -> dict:
    """Score the model; with `skip_done`, return the scores its run already holds instead (a rerun
    of the flow after a failure later on), if they were measured as `config` measures them."""
    from flows.tracking import log_evaluation, logged_evaluation, logged_measurement

    if skip_done and (done := logged_evaluation(trained.run_id, QUALITY_METRICS)) is not None:
        differ = remeasure_reasons(config, logged_measurement(trained.model_id))
        if not differ:
            log.info("run %s is evaluated already (fid %.4g); not scoring it again", trained.run_id, done["fid"])
            return done
        log.info("run %s was evaluated with other settings (%s); scoring it again", trained.run_id, "; ".join(differ))
    from ddpm.evaluate import evaluate_checkpoint
    from flows.report import write_report

    metrics = evaluate_checkpoint(trained.checkpoint, config, progress)
    per_t = {k: v for k, v in metrics.items() if k.startswith(PER_T_PREFIX)}
    summary = {
        **{key: metrics[key] for key in ("eval_loss", *QUALITY_METRICS)},
        "train_loss_epoch": trained.metrics.get("train_loss_epoch"),
        "images_per_second": trained.metrics.get("images_per_second"),
        "per_t": per_t,
    }
    write_json(repo / METRICS_JSON, summary)
    write_loss_per_t(repo / EVAL_LOSS_CSV, per_t)
    write_report(repo, trained.run_id, config, trained.checkpoint, metrics)  # so an evaluated run holds its report
    log_evaluation(trained.run_id, trained.model_id, metrics, measurement(config))  # last: then it is evaluated
    return metrics


def write_loss_per_t(path: Path, per_t: dict[str, float]) -> None:
    """The held-out loss against t, a DVC plot (one curve: how well each noise level is denoised)."""
    rows = sorted((int(key.removeprefix(PER_T_PREFIX)), value) for key, value in per_t.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["t", "eval_loss"], *((t, f"{value:.6f}") for t, value in rows)])


def measurement(config: Config) -> dict[str, str]:
    """How the scores were measured: FIDs compare only when these agree (the promotion gate checks).
    The sampler with the steps it walks (DDPM the whole chain, T); eta only for DDIM, the one sampler
    it acts on (ddpm/reverse_process.py)."""
    sample = config.sample
    steps = config.diffusion.timesteps if sample.sampler == "ddpm" else sample.steps
    how = {
        "fid_samples": str(config.evaluate.fid_samples),
        "seed": str(config.evaluate.seed),
        "sampler": f"{sample.sampler}-{steps}",
        "clip_x0": str(sample.clip_x0),
    }
    if sample.sampler == "ddim":
        how["eta"] = f"{sample.eta:g}"
    return how


def remeasure_reasons(config: Config, recorded: dict[str, str]) -> list[str]:
    """Each setting a logged evaluation was measured with other than `config`'s (none: it stands); a
    record written before issue 30 is read as it would be written now (flows.steps.upgrade_measurement)."""
    wanted, measured = measurement(config), upgrade_measurement(recorded)
    return [
        f"{key} {measured.get(key, UNRECORDED)} vs {wanted.get(key, UNRECORDED)}"
        for key in sorted(wanted.keys() | measured.keys())
        if measured.get(key) != wanted.get(key)
    ]
