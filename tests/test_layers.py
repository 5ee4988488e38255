"""The fast formulations compute the reference's function: outputs and gradients agree.

Tolerance: float32 round-off of differently ordered sums, a few 1e-6 relative; we allow
RTOL/ATOL below, far under any change of the math (a wrong epsilon or a missing term fails).
"""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ddpm import runtime
from ddpm.config import ModelConfig
from ddpm.layers import GELU, LAYERS, FallbackLayers, LayerGroupNorm, Layers, NativeLayers, make_layers
from ddpm.unet import Unet, build_unet

RTOL, ATOL = 1e-4, 1e-5


def value_and_grads(cell: nn.Cell, *inputs):
    """The output and the gradients of a fixed random projection of it, w.r.t. inputs and weights."""
    out = cell(*inputs)
    weight = ms.Tensor(np.random.default_rng(1).standard_normal(out.shape), ms.float32)

    def projected(*xs):
        return (cell(*xs) * weight).sum()

    grad_fn = ms.grad(projected, grad_position=0, weights=cell.trainable_params())
    input_grad, weight_grads = grad_fn(*inputs)
    return out.asnumpy(), input_grad.asnumpy(), [g.asnumpy() for g in weight_grads]


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_gelu_equals_mindspores_tanh_gelu_with_gradient():
    x = ms.Tensor(np.random.default_rng(0).standard_normal((4, 8, 7, 7)) * 4, ms.float32)
    fast, ref = value_and_grads(GELU(), x), value_and_grads(nn.GELU(), x)
    assert_close(fast[0], ref[0])
    assert_close(fast[1], ref[1])


@pytest.mark.parametrize("shape", [(3, 8, 7, 7), (2, 56, 28, 28)])
def test_group_norm_equals_mindspores_with_gradients(shape):
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(shape) * 3 + 1, ms.float32)
    fast, ref = LayerGroupNorm(shape[1], 1e-5), nn.GroupNorm(1, shape[1], eps=1e-5)  # MindSpore formulation
    gamma, beta = rng.standard_normal((2, shape[1]))
    for cell in (fast, ref):  # a non-trivial affine, the same in both
        cell.gamma.set_data(ms.Tensor(gamma, ms.float32))
        cell.beta.set_data(ms.Tensor(beta, ms.float32))
    (out_f, dx_f, dw_f), (out_r, dx_r, dw_r) = value_and_grads(fast, x), value_and_grads(ref, x)
    assert_close(out_f, out_r)
    assert_close(dx_f, dx_r)
    for a, b in zip(dw_f, dw_r, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize(
    "dim, dim_mults, implementation",
    [(8, (1, 2), None), (28, (1, 2, 4), None), (8, (1, 2), "fallback")],  # None: this process's, native on the CPU
)
def test_fast_unet_equals_reference_unet_outputs_and_gradients(dim, dim_mults, implementation):
    ms.set_seed(0)
    fast = Unet(dim, 1, dim_mults, implementation=implementation)
    ref = Unet(dim, 1, dim_mults, implementation="mindspore")
    fast_names = [p.name for p in fast.trainable_params()]
    assert fast_names == [p.name for p in ref.trainable_params()], "checkpoints must load into either"
    ms.load_param_into_net(
        ref, {p.name: ms.Parameter(p.value().copy()) for p in fast.trainable_params()}, strict_load=True
    )
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((3, 1, 28, 28)), ms.float32)
    t = ms.Tensor([0, 57, 199], ms.int32)
    out_f, dx_f, dw_f = value_and_grads(fast, x, t)
    out_r, dx_r, dw_r = value_and_grads(ref, x, t)
    assert_close(out_f, out_r)
    assert_close(dx_f, dx_r)
    for name, a, b in zip(fast_names, dw_f, dw_r, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, np.abs(b).max()), err_msg=name)


def test_the_training_network_uses_the_fast_formulations():
    from ddpm.config import ModelConfig
    from ddpm.kernels.pointwise import NativeGELU
    from ddpm.layers import DepthwiseConv2d
    from ddpm.unet import build_unet

    kinds = {type(cell) for _, cell in build_unet(ModelConfig(), "fp32").cells_and_names()}
    assert {LayerGroupNorm, DepthwiseConv2d} <= kinds
    assert kinds & {GELU, NativeGELU}  # NativeGELU where ddpm/kernels builds (tests/test_kernels.py)
    assert not kinds & {nn.GELU, nn.GroupNorm}


def test_each_implementation_has_one_layer_factory():
    assert set(LAYERS) == set(runtime.IMPLEMENTATIONS)
    assert all(factory.implementation == name for name, factory in LAYERS.items())
    assert type(make_layers("mindspore")) is Layers and type(make_layers("fallback")) is FallbackLayers


@pytest.mark.parametrize("implementation", ["mindspore", "fallback"])
def test_bf16_is_refused_off_the_native_kernels(implementation):
    with pytest.raises(ValueError, match="bf16"):
        make_layers(implementation, "bf16")


def test_native_layers_without_the_library_say_so(monkeypatch):
    monkeypatch.setattr(runtime, "native_library", lambda: None)
    with pytest.raises(RuntimeError, match="ddpm/kernels"):
        NativeLayers()


def test_a_network_build_looks_the_library_up_once(monkeypatch):
    """The implementation is decided once per process; a build asks for the library at most once, not per layer."""
    implementation = runtime.backend("fp32").implementation  # resolved before, as Trainer does
    looked_up = []
    resolved = runtime.native_library

    def native_library():
        looked_up.append(1)
        return resolved()

    monkeypatch.setattr(runtime, "native_library", native_library)
    build_unet(ModelConfig(dim=8, dim_mults=(1, 2)), "fp32")
    assert len(looked_up) == (1 if implementation == "native" else 0)
