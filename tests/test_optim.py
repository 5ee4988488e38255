"""ddpm/kernels' Adam and EMA operators (ddpm/kernels/optim.py) against MindSpore's nn.Adam and the
EMA's own expression: the same updates, written into the parameters themselves."""

import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm.ema import EMA
from ddpm.kernels.optim import NativeAdam, ema_update_op
from ddpm.loop import make_train_step
from tests.test_ema import bits

SHAPES = [(13,), (3, 7), (1,), (2, 4, 5, 5)]  # sizes off the 8-float vector width and the threads' halves
LR = 0.05


def make_params(seed: int = 0) -> list[ms.Parameter]:
    rng = np.random.default_rng(seed)
    return [ms.Parameter(ms.Tensor(rng.standard_normal(s).astype(np.float32)), f"p{i}") for i, s in enumerate(SHAPES)]


class Loss(nn.Cell):
    """A loss that reads every parameter, so the update must wait for the forward and backward."""

    def __init__(self, params):
        super().__init__()
        self.params = ms.ParameterTuple(params)

    def construct(self, x):
        total = x.sum() * 0.0
        for p in self.params:
            total = total + ((p - x.mean()) ** 2).sum() + (p * x.sum()).sin().sum()
        return total


def train(optimizer_of, steps: int = 3) -> tuple[list[float], dict[str, np.ndarray]]:
    """Losses of `steps` steps of Adam on Loss, and every tensor of the optimizer's state after them."""
    params = make_params()
    loss = Loss(params)
    optimizer = optimizer_of(params)
    step = make_train_step(loss, optimizer)
    losses = [float(step(ms.Tensor(np.full((4,), 0.1 * (n + 1), np.float32))).asnumpy()) for n in range(steps)]
    state = {p.name: p.asnumpy().copy() for p in optimizer.get_parameters() if p.name != "learning_rate"}
    return losses, state


def test_native_adam_steps_every_parameter_in_place_as_mindspores_adam(library):
    native_losses, native = train(lambda params: NativeAdam(library, params, ms.Tensor(LR), beta2=0.99))
    losses, reference = train(lambda params: nn.Adam(params, learning_rate=ms.Tensor(LR), beta2=0.99))
    assert set(native) == set(reference)  # the checkpoint's names: weights, moment1/2.*, beta powers, step
    np.testing.assert_allclose(native_losses, losses, rtol=1e-6)
    initial = {p.name: p.asnumpy() for p in make_params()}
    for name, expected in reference.items():
        # nnacl's Adam computes the few elements past its 8-float vectors in double: ~1 ulp apart
        np.testing.assert_allclose(native[name], expected, rtol=1e-6, atol=1e-9, err_msg=name)
        if name in initial:
            assert np.abs(native[name] - initial[name]).mean() > 0.05, f"{name} was not updated in place"


def test_native_ema_update_is_the_expression_bit_for_bit(library):
    params = make_params()
    native, reference = EMA(params, ema_update_op(library, len(params))), EMA(params)
    for n, decay in enumerate((0.5, 0.9, 0.999)):
        for p in params:
            p.set_data(ms.Tensor(p.asnumpy() * 1.5 + n))  # weights that moved since the last update
        decay_t = ms.Tensor(decay, ms.float32)
        native(params, decay_t)
        reference(params, decay_t)
        np.testing.assert_array_equal(bits(native.flat), bits(reference.flat))
    assert not np.array_equal(native.flat.asnumpy(), np.concatenate([p.asnumpy().ravel() for p in params]))
