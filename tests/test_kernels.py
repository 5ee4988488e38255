"""The native operators compute MindSpore's convolutions, GroupNorm, GELU, attention path and max-pooling;
the build caches and falls back cleanly.

Same tolerances as test_layers.py: float32 sums in a different order, far under any change of
the math (a wrong pad, a flipped kernel or a transposed weight fails).
"""

import logging
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ddpm import runtime
from ddpm.classifier import FashionClassifier
from ddpm.config import ModelConfig
from ddpm.kernels.attention import (
    NativeAttentionCore,
    NativeChannelLayerNorm,
    full_attention_core,
    linear_attention_core,
)
from ddpm.kernels.conv import Conv2d, Conv2dTranspose, NativeConv2d
from ddpm.kernels.pointwise import NativeGELU, NativeGroupNorm
from ddpm.kernels.pool import NativeMaxPool2x2
from ddpm.layers import (
    GELU,
    DepthwiseConv2d,
    FallbackLayers,
    LayerGroupNorm,
    Layers,
    NativeLayers,
    _ChannelNorm,
    _DepthwiseConv,
    _FullAttention,
    _LinearAttention,
    _Normalize,
    network_layers,
)
from ddpm.runtime import ISA_ENV, native_library
from ddpm.unet import Attention, ChannelLayerNorm, LinearAttention, build_unet

RTOL, ATOL = 1e-4, 1e-5
BATCH = 4
REFERENCE = Layers()  # MindSpore's own cells

# (channels, size) of every depthwise conv in Unet(dim=28, dim_mults=(1, 2, 4)), the trained net
NETWORK_DEPTHWISE = [(18, 28), (28, 28), (28, 14), (56, 14), (56, 7), (112, 7), (224, 7), (112, 14)]


def jitted_value_and_grads(cell: nn.Cell, x, projection):
    """cell(x) and the gradients of <cell(x), projection> w.r.t. x and each weight, under @ms.jit."""

    def projected(x):
        return (cell(x) * projection).sum()

    grads = ms.jit(ms.grad(projected, grad_position=0, weights=cell.trainable_params()))
    dx, dws = grads(x)
    return [ms.jit(cell)(x).asnumpy(), dx.asnumpy(), *(dw.asnumpy() for dw in dws)]


