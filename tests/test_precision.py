"""train.precision: detection (simulated processors), and bf16 close to fp32 operator by operator, for the
whole U-Net and for training.

bf16 keeps 8 bits of mantissa: each operand is rounded by up to 2^-9 = 0.2% relative, and a conv's
f32 sum of n such products averages the errors, so outputs and gradients land within a few 0.1% of
the largest value (measured 0.2-0.35% at the network's shapes). BF16_TOL, 1.5% of the largest
value, is well above that and far under any wrong pad, weight layout or missing term (those err by
O(100%)). fp32 stays as tight as tests/test_kernels.py holds it.
"""

import dataclasses

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ddpm import runtime
from ddpm.config import Config, ConfigError, Precision, config_from_dict, load_config
from ddpm.kernels.conv import Conv2d, Conv2dTranspose, NativeConv2d
from ddpm.train import Trainer
from ddpm.unet import Unet

BF16_TOL = 1.5e-2  # of the largest reference value (module docstring)
BF16_SEEN = 1e-5  # bf16 that matches fp32 closer than this was not bf16
BATCH = 4

AMX = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
ZEN4 = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"fpu", "sse4_1", "avx", "avx2", "fma"})


@pytest.fixture(scope="module")
def library(library):
    """conftest's library (bf16 runs on it only), where this process's precision resolves to bf16."""
    if runtime.resolve_precision("auto", "CPU") != "bf16":
        pytest.skip("no bf16 convs here: the processor lacks bf16 units or ONEDNN_MAX_CPU_ISA caps oneDNN below them")
    return library


# ---- detection and settings ----


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n"
    )
    assert runtime.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert runtime.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    "flags, precision, isa",
    [
        (AMX, "bf16", "AVX512_CORE_AMX"),
        (ZEN4, "bf16", "AVX512_CORE_BF16"),
        (AVX2_ONLY, "fp32", "AVX2"),
        (frozenset(), "fp32", "AVX2"),
    ],
)
def test_auto_picks_bf16_only_where_the_processor_has_bf16_units(flags, precision, isa):
    assert runtime.resolve_precision("auto", "CPU", flags, runtime.isa_cap(flags)) == precision
    assert runtime.isa_cap(flags) == isa
    assert runtime.isa_cap(flags, native_kernels=False) == "AVX2"  # MindSpore's own convs want AVX2


def test_explicit_precision_the_users_isa_cap_and_other_devices(caplog):
    assert runtime.resolve_precision("fp32", "CPU", AMX, "AVX512_CORE_AMX") == "fp32"
    assert runtime.resolve_precision("bf16", "CPU", AMX, "AVX512_CORE_AMX") == "bf16"
    assert runtime.resolve_precision("auto", "CPU", AMX, "AVX2") == "fp32"  # the user capped oneDNN at AVX2
    assert runtime.resolve_precision("bf16", "CPU", AMX, "AVX2") == "fp32"
    assert "unset it" in caplog.text
    assert runtime.resolve_precision("bf16", "CPU", AVX2_ONLY, "AVX2") == "fp32"
    assert "no bf16 units" in caplog.text
    for target in ("GPU", "Ascend"):
        assert runtime.resolve_precision("auto", target, AMX, "AVX512_CORE_AMX") == "fp32"  # MindSpore's own path
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp16", "CPU", AMX)


def test_precision_is_a_validated_train_setting():
    assert Config().train.precision == "auto"
    assert load_config(None, {"train.precision": "bf16"}).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, {"train.precision": "fp16"})


def test_a_checkpoint_config_from_before_the_setting_loads_as_auto():
    raw = Config().to_dict()
    del raw["train"]["precision"]
    assert config_from_dict(raw).train.precision == "auto"


# ---- operators: bf16 against the fp32 reference ----


def conv_values(cell: nn.Cell, x, projection):
    """cell(x) and the gradients of <cell(x), projection> w.r.t. x and each weight, under @ms.jit."""

    def projected(x):
        return (cell(x) * projection).sum()

    dx, dws = ms.jit(ms.grad(projected, grad_position=0, weights=cell.trainable_params()))(x)
    return [ms.jit(cell)(x).asnumpy(), dx.asnumpy(), *(dw.asnumpy() for dw in dws)]


def assert_bf16_close(bf16_values, ref_values, names):
    for name, a, b in zip(names, bf16_values, ref_values, strict=True):
        assert a.dtype == np.float32, f"{name}: outputs and gradients are float32"
        error = np.abs(a - b).max() / np.abs(b).max()
        assert error < BF16_TOL, f"{name}: {error:.4f} of the largest value"
        if name != "gradient of bias":  # the bias is added in f32 after the conv: exact
            assert error > BF16_SEEN, f"{name}: identical to fp32, so not computed in bf16"


# (in, out, kernel, stride, padding, size, bias): a 3x3, a 1x1 with bias (to_out), the 7x7 input conv,
# the stride-2 down-sampling
DENSE = [
    (56, 28, 3, 1, 1, 28, False),
    (128, 28, 1, 1, 0, 14, True),
    (1, 18, 7, 1, 3, 28, True),
    (28, 28, 4, 2, 1, 28, False),
]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, size, bias", DENSE)
def test_bf16_conv_is_close_to_mindspores_fp32(library, c_in, c_out, kernel, stride, padding, size, bias):
    ref = nn.Conv2d(c_in, c_out, kernel, stride, pad_mode="pad", padding=padding, has_bias=bias)
    bf16 = Conv2d(library, c_in, c_out, kernel, stride, padding, has_bias=bias, bf16=True)
    check_against_reference(bf16, ref, (BATCH, c_in, size, size))


