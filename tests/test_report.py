"""The report figure: its panels show the data they are given, read from the files the steps write."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from flows.report import FASHION_CLASSES, ReportData, draw_report, read_columns, smooth

STEPS, T_POINTS = 8, 5  # a tiny run: 64 images / batch 16 x 2 epochs, 5 timesteps evaluated


def xy(line: Line2D) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def bar_heights(axes: Axes) -> list[float]:
    return [patch.get_height() for patch in axes.patches if isinstance(patch, Rectangle)]


@pytest.fixture
def tiny_run(tmp_path) -> ReportData:
    """What a tiny training and its evaluation leave: the two CSVs as the steps write them, the metrics."""
    loss_csv, per_t_csv = tmp_path / "loss.csv", tmp_path / "eval_loss_per_t.csv"
    rows = [f"{s},{1.0 / s:.6f},{0.002 * (1 - s / 10):.6g}" for s in range(1, STEPS + 1)]
    loss_csv.write_text("\n".join(["step,train_loss,lr", *rows]) + "\n")
    per_t_csv.write_text("t,eval_loss\n0,0.9\n12,0.2\n24,0.1\n37,0.05\n49,0.03\n")
    sampled = np.r_[0.5, np.full(9, 0.5 / 9)]
    metrics = {"fid": 30.0, "fid_floor": 3.0, "fid_ratio": 10.0, "class_kl": 0.5, "class_kl_floor": 0.01}
    metrics |= {f"class_frac_{k}": share for k, share in enumerate(sampled)}
    metrics |= {f"real_class_frac_{k}": 0.1 for k in range(10)}
    grid = np.random.default_rng(0).integers(0, 256, (122, 122), dtype=np.uint8)  # 4 x 4 tiles of 28 + padding
    return ReportData(read_columns(loss_csv), read_columns(per_t_csv), metrics, grid, "DDIM-5, EMA weights, seed 0")


def test_the_report_has_its_six_panels_each_showing_its_data(tiny_run):
    figure = draw_report(tiny_run)
    axes = figure.get_axes()
    assert len(axes) == 6
    loss, lr, per_t, fid, classes, samples = axes
    assert [a.get_title() for a in axes] == [
        "train loss",
        "learning rate",
        "held-out denoising loss per timestep",
        "FID: 10.00x its floor",
        "predicted classes (dotted: balanced)",
        "final samples (DDIM-5, EMA weights, seed 0)",
    ]
    (steps, raw), (_, smoothed) = (xy(line) for line in loss.get_lines())
    np.testing.assert_array_equal(steps, np.arange(1, STEPS + 1))
    np.testing.assert_allclose(raw, 1.0 / steps, rtol=1e-5)
    np.testing.assert_allclose(smoothed, smooth(raw))
    np.testing.assert_allclose(xy(lr.get_lines()[0])[1], 0.002 * (1 - steps / 10))
    assert len(xy(per_t.get_lines()[0])[0]) == T_POINTS and per_t.get_yscale() == "log"
    assert bar_heights(fid) == [30.0, 3.0]
    heights = bar_heights(classes)
    assert heights[:10] == pytest.approx([tiny_run.metrics[f"class_frac_{k}"] for k in range(10)])
    assert heights[10:] == pytest.approx([0.1] * 10)
    assert [label.get_text() for label in classes.get_xticklabels()] == list(FASHION_CLASSES)
    legend = classes.get_legend()
    assert legend is not None and [text.get_text() for text in legend.get_texts()] == [
        "samples (KL 0.500)",
        "real images (KL 0.010)",
    ]
    np.testing.assert_array_equal(np.asarray(samples.get_images()[0].get_array()), tiny_run.grid)

    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert Image.open(png).size == (1200, 680)  # legible, and small enough for the flow summary
    assert len(png.getvalue()) < 200_000


def test_a_loss_csv_from_before_the_lr_column_reads_as_missing_rates(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,train_loss,lr\n1,0.5\n2,0.4,0.001\n")  # a resumed training kept an old row
    columns = read_columns(path)
    assert list(columns["step"]) == [1, 2] and np.isnan(columns["lr"][0]) and columns["lr"][1] == 0.001


def test_smoothing_starts_at_the_first_value_and_follows_a_constant():
    assert smooth(np.array([2.0]))[0] == pytest.approx(2.0)  # debiased, not 0.1 * 2
    np.testing.assert_allclose(smooth(np.full(50, 0.3)), 0.3)
    jumps = smooth(np.r_[np.ones(10), np.zeros(10)])
    assert jumps[9] == pytest.approx(1.0) and 0 < jumps[-1] < jumps[10] < 1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_the_final_grid_is_drawn_with_each_sampler_as_the_evaluation_draws(tiny_checkpoint, sampler):
    """The quick start evaluates with dpmpp_2m, which takes no eta: the grid's request must be filled
    in from the sample section as the evaluation's is, not pass every field of it."""
    from ddpm.config import load_config
    from flows.report import GRID_SAMPLES, sample_grid
    from tests.test_cli import ROOT

    sets = {"diffusion.timesteps": 20, "sample.sampler": sampler, "sample.steps": 4, "sample.eta": 1.0}
    sets |= {"model.dim": 8, "model.dim_mults": [1, 2]}
    grid, how = sample_grid(str(tiny_checkpoint), load_config(ROOT / "params.yaml", sets))
    assert grid.ndim == 2 and grid.size > 28 * 28 * (GRID_SAMPLES - 1)  # every sample tiled into one image
    assert how.startswith({"ddim": "DDIM-4", "dpmpp_2m": "DPM-Solver++(2M)-4", "ddpm": "DDPM-20"}[sampler]), how
