"""benchmarks/torch_reference.py: the PyTorch twin of our U-Net. Skipped where torch is not installed
(it never is in the project's environment: run `uv run --with torch==2.13.0 pytest tests/test_torch_reference.py`)."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_unet import UnetConfig, build_unet, count_parameters  # noqa: E402  (needs torch, checked above)

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_PARAMETERS = 2_992_180  # ddpm/unet.py's network with configs/tutorial.yaml's model section
DEFAULT_PARAMETERS = 1_039_836  # the same at params.yaml's dim 16


@pytest.mark.parametrize(
    ("params", "parameters"),
    [("configs/tutorial.yaml", TUTORIAL_PARAMETERS), ("params.yaml", DEFAULT_PARAMETERS)],
)
def test_reference_has_our_networks_parameter_count(params, parameters):
    net = build_unet(UnetConfig.from_params(ROOT / params))
    assert count_parameters(net) == parameters


def test_reference_with_our_weights_computes_our_networks_output():
    import mindspore as ms
    import numpy as np

    from ddpm.unet import Unet

    ms.set_seed(0)
    ours = Unet(8, 1, (1, 2), implementation="mindspore")  # MindSpore's own cells, the reference of ddpm/unet.py
    ours.set_train(False)
    twin = build_unet(UnetConfig(dim=8, dim_mults=(1, 2))).eval()
    pairs = list(zip(ours.trainable_params(), twin.parameters(), strict=True))  # same definition order
    with torch.no_grad():
        for p_ms, p_torch in pairs:
            assert tuple(p_ms.shape) == tuple(p_torch.shape), p_ms.name
            p_torch.copy_(torch.from_numpy(p_ms.asnumpy()))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
        t = np.array([0, 150], np.int32)
        expected = ours(ms.Tensor(x), ms.Tensor(t)).asnumpy()
        got = twin(torch.from_numpy(x), torch.from_numpy(t).long()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_model_key_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: {dim: 8, dims: [1, 2]}\n")
    with pytest.raises(ValueError, match=r"unknown model keys \['dims'\]"):
        UnetConfig.from_params(params)


TINY_PARAMS = (
    "model: {image_size: 8, channels: 1, dim: 8, dim_mults: [1, 2], convnext_mult: 1}\n"
    "diffusion: {timesteps: 20}\nsample: {steps: 2, eta: 1.0, clip_x0: true}\n"
)
# Compiled and eager bf16 round different intermediates to bf16 (Inductor keeps a fused chain in f32):
# the tiny net's outputs (|x| <= 1.5) differed by at most 0.012 on an AVX2 AMD EPYC, about 4x inside this
BF16_ATOL, BF16_RTOL = 5e-2, 5e-2


@pytest.fixture
def tiny_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    return params


def run_script(params: Path, *args: str) -> list[dict]:
    """benchmarks/torch_reference.py on `params` at batch 2, one repeat, no warm-up: its JSON lines."""
    script = ROOT / "benchmarks" / "torch_reference.py"
    quick = ["--batch", "2", "--repeats", "1", "--warmup", "0"]
    command = [sys.executable, str(script), "--params", str(params), *quick, *args]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
def test_script_trains_a_tiny_net_with_a_finite_loss(tiny_params):
    train, ddim = run_script(tiny_params, "--what", "train,ddim")
    assert (train["what"], train["batch"], ddim["what"], ddim["ddim_steps"]) == ("train", 2, "ddim", 2)
    assert math.isfinite(train["loss"]) and train["img_s_best"] > 0 and ddim["wall_s_min"] > 0
    assert len(train["foreign_frac"]) == 1 and 0 <= train["foreign_frac"][0] <= 1


@pytest.mark.slow
def test_script_runs_every_what_compiled_in_bf16(tiny_params):
    records = run_script(tiny_params, "--impl", "compile_bf16", "--what", "train,fwd,sample,ddim")
    assert [(r["impl"], r["what"]) for r in records] == [
        ("compile_bf16", what) for what in ("train", "fwd", "sample", "ddim")
    ]
    assert math.isfinite(records[0]["loss"]) and all(r["img_s_best"] > 0 for r in records)


@pytest.mark.slow
def test_compiled_bf16_forward_matches_eager_bf16(tiny_params, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its sibling torch_unet
    torch_reference = importlib.import_module("torch_reference")
    model = UnetConfig.from_params(tiny_params)
    eager, compiled = (torch_reference.Reference(model, 20, impl) for impl in ("bf16", "compile_bf16"))
    for a, b in zip(eager.net.parameters(), compiled.net.parameters(), strict=True):
        assert torch.equal(a, b)  # both seeded alike: the same weights
    eager.net.eval()
    compiled.net.eval()
    _, t, noise = torch_reference.seeded_inputs(model, 20, 2)[0]
    with torch.inference_mode():
        expected, got = eager.predict(noise, t), compiled.predict(noise, t)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=BF16_ATOL, rtol=BF16_RTOL)
