"""The backend: ddpm/kernels' C++ operators on the CPU only, MindSpore's own cells on a GPU or Ascend, and
`device: auto` says so when it leaves a GPU unused. No GPU is needed: the device target is simulated."""

import logging

import mindspore as ms
import pytest
from mindspore import nn, ops

from ddpm import runtime
from ddpm.classifier import FashionClassifier
from ddpm.config import ClassifierConfig, ModelConfig
from ddpm.errors import DeviceError
from ddpm.unet import build_unet


def custom_operators(net: nn.Cell) -> list[str]:
    """The names of the Custom operators (ddpm/kernels' C++ code) the cells of `net` hold."""
    return [
        name
        for name, cell in net.cells_and_names()
        for prim in cell._primitives.values()  # MindSpore keeps a cell's primitives apart from its attributes
        if isinstance(prim, ops.Custom)
    ]


def networks() -> dict[str, nn.Cell]:
    classifier = ClassifierConfig()
    return {
        "unet": build_unet(ModelConfig(), "auto"),
        "classifier": FashionClassifier(classifier.channels, classifier.features),
    }


@pytest.fixture
def device(monkeypatch):
    """Set the device target the backend sees, as select_device would; resolved afresh."""

    def simulate(target: str) -> None:
        monkeypatch.setattr(runtime, "device_target", lambda: target)

    for resolved in (runtime.resolve_backend, runtime.resolve_implementation):
        resolved.cache_clear()
    yield simulate
    for resolved in (runtime.resolve_backend, runtime.resolve_implementation):
        resolved.cache_clear()


@pytest.mark.parametrize("target", ["GPU", "Ascend"])
def test_a_gpu_or_ascend_gets_mindspores_own_operators_in_fp32(device, target, caplog):
    device(target)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        assert runtime.backend("auto") == runtime.Backend(target, "mindspore", "fp32")
        for name, net in networks().items():
            assert custom_operators(net) == [], name
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("networks on")]
    assert said == [f"networks on {target}: MindSpore's own operators"]  # once, whatever is built


def test_the_cpu_gets_the_native_kernels_where_they_build(device):
    device("CPU")
    if runtime.native_library() is None:
        pytest.skip("ddpm/kernels cannot be built here (the warning names why)")
    assert runtime.backend("fp32") == runtime.Backend("CPU", "native", "fp32")
    for name, net in networks().items():
        assert custom_operators(net), f"{name}: the check above would pass vacuously"


def test_bf16_asked_for_on_a_gpu_runs_fp32_and_says_why(device, caplog):
    device("GPU")
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.backend("bf16").precision == "fp32"
    assert "bf16 runs on the CPU's native kernels only" in caplog.text


@pytest.fixture
def no_usable_gpu(monkeypatch, tmp_path):
    """MindSpore sees no GPU; /dev is tmp_path (empty) and nvidia-smi is not on PATH."""
    monkeypatch.setattr(ms.hal, "is_available", lambda device: device == "CPU")
    monkeypatch.setattr(runtime, "DEV", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_auto_warns_when_a_gpu_is_present_but_unusable(no_usable_gpu, caplog):
    (no_usable_gpu / "nvidia0").touch()
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.select_device("auto") == "CPU"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(no_usable_gpu / "nvidia0") in warning  # the reason: which GPU
    assert "CUDA 11.1 or 11.6" in warning and "cuDNN 8" in warning  # what MindSpore needs
    assert "train.device" in warning and "CPU" in warning  # the other fix


def test_auto_is_quiet_without_a_gpu(no_usable_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.select_device("auto") == "CPU"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gpu_requested_and_unusable_is_an_error_naming_what_it_needs(no_usable_gpu):
    with pytest.raises(DeviceError, match=r"CUDA 11\.1 or 11\.6"):
        runtime.select_device("GPU")
