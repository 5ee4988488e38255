import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def ddpm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def train_tiny(fashion_root: Path, cwd: Path, timesteps: int) -> Path:
    """`ddpm train` of a tiny model (dim 8, 16 images, one epoch) into cwd/ck; returns its checkpoint."""
    sets = [
        f"data.root={fashion_root}",
        "data.limit=16",
        "train.batch_size=16",
        "train.epochs=1",
        "model.dim=8",
        "model.dim_mults=[1,2]",
        "train.device=CPU",
        "train.checkpoint_dir=ck",
        f"diffusion.timesteps={timesteps}",
        "sample.steps=5",
        "train.sample_every=0",
    ]
    trained = ddpm("train", "--params", str(ROOT / "params.yaml"), *(f"--set={s}" for s in sets), cwd=cwd)
    assert trained.returncode == 0, trained.stderr
    return cwd / "ck" / "epoch_0001.ckpt"


def test_train_then_sample_a_grid(fashion_root, tmp_path):
    sets = [
        "--set",
        f"data.root={fashion_root}",
        "--set",
        "data.limit=32",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.epochs=1",
        "--set",
        "model.dim=8",
        "--set",
        "model.dim_mults=[1,2]",
        "--set",
        "train.device=CPU",
        "--set",
        "train.checkpoint_dir=ck",
    ]
    trained = ddpm("train", "--params", str(ROOT / "params.yaml"), *sets, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "[WARNING]" not in trained.stderr  # MindSpore's warnings stay quiet
    assert (tmp_path / "ck" / "epoch_0001.ckpt").is_file()

    again = ddpm("train", "--params", str(ROOT / "params.yaml"), *sets, cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr

    # one more epoch on one kernel thread: the thread count may change on resume; params.yaml's cosine
    # spans the first run's one epoch, so the second continues at its last rate (train.lr_epochs)
    further = ddpm(
        "train",
        "--params",
        str(ROOT / "params.yaml"),
        *sets,
        "--set",
        "train.epochs=2",
        "--set",
        "train.lr_epochs=1",
        "--set",
        "train.threads=1",
        "--resume",
        cwd=tmp_path,
    )
    assert further.returncode == 0, further.stderr
    assert "CPU kernels on 1 thread(s)" in further.stderr and (tmp_path / "ck" / "epoch_0002.ckpt").is_file()

    sampled = ddpm(
        "sample", "--checkpoint", "ck/epoch_0001.ckpt", "--num", "9", "--steps", "5", "--out", "grid.png", cwd=tmp_path
    )
    assert sampled.returncode == 0, sampled.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 30 + 2, 3 * 30 + 2) and grid.mode == "L"


@pytest.mark.parametrize(
    "args, named",
    [
        (["--num", "0"], "bad sampling request: num must be an integer >= 1, got 0"),
        (
            ["--steps", "500", "--eta", "2"],
            "bad sampling request: steps must be an integer in [1, 20] (T, the model's "
            "timesteps), got 500; eta must be a number in [0, 1], got 2.0",
        ),
    ],
)
def test_sample_refuses_bad_values_in_one_line(tiny_checkpoint, tmp_path, args, named):
    result = ddpm("sample", "--checkpoint", str(tiny_checkpoint), *args, "--out", "x.npz", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(named)
    assert not list(tmp_path.iterdir())  # nothing written


def test_sample_writes_arrays_with_their_settings(tiny_checkpoint, tmp_path):
    common = ["--checkpoint", str(tiny_checkpoint), "--num", "10", "--steps", "3", "--seed", "5", "--batch-size", "4"]
    for out in ("s.npz", "s.npy"):
        result = ddpm("sample", *common, "--out", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    archive = np.load(tmp_path / "s.npz")
    images = archive["images"]
    assert images.shape == (10, 1, 28, 28) and images.dtype == np.float32
    assert np.isfinite(images).all() and -1 <= images.min() < images.max() <= 1
    settings = {key: archive[key].item() for key in archive.files if key != "images"}
    assert settings == {
        "num": 10,
        "seed": 5,
        "sampler": "ddim",
        "steps": 3,
        "eta": 1.0,
        "batch_size": 4,
        "checkpoint": str(tiny_checkpoint),
        "weights": "ema",
    }
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), images)  # same request, same images


def test_bad_config_exits_with_every_problem_named(tmp_path):
    result = ddpm(
        "train",
        "--params",
        str(ROOT / "params.yaml"),
        "--set",
        "train.epochs=0",
        "--set",
        "train.bogus=1",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "train.epochs: must be >= 1" in result.stderr and "train.bogus: unknown key" in result.stderr


def test_missing_data_names_the_fix(tmp_path):
    result = ddpm(
        "train",
        "--params",
        str(ROOT / "params.yaml"),
        "--set",
        f"data.root={tmp_path / 'none'}",
        "--set",
        "train.device=CPU",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "missing" in result.stderr and "ddpm fetch-data" in result.stderr


def test_fetch_data_installs_verified_files(tmp_path):
    result = ddpm("fetch-data", "--root", "fm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "fm").iterdir()) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    )


@pytest.mark.slow
def test_benchmark_prints_json_per_measurement(tmp_path):
    result = ddpm(
        "benchmark",
        "--set",
        "model.dim=8",
        "--set",
        "model.dim_mults=[1,2]",
        "--train-batch",
        "4",
        "--sample-batch",
        "4",
        "--repeats",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["what"], r["batch"]) for r in records] == [("train", 4), ("sample", 4), ("ddim", 64)]
    assert all(r["onednn_isa"] and r["precision"] in ("fp32", "bf16") for r in records)
    assert all(r["img_s_best"] > 0 for r in records[:2]) and records[2]["wall_s_min"] > 0
    assert all(r["native_kernels"] == "on" for r in records)  # the default path runs the fast operators
    assert records[1]["evals_s_best"] > 0
    assert not [key for r in records for key in r if key.startswith("_")], "internal fields leaked"
