"""Training and sampling on a GPU, on MindSpore's own operators (ddpm/kernels are CPU code), where
MindSpore can use one (`uv run pytest -m gpu`); skipped elsewhere, saying why. The `ddpm` commands run
in their own processes: MindSpore fixes a process's device when its first kernel runs, and other tests
in this one may have run on the CPU."""

import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ddpm.runtime import GPU_NEEDS, IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "GPU"
NO_GPU = f"MindSpore sees no usable GPU here: {GPU_NEEDS} (README, 'Devices and speed')"
ON_GPU = f"networks on {DEVICE}: {IMPLEMENTATIONS['mindspore']}"  # no Custom operator reading host memory

# the check train.device=GPU makes (ddpm.runtime.select_device)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ms.hal.is_available(DEVICE), reason=NO_GPU)]


def ddpm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_two_training_steps_and_sampling_run_on_the_gpu(fashion_root, tmp_path):
    sets = [
        f"data.root={fashion_root}",
        "data.limit=32",
        "train.batch_size=16",
        "train.epochs=1",  # 2 steps
        "model.dim=8",
        "model.dim_mults=[1,2]",
        f"train.device={DEVICE}",
        "train.checkpoint_dir=ck",
    ]
    trained = ddpm("train", "--params", str(ROOT / "params.yaml"), *(f"--set={s}" for s in sets), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]  # a NaN or Inf loss would have stopped it
    assert f"MindSpore {ms.__version__} on {DEVICE}" in trained.stderr
    assert ON_GPU in trained.stderr
    assert "trained 1 epochs (2 steps)" in trained.stderr

    sampled = ddpm(
        "sample",
        "--checkpoint",
        "ck/epoch_0001.ckpt",
        "--device",
        DEVICE,
        "--num",
        "4",
        "--steps",
        "5",
        "--out",
        "samples.npz",
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert f"MindSpore {ms.__version__} on {DEVICE}" in sampled.stderr
    assert ON_GPU in sampled.stderr
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (4, 1, 28, 28) and images.dtype == np.float32
    assert np.isfinite(images).all() and np.abs(images).max() <= 1.0 and images.std() > 0
