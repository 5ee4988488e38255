import mindspore as ms
import numpy as np
import pytest

from ddpm.config import ModelConfig
from ddpm.unet import Unet, build_unet, count_parameters

TUTORIAL_PARAMETERS = 2_992_180  # the tutorial's network in MindSpore 2.10 (see the reference)


def test_tutorial_network_has_the_tutorials_parameter_count():
    net = build_unet(ModelConfig())
    assert count_parameters(net) == TUTORIAL_PARAMETERS
    names = [p.name for p in net.trainable_params()]
    assert len(names) == len(set(names)), "parameter names must be unique for checkpoints"


@pytest.mark.parametrize("t", [0, 1, 99, 199])
def test_output_shape_matches_input_for_several_t(t):
    ms.set_seed(0)
    net = Unet(28, 1, (1, 2, 4))
    x = ms.Tensor(np.random.default_rng(t).standard_normal((2, 1, 28, 28)), ms.float32)
    out = net(x, ms.Tensor(np.full((2,), t), ms.int32))
    assert out.shape == (2, 1, 28, 28)
    assert np.isfinite(out.asnumpy()).all()


def test_time_changes_the_output():
    ms.set_seed(0)
    net = Unet(8, 1, (1, 2))
    x = ms.Tensor(np.random.default_rng(0).standard_normal((1, 1, 28, 28)), ms.float32)
    a = net(x, ms.Tensor([3], ms.int32)).asnumpy()
    b = net(x, ms.Tensor([150], ms.int32)).asnumpy()
    assert np.abs(a - b).max() > 1e-4