def assert_same_function(fast: nn.Cell, ref: nn.Cell, x_shape):
    """Same weights in both (checking the names match), then outputs and all gradients agree.
    `x_shape` is the input's shape (drawn at random), or the input itself."""
    assert [p.name for p in fast.trainable_params()] == [p.name for p in ref.trainable_params()]
    rng = np.random.default_rng(0)
    for p_fast, p_ref in zip(fast.trainable_params(), ref.trainable_params(), strict=True):
        p_ref.set_data(ms.Tensor(rng.standard_normal(p_ref.shape) * 0.2, ms.float32))
        p_fast.set_data(p_ref.value().copy())
    x = ms.Tensor(rng.standard_normal(x_shape) if isinstance(x_shape, tuple) else x_shape, ms.float32)
    projection = ms.Tensor(rng.standard_normal(ref(x).shape), ms.float32)
    names = ["output", "input gradient", *(f"gradient of {p.name}" for p in ref.trainable_params())]
    fast_values, ref_values = jitted_value_and_grads(fast, x, projection), jitted_value_and_grads(ref, x, projection)
    for name, a, b in zip(names, fast_values, ref_values, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, np.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("channels, size", NETWORK_DEPTHWISE)
def test_native_depthwise_equals_mindspores_grouped_conv(library, channels, size):
    ref = nn.Conv2d(channels, channels, 7, pad_mode="pad", padding=3, group=channels)
    assert_same_function(DepthwiseConv2d(channels, 7, library), ref, (BATCH, channels, size, size))


# (in, out, kernel, stride, padding, size, bias): the U-Net's 3x3 convs at each resolution, its
# stride-2 down-sampling, and a biased conv with uneven channels
NETWORK_DENSE = [
    (56, 28, 3, 1, 1, 28, False),
    (28, 112, 3, 1, 1, 14, False),
    (224, 112, 3, 1, 1, 7, False),
    (28, 28, 4, 2, 1, 28, False),
    (3, 5, 7, 1, 3, 9, True),
]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, size, bias", NETWORK_DENSE)
def test_native_conv_equals_mindspores(library, c_in, c_out, kernel, stride, padding, size, bias):
    ref = nn.Conv2d(c_in, c_out, kernel, stride, pad_mode="pad", padding=padding, has_bias=bias)
    fast = Conv2d(library, c_in, c_out, kernel, stride, padding, has_bias=bias)
    assert_same_function(fast, ref, (BATCH, c_in, size, size))


@pytest.mark.parametrize("c_in, c_out, size, bias", [(56, 56, 7, False), (28, 28, 14, False), (6, 4, 5, True)])
def test_native_transposed_conv_equals_mindspores(library, c_in, c_out, size, bias):
    ref = nn.Conv2dTranspose(c_in, c_out, 4, 2, pad_mode="pad", padding=1, has_bias=bias)
    fast = Conv2dTranspose(library, c_in, c_out, 4, 2, 1, has_bias=bias)
    assert_same_function(fast, ref, (BATCH, c_in, size, size))


def test_depthwise_cell_uses_the_native_kernel_and_falls_back_on_request(library):
    assert isinstance(NativeLayers(library=library).depthwise_conv(8, 7).conv, NativeConv2d)
    assert isinstance(DepthwiseConv2d(8, 7).conv, _DepthwiseConv)
    assert type(REFERENCE.depthwise_conv(8, 7)) is nn.Conv2d


def test_the_training_network_runs_its_convs_norms_gelus_and_attention_natively(library):
    for precision in ("fp32", "bf16"):
        kinds = {type(cell) for _, cell in build_unet(ModelConfig(), precision).cells_and_names()}
        assert {
            NativeConv2d,
            Conv2d,
            Conv2dTranspose,
            NativeGELU,
            NativeGroupNorm,
            NativeChannelLayerNorm,
            NativeAttentionCore,
        } <= kinds
        assert not kinds & {nn.GELU, nn.GroupNorm, GELU, _Normalize, _ChannelNorm, _LinearAttention, _FullAttention}
        if network_layers(precision).bf16 or not runtime.mindspore_convs_are_fast():  # MindSpore's: slow kernels
            assert nn.Conv2d not in kinds, "every conv on ddpm/kernels"


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native_library() as in a new process, with its cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(ISA_ENV, os.environ[ISA_ENV])  # restored after a fallback lowers it
    native_library.cache_clear()
    yield tmp_path
    native_library.cache_clear()


def test_library_is_compiled_once_into_the_cache(fresh_build):
    first = native_library()
    assert first is not None and first.parent == fresh_build / "ddpm" / "kernels"
    mtime = first.stat().st_mtime_ns
    native_library.cache_clear()
    assert native_library() == first and first.stat().st_mtime_ns == mtime


def test_missing_compiler_warns_once_and_falls_back(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert native_library() is None
        assert native_library() is None
        assert runtime.resolve_implementation.__wrapped__("CPU") == "fallback"  # uncached: as a new process
        assert isinstance(FallbackLayers().depthwise_conv(8, 7).conv, _DepthwiseConv)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == runtime.__name__]
    assert len(warnings) == 1 and "install g++" in warnings[0]


def test_env_setting_forces_the_fallback(fresh_build, monkeypatch):
    monkeypatch.setenv(runtime.NATIVE_KERNELS_ENV, "0")
    assert native_library() is None
    assert not list(fresh_build.iterdir()), "nothing compiled"


# (channels, size) of the GroupNorms and GELUs of Unet(dim=28, dim_mults=(1, 2, 4))
NETWORK_NORMS = [(18, 28), (56, 28), (28, 28), (112, 14), (56, 14), (224, 7), (112, 7)]


@pytest.mark.parametrize("channels, size", NETWORK_NORMS)
def test_native_gelu_equals_mindspores_tanh_gelu(library, channels, size):
    x_scale = 4.0  # reaches tanh's saturated range, where a wrong clamp would show
    fast, ref = NativeGELU(library), nn.GELU()
    rng = np.random.default_rng(channels)
    x = ms.Tensor(rng.standard_normal((BATCH, channels, size, size)) * x_scale, ms.float32)
    projection = ms.Tensor(rng.standard_normal((BATCH, channels, size, size)), ms.float32)
    for a, b, name in zip(
        jitted_value_and_grads(fast, x, projection),
        jitted_value_and_grads(ref, x, projection),
        ["output", "input gradient"],
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


def test_native_gelu_on_a_time_embedding(library):
    """(B, features): the small tensors of the time MLP take the single-threaded path."""
    x = ms.Tensor(np.linspace(-12, 12, 16 * 112).reshape(16, 112), ms.float32)
    np.testing.assert_allclose(NativeGELU(library)(x).asnumpy(), nn.GELU()(x).asnumpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("channels, size", NETWORK_NORMS)
@pytest.mark.parametrize("offset", [0.0, 50.0])  # a large mean: a cancelling variance or gradient would show
def test_native_group_norm_equals_mindspores(library, channels, size, offset):
    fast, ref = LayerGroupNorm(channels, 1e-5, library), nn.GroupNorm(1, channels, eps=1e-5)
    assert isinstance(fast.normalize, NativeGroupNorm)
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((BATCH, channels, size, size)) * 3 + offset
    assert_same_function(fast, ref, x)


# (channels, size) of the LinearAttentions and ChannelLayerNorms of Unet(dim=28, dim_mults=(1, 2, 4)): 4 heads
# of 32 at every level (to_qkv gives 384 channels), and the full attention of the middle
NETWORK_ATTENTION = [(28, 28), (56, 14), (112, 7), (56, 7), (28, 14)]
MID_ATTENTION = (112, 7)


@pytest.mark.parametrize("channels, size", NETWORK_ATTENTION)
@pytest.mark.parametrize("offset", [0.0, 20.0])  # a large mean: a cancelling variance or gradient would show
def test_native_channel_layer_norm_equals_mindspores(library, channels, size, offset):
    fast, ref = ChannelLayerNorm(NativeLayers(library=library), channels), ChannelLayerNorm(REFERENCE, channels)
    assert isinstance(fast.normalize, NativeChannelLayerNorm)
    x = np.random.default_rng(channels).standard_normal((BATCH, channels, size, size)) * 3 + offset
    assert_same_function(fast, ref, x)


@pytest.mark.parametrize("channels, size", NETWORK_ATTENTION)
def test_native_linear_attention_equals_mindspores(library, channels, size):
    fast, ref = LinearAttention(NativeLayers(library=library), channels), LinearAttention(REFERENCE, channels)
    assert isinstance(fast.attend, NativeAttentionCore)
    assert_same_function(fast, ref, (BATCH, channels, size, size))


def test_native_full_attention_equals_mindspores(library):
    channels, size = MID_ATTENTION
    fast, ref = Attention(NativeLayers(library=library), channels), Attention(REFERENCE, channels)
    assert isinstance(fast.attend, NativeAttentionCore)
    assert_same_function(fast, ref, (BATCH, channels, size, size))


# wide logits: near one-hot softmaxes; much wider, the float32 scores themselves lose the tolerance
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_native_attention_cores_on_wide_logits(library, scale):
    """The cores alone on q, k, v drawn wide, without the convs' averaging."""
    heads, dim_head, size = 4, 32, 14
    x = np.random.default_rng(1).standard_normal((BATCH, 3 * heads * dim_head, size, size)) * scale
    q_scale = dim_head**-0.5
    for fast, ref in [
        (linear_attention_core(library, heads, q_scale), _LinearAttention(heads, q_scale)),
        (full_attention_core(library, heads, q_scale), _FullAttention(heads, q_scale)),
    ]:
        assert_same_function(fast, ref, x)


# (channels, size) of the classifier's two poolings, and an odd size: MindSpore drops the last row and column
CLASSIFIER_POOLS = [(32, 28), (64, 14), (3, 7)]


@pytest.mark.parametrize("channels, size", CLASSIFIER_POOLS)
@pytest.mark.parametrize("relu", [False, True])  # after a ReLU most windows tie at 0: the gradient goes to the first
def test_native_max_pool_equals_mindspores(library, channels, size, relu):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((BATCH, channels, size, size))
    x = ms.Tensor(np.maximum(x - 0.8, 0.0) if relu else x, ms.float32)
    projection = ms.Tensor(rng.standard_normal((BATCH, channels, size // 2, size // 2)), ms.float32)
    fast = jitted_value_and_grads(NativeMaxPool2x2(library), x, projection)
    ref = jitted_value_and_grads(nn.MaxPool2d(2, 2), x, projection)
    for a, b, name in zip(fast, ref, ["output", "input gradient"], strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)  # a max and a copy: exact


def test_the_classifier_pools_natively(library):
    kinds = {type(cell) for _, cell in FashionClassifier((32, 64), 128).cells_and_names()}
    assert NativeMaxPool2x2 in kinds and nn.MaxPool2d not in kinds
