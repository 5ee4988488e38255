"""Adam and the EMA as one C++ operator each over all parameters (optim.cc), in place of a kernel per
parameter tensor (Adam) and a copy of every weight (the EMA's concatenation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops

from ddpm.kernels.custom import in_place_op

ADAM_SCALARS = 6  # AdamStep's leading inputs: beta1_power, beta2_power, lr, beta1, beta2, eps


class NativeAdam(nn.Adam):
    """nn.Adam whose update of all parameters is one operator (AdamStep): the same state and names
    (moment1.*, moment2.*, beta1_power, beta2_power, global_step), so checkpoints move between the two."""

    def __init__(self, library: Path, params: Sequence[ms.Parameter], learning_rate, beta2: float):
        super().__init__(params, learning_rate=learning_rate, beta2=beta2)
        n = len(self._parameters)
        self.adam_step = in_place_op(library, "AdamStep", [False] * (ADAM_SCALARS + n) + [True] * (3 * n))

    def _apply_adam(self, params, beta1_power, beta2_power, moment1, moment2, lr, gradients):
        return self.adam_step(
            beta1_power, beta2_power, lr, self.beta1, self.beta2, self.eps, *gradients, *params, *moment1, *moment2
        )


def ema_update_op(library: Path, n: int) -> ops.Custom:
    """EmaUpdate(decay, flat, w[n]): flat = flat * decay + concat(w) * (1 - decay), in place."""
    return in_place_op(library, "EmaUpdate", [False, True] + [False] * n)
