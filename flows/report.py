"""The report figure of a finished training and its evaluation, for looking rather than reading: the
train loss (smoothed) and the learning rate per step, the held-out loss per timestep, FID beside its
floor, the classes the samples fall in beside the real images', and final samples. Written to
outputs/report.png (a DVC image plot) and logged to the training's MLflow run, whose figure the
flow's summary shows."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend

from ddpm.config import Config
from ddpm.files import atomic_path
from flows.steps import CLASS_FRACTION, EVAL_LOSS_CSV, LOSS_CSV, REAL_CLASS_FRACTION, REPORT_PNG

log = logging.getLogger(__name__)

REPORT_ARTIFACT = REPORT_PNG.name  # its path in the run's artifacts
GRID_SAMPLES, GRID_SEED = 16, 0  # the final samples: a 4 x 4 grid
SMOOTHING = 0.9  # weight of the past in the train loss's moving average (TensorBoard's slider)
FIGURE_INCHES, DPI = (15.0, 8.5), 80  # 1200 x 680 pixels: legible, and small enough to embed in the summary
FASHION_CLASSES = (
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}


@dataclasses.dataclass(frozen=True)
class ReportData:
    """What the figure shows, as plain arrays."""

    loss: dict[str, np.ndarray]  # outputs/loss.csv's columns: step, train_loss, lr
    loss_per_t: dict[str, np.ndarray]  # outputs/eval_loss_per_t.csv's columns: t, eval_loss
    metrics: dict[str, float]  # the evaluation: fid, fid_floor, fid_ratio, class_kl(_floor), class shares
    grid: np.ndarray  # the final samples, a uint8 (H, W) grid
    grid_title: str  # how they were drawn


def read_columns(path: Path) -> dict[str, np.ndarray]:
    """A CSV of numbers as one float array per column; an empty cell (a row written before its
    column existed) is NaN, which matplotlib leaves out."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return {name: np.array([float(row.get(name) or "nan") for row in rows]) for name in reader.fieldnames or []}


def smooth(values: np.ndarray, weight: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average, debiased so that the first values are not pulled towards zero."""
    average, out = 0.0, np.empty(len(values))
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def class_shares(metrics: dict[str, float], prefix: str) -> np.ndarray:
    return np.array([metrics[f"{prefix}{k}"] for k in range(len(FASHION_CLASSES))])


def draw_report(data: ReportData) -> Figure:
    """Six panels: train loss, learning rate, held-out loss per t, FID and its floor, class shares, samples."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    (loss, lr, per_t), (fid, classes, samples) = figure.subplots(2, 3)
    draw_loss(loss, data.loss)
    lr.plot(data.loss["step"], data.loss["lr"], color="tab:green")
    lr.set(title="learning rate", xlabel="step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    per_t.plot(data.loss_per_t["t"], data.loss_per_t["eval_loss"], marker="o")
    per_t.set(title="held-out denoising loss per timestep", xlabel="t", ylabel="MSE", yscale="log")
    draw_fid(fid, data.metrics)
    draw_classes(classes, data.metrics)
    samples.imshow(data.grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")  # pixels, not blur
    samples.set_title(f"final samples ({data.grid_title})")
    samples.axis("off")
    return figure


def draw_loss(axes: Axes, loss: dict[str, np.ndarray]) -> None:
    axes.plot(loss["step"], loss["train_loss"], color="tab:blue", alpha=0.25, label="per step")
    axes.plot(loss["step"], smooth(loss["train_loss"]), color="tab:blue", label=f"smoothed ({SMOOTHING:g})")
    axes.set(title="train loss", xlabel="step", yscale="log")
    axes.legend()


def draw_fid(axes: Axes, metrics: dict[str, float]) -> None:
    bars = axes.bar(["samples", "real images (floor)"], [metrics["fid"], metrics["fid_floor"]], color=["C0", "C7"])
    axes.bar_label(bars, fmt="%.3g")
    axes.set(title=f"FID: {metrics['fid_ratio']:.2f}x its floor", ylabel="FID (classifier features)")


def draw_classes(axes: Axes, metrics: dict[str, float]) -> None:
    x, width = np.arange(len(FASHION_CLASSES)), 0.4  # two bars side by side per class
    sampled, real = class_shares(metrics, CLASS_FRACTION), class_shares(metrics, REAL_CLASS_FRACTION)
    axes.bar(x - width / 2, sampled, width, label=f"samples (KL {metrics['class_kl']:.3f})")
    axes.bar(x + width / 2, real, width, color="C7", label=f"real images (KL {metrics['class_kl_floor']:.3f})")
    axes.axhline(1 / len(FASHION_CLASSES), color="k", linewidth=0.8, linestyle=":")
    axes.set_xticks(x, FASHION_CLASSES, rotation=45, ha="right")
    axes.set(title="predicted classes (dotted: balanced)", ylabel="share")
    axes.legend()


def sample_grid(checkpoint: str, config: Config) -> tuple[np.ndarray, str]:
    """Final samples of the checkpoint drawn as the evaluation draws them (its sample section), and how."""
    from ddpm.checkpoint_sampler import load_sampler
    from ddpm.images import make_grid

    sampler = load_sampler(checkpoint, config.train.device)
    # the evaluation's sample section fills in the request, as in ddpm.evaluate: it knows which
    # settings its sampler takes (dpmpp_2m no eta, ddpm no steps)
    sampler = dataclasses.replace(sampler, config=dataclasses.replace(sampler.config, sample=config.sample))
    request = sampler.request(GRID_SAMPLES, GRID_SEED)
    weights = "EMA weights" if sampler.config.train.ema_decay > 0 else "raw weights"
    how = f"{SAMPLER_NAMES[request.sampler]}-{request.steps}, {weights}, seed {GRID_SEED}"
    return make_grid(sampler.sample(request)), how


def write_report(repo: Path, run_id: str, config: Config, checkpoint: str, metrics: dict[str, float]) -> Path:
    """Draw the report from the step's files and `metrics`, write outputs/report.png, log it to the run."""
    from mlflow import MlflowClient

    grid, how = sample_grid(checkpoint, config)
    data = ReportData(read_columns(repo / LOSS_CSV), read_columns(repo / EVAL_LOSS_CSV), metrics, grid, how)
    path = repo / REPORT_PNG
    with atomic_path(path) as tmp:  # DVC and readers see the old figure or the new one
        draw_report(data).savefig(tmp, format="png")
    MlflowClient().log_artifact(run_id, str(path))
    log.info("report figure %s, logged to run %s", path, run_id)
    return path


def logged_report(run_id: str) -> bytes | None:
    """The report figure the run holds (PNG), or None if it was evaluated before there were any."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    if REPORT_ARTIFACT not in {a.path for a in MlflowClient().list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REPORT_ARTIFACT, dst_path=tmp)
        return Path(path).read_bytes()