def test_bf16_transposed_conv_is_close_to_mindspores_fp32(library):
    ref = nn.Conv2dTranspose(56, 56, 4, 2, pad_mode="pad", padding=1)
    check_against_reference(Conv2dTranspose(library, 56, 56, 4, 2, 1, bf16=True), ref, (BATCH, 56, 7, 7))


def check_against_reference(bf16: nn.Cell, ref: nn.Cell, x_shape):
    rng = np.random.default_rng(0)
    for p_bf16, p_ref in zip(bf16.trainable_params(), ref.trainable_params(), strict=True):
        p_ref.set_data(ms.Tensor(rng.standard_normal(p_ref.shape) * 0.2, ms.float32))
        p_bf16.set_data(p_ref.value().copy())
    x = ms.Tensor(rng.standard_normal(x_shape), ms.float32)
    projection = ms.Tensor(rng.standard_normal(ref(x).shape), ms.float32)
    names = ["output", "input gradient", *(f"gradient of {p.name}" for p in ref.trainable_params())]
    assert_bf16_close(conv_values(bf16, x, projection), conv_values(ref, x, projection), names)


# ---- the network ----


def conv_precisions(net: nn.Cell) -> dict[str, set]:
    """{'dense': {bf16 flags of the dense convs}, 'depthwise': {...}} as the C++ side reads them."""
    found: dict[str, set[int]] = {"dense": set(), "depthwise": set()}
    for _, cell in net.cells_and_names():
        if isinstance(cell, NativeConv2d):
            found["depthwise" if cell.groups > 1 else "dense"].add(int(cell.config.asnumpy()[-1]))
    return found


def test_bf16_network_runs_every_dense_conv_in_bf16_and_fp32_none(library):
    ms.set_seed(0)
    assert conv_precisions(Unet(8, 1, (1, 2), precision="bf16")) == {"dense": {1}, "depthwise": {0}}
    assert conv_precisions(Unet(8, 1, (1, 2), precision="fp32"))["dense"] <= {0}


def output_and_grads(net: nn.Cell, x, t) -> list[np.ndarray]:
    """net(x, t) and the gradients of mean(net(x, t)^2) w.r.t. every weight."""

    def loss(x, t):
        return (net(x, t) ** 2).mean()

    grads = ms.jit(ms.grad(loss, grad_position=None, weights=net.trainable_params()))(x, t)
    return [ms.jit(net)(x, t).asnumpy(), *(g.asnumpy() for g in grads)]


def test_bf16_unet_forward_and_gradients_are_close_to_fp32(library):
    ms.set_seed(0)
    fp32, bf16 = Unet(8, 1, (1, 2), precision="fp32"), Unet(8, 1, (1, 2), precision="bf16")
    names = [p.name for p in fp32.trainable_params()]
    assert names == [p.name for p in bf16.trainable_params()], "checkpoints load into either"
    ms.load_param_into_net(
        bf16, {p.name: ms.Parameter(p.value().copy()) for p in fp32.trainable_params()}, strict_load=True
    )
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((BATCH, 1, 28, 28)), ms.float32)
    t = ms.Tensor([0, 57, 120, 199], ms.int32)
    for name, a, b in zip(["output", *names], output_and_grads(bf16, x, t), output_and_grads(fp32, x, t), strict=True):
        # relative to the tensor's norm: a bf16 network rounds at every conv, errors add over ~20 layers
        error = np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12)
        assert error < 5 * BF16_TOL, f"{name}: {error:.4f}"


def tiny_config(precision: Precision) -> Config:
    config = Config()
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, dim=8, dim_mults=(1, 2)),
        train=dataclasses.replace(
            config.train,
            precision=precision,
            batch_size=8,
            lr=2e-3,
            lr_schedule="constant",
            warmup_steps=0,
            ema_decay=0.0,
        ),
        data=dataclasses.replace(config.data, limit=64),
    )


def train_losses(precision: Precision, steps: int) -> list[float]:
    """Losses of `steps` Adam steps on one fixed batch (the same weights, data and noise for any precision)."""
    trainer = Trainer(tiny_config(precision))
    rng = np.random.default_rng(0)
    x0 = ms.Tensor(np.tanh(rng.standard_normal((8, 1, 28, 28))), ms.float32)
    t = ms.Tensor(rng.integers(0, trainer.diffusion.timesteps, (8,)), ms.int32)
    noise = ms.Tensor(rng.standard_normal((8, 1, 28, 28)), ms.float32)
    return [trainer.train_step(x0, t, noise, ema_decay=0.0) for _ in range(steps)]


def test_one_bf16_training_step_is_close_to_fp32_and_training_lowers_the_loss_alike(library):
    fp32, bf16 = train_losses("fp32", 25), train_losses("bf16", 25)
    assert abs(bf16[0] - fp32[0]) < BF16_TOL * fp32[0], "the first step's loss (same weights and batch)"
    assert abs(bf16[1] - fp32[1]) < 2 * BF16_TOL * fp32[1], "after one update"
    for losses in (fp32, bf16):
        assert losses[-1] < 0.7 * losses[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.15 * fp32[-1], f"bf16 {bf16[-1]:.4f} against fp32 {fp32[-1]:.4f}"
