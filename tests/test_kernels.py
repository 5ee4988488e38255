"""The oneDNN conv operators compute MindSpore's convolutions; the build caches and falls back cleanly.

Same tolerances as test_layers.py: float32 sums in a different order, far under any change of
the math (a wrong pad, a flipped kernel or a transposed weight fails).
"""
import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ddpm.kernels import build
from ddpm.kernels.build import conv_library
from ddpm.kernels.conv import NativeConv2d
from ddpm.layers import DepthwiseConv2d, _DepthwiseConv

RTOL, ATOL = 1e-4, 1e-5
BATCH = 4

# (channels, size) of every depthwise conv in Unet(dim=28, dim_mults=(1, 2, 4)), the trained net
NETWORK_DEPTHWISE = [(18, 28), (28, 28), (28, 14), (56, 14), (56, 7), (112, 7), (224, 7), (112, 14)]


@pytest.fixture(scope="module")
def library():
    path = conv_library()
    if path is None:
        pytest.skip("oneDNN conv kernels unavailable here (the warning names why)")
    return path


class Projected(nn.Cell):
    """<conv(x, w), projection>: a scalar whose gradients are the conv's backward on `projection`."""

    def __init__(self, conv: nn.Cell, projection):
        super().__init__()
        self.conv, self.projection = conv, projection

    def construct(self, x, weight):
        return (self.conv(x, weight) * self.projection).sum()


def jitted_value_and_grads(conv: nn.Cell, x, weight, projection):
    """conv(x, weight) and the gradients of <conv(x, weight), projection> w.r.t. x and weight, under @ms.jit."""
    net = Projected(conv, projection)
    grads = ms.jit(ms.grad(net, grad_position=(0, 1)))
    forward = ms.jit(conv)
    dx, dw = grads(x, weight)
    return forward(x, weight).asnumpy(), dx.asnumpy(), dw.asnumpy()


def reference_value_and_grads(conv: nn.Cell, x, projection):
    """The same for MindSpore's own conv cell, whose weight is a Parameter."""
    def projected(x):
        return (conv(x) * projection).sum()

    grads = ms.jit(ms.grad(projected, grad_position=0, weights=conv.trainable_params()))
    dx, (dw,) = grads(x)
    return ms.jit(conv)(x).asnumpy(), dx.asnumpy(), dw.asnumpy()


def assert_all_close(fast, ref):
    for name, a, b in zip(("output", "input gradient", "weight gradient"), fast, ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, np.abs(b).max()), err_msg=name)


def random_inputs(x_shape, w_shape, y_shape, seed=0):
    rng = np.random.default_rng(seed)
    return [ms.Tensor(rng.standard_normal(s), ms.float32) for s in (x_shape, w_shape, y_shape)]


@pytest.mark.parametrize("channels, size", NETWORK_DEPTHWISE)
def test_native_depthwise_equals_mindspores_grouped_conv(library, channels, size):
    x, weight, projection = random_inputs((BATCH, channels, size, size), (channels, 1, 7, 7),
                                          (BATCH, channels, size, size))
    ref = nn.Conv2d(channels, channels, 7, pad_mode="pad", padding=3, group=channels)
    ref.weight.set_data(weight)
    fast = jitted_value_and_grads(NativeConv2d(library, pad=3, groups=channels), x, weight, projection)
    assert_all_close(fast, reference_value_and_grads(ref, x, projection))


def test_depthwise_cell_uses_the_native_kernel_and_falls_back_on_request(library):
    assert isinstance(DepthwiseConv2d(8, 7).conv, NativeConv2d)
    assert isinstance(DepthwiseConv2d(8, 7, native=False).conv, _DepthwiseConv)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """conv_library() as in a new process, with its cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    conv_library.cache_clear()
    yield tmp_path
    conv_library.cache_clear()


def test_library_is_compiled_once_into_the_cache(fresh_build):
    first = conv_library()
    assert first is not None and first.parent == fresh_build / "ddpm" / "kernels"
    mtime = first.stat().st_mtime_ns
    conv_library.cache_clear()
    assert conv_library() == first and first.stat().st_mtime_ns == mtime


def test_missing_compiler_warns_once_and_falls_back(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert conv_library() is None
        assert conv_library() is None
        assert isinstance(DepthwiseConv2d(8, 7).conv, _DepthwiseConv)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "install g++" in warnings[0]


def test_env_setting_forces_the_fallback(fresh_build, monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    assert conv_library() is None
    assert not list(fresh_build.iterdir()), "nothing compiled"
