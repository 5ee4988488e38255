"""ddpm.ema's flat EMA (ddpm/kernels' EmaUpdate where it runs) against what it replaced (one update
per parameter tensor): the same training, bit for bit, and the same checkpoint layout."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ddpm.checkpoint import EMA_PREFIX
from ddpm.ema import EMA, ema_decay_at
from ddpm.layers import network_layers
from ddpm.train import Trainer


class PerParameterEMA(nn.Cell):
    """The update the flat buffer replaced: four kernels per parameter tensor."""

    def __init__(self, params):
        super().__init__()
        self.shadow = ms.ParameterTuple(
            [ms.Parameter(p.value().copy(), name="reference." + p.name, requires_grad=False) for p in params]
        )
        self.hyper_map = ops.HyperMap()

    def construct(self, params, decay):
        return self.hyper_map(ops.partial(_update, decay), self.shadow, params)


def _update(decay, shadow, param):
    return ops.assign(shadow, shadow * decay + param * (1.0 - decay))


def reference_step(trainer: Trainer):
    """The step as it was: the same Adam (tests/test_optim.py holds the native one to nn.Adam), then
    the per-parameter EMA reading the updated parameters."""
    layers = network_layers(trainer.config.train.precision)
    optimizer = layers.adam(trainer.net.trainable_params(), ms.Tensor(trainer.lr), trainer.config.train.adam_beta2)
    ema = PerParameterEMA(trainer.net.trainable_params())

    def loss_fn(x0, t, noise):
        return trainer.diffusion.training_loss(trainer.net, x0, t, noise)

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(x0, t, noise, decay):
        loss, grads = grad_fn(x0, t, noise)
        loss = ops.depend(loss, optimizer(grads))
        return ops.depend(loss, ema(optimizer.parameters, decay))

    return step, optimizer, ema


def bits(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.asnumpy()).view(np.uint32)


def test_training_equals_the_per_parameter_update_bit_for_bit(tiny_config):
    config = tiny_config(train={"ema_decay": 0.9})
    fused, reference = Trainer(config), Trainer(config)  # the same seed: the same initial weights
    step, optimizer, ema = reference_step(reference)
    rng = np.random.default_rng(0)
    shape = (16, 1, config.model.image_size, config.model.image_size)
    for n in range(4):
        x0 = ms.Tensor(rng.uniform(-1, 1, shape).astype(np.float32))
        t = ms.Tensor(rng.integers(0, 50, 16).astype(np.int32))
        noise = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
        decay = ema_decay_at(n, 0.9)
        loss = fused.train_step(x0, t, noise, decay)
        assert loss == float(step(x0, t, noise, ms.Tensor(decay, ms.float32)).asnumpy())
    state = {p.name: p for p in fused.parameters()}
    expected = {p.name: p for p in optimizer.get_parameters() if p.name != "learning_rate"}
    expected.update({EMA_PREFIX + s.name.removeprefix("reference."): s for s in ema.shadow})
    assert set(state) == set(expected)  # the checkpoint layout: weights, Adam's state, ema.<name>
    for name, tensor in expected.items():
        np.testing.assert_array_equal(bits(state[name]), bits(tensor), err_msg=name)
    first = fused.net.trainable_params()[0].name
    assert not np.array_equal(bits(state[EMA_PREFIX + first]), bits(state[first]))  # it averaged, not copied


def test_shadows_split_the_buffer_and_load_rebuilds_it():
    params = [
        ms.Parameter(ms.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), "a.weight"),
        ms.Parameter(ms.Tensor(np.array([7.0, 8.0], np.float32)), "a.bias"),
    ]
    ema = EMA(params)
    shadows = ema.shadows()
    assert [(s.name, s.shape) for s in shadows] == [("ema.a.weight", (2, 3)), ("ema.a.bias", (2,))]
    original = params[0].asnumpy().copy()
    params[0].set_data(ms.Tensor(original * 10))
    ema(params, ms.Tensor(0.0, ms.float32))  # assigns the buffer in place: the shadows are the new weights
    np.testing.assert_array_equal(ema.flat.asnumpy(), np.array([0, 10, 20, 30, 40, 50, 7, 8], np.float32))
    np.testing.assert_array_equal(shadows[0].asnumpy(), original)  # copies, not views of the buffer
    loaded = {s.name: ms.Tensor(s.asnumpy() * 2) for s in shadows}
    ema.load(loaded)
    np.testing.assert_array_equal(ema.flat.asnumpy(), np.array([0, 2, 4, 6, 8, 10, 14, 16], np.float32))
    with pytest.raises(ValueError, match=r"ema.a.bias: shape \(3,\), expected \(2,\)"):
        ema.load({**loaded, "ema.a.bias": ms.Tensor(np.zeros(3, np.float32))})


def test_a_restored_trainer_holds_the_saved_averages(tiny_config):
    from ddpm import checkpoint as ckpt

    config = tiny_config(train={"ema_decay": 0.9})
    trained = Trainer(config)
    assert trained.ema is not None  # ema_decay > 0
    trained.ema.flat.set_data(ms.Tensor(np.linspace(-1, 1, trained.ema.flat.shape[0], dtype=np.float32)))
    path = ckpt.save_checkpoint(config.train.checkpoint_dir, trained.parameters(), config, 1, 4, keep=1)
    fresh = Trainer(config)
    fresh.restore(ckpt.load_checkpoint(path))
    assert fresh.ema is not None
    np.testing.assert_array_equal(bits(fresh.ema.flat), bits(trained.ema.flat))
