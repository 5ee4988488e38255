"""An exponential moving average of the weights, the copy that samples (Ho et al., 2020, appendix B)."""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
from mindspore import nn, ops

from ddpm.checkpoint import EMA_PREFIX

EMA_RAMP = 10  # the decay ramps as (1 + n) / (EMA_RAMP + n), so early weights fade fast


class EMA(nn.Cell):
    """Shadow copies of the weights, updated after every optimizer step."""

    def __init__(self, params: Sequence[ms.Parameter]):
        super().__init__()
        self.shadow = ms.ParameterTuple(
            [ms.Parameter(p.value().copy(), name=EMA_PREFIX + p.name, requires_grad=False) for p in params]
        )
        self.hyper_map = ops.HyperMap()

    def construct(self, params, decay):
        return self.hyper_map(ops.partial(_ema_update, decay), self.shadow, params)

    def copy_to(self, net: nn.Cell) -> None:
        """Load the averaged weights into `net` (another instance of the trained network)."""
        weights = {s.name.removeprefix(EMA_PREFIX): ms.Parameter(s.value().copy()) for s in self.shadow}
        ms.load_param_into_net(net, weights, strict_load=True)


def _ema_update(decay, shadow, param):
    return ops.assign(shadow, shadow * decay + param * (1.0 - decay))


def ema_decay_at(step: int, max_decay: float) -> float:
    return min(max_decay, (1 + step) / (EMA_RAMP + step))
