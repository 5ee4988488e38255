"""Adam and the EMA as one C++ operator each over all parameters (optim.cc), in place of a kernel per
parameter tensor (Adam) and a copy of every weight (the EMA's concatenation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import signature as sig

from ddpm.kernels.custom import aot_op


def done_flag(*args):
    """out_shape of an operator that writes its inputs: a (1,) flag, set once the update is done."""
    return [1]


def float32(*args):
    return ms.float32


def in_place_op(library: Path, name: str, written: Sequence[bool]) -> ops.Custom:
    """`name` of `library`, its inputs declared to MindSpore as read or, where `written`, written in
    place, as nn.Adam's own operator declares its weight and moments: the written tensors reach it as
    themselves, not as copies, and MindSpore runs it after every reader of them in the step and every
    later reader after it. Both declarations are needed: without the side effect the signature is
    ignored, and the operator may update a copy."""
    op = aot_op(library, name, out_shape=done_flag, out_dtype=float32)
    rw = [sig.sig_rw.RW_WRITE if w else sig.sig_rw.RW_READ for w in written]
    op.set_signatures(tuple(sig.make_sig(f"x{i}", mode) for i, mode in enumerate(rw)))
    op.add_prim_attr("side_effect_mem", True)
    return op


class NativeAdam(nn.Adam):
    """nn.Adam whose update of all parameters is one operator (AdamStep): the same state and names
    (moment1.*, moment2.*, beta1_power, beta2_power, global_step), so checkpoints move between the two."""

    def __init__(self, library: Path, params: Sequence[ms.Parameter], learning_rate, beta2: float):
        super().__init__(params, learning_rate=learning_rate, beta2=beta2)
        n = len(self._parameters)
        self.adam_step = in_place_op(library, "AdamStep", [False] * (6 + n) + [True] * (3 * n))

    def _apply_adam(self, params, beta1_power, beta2_power, moment1, moment2, lr, gradients):
        return self.adam_step(
            beta1_power, beta2_power, lr, self.beta1, self.beta2, self.eps, *gradients, *params, *moment1, *moment2
        )


def ema_update_op(library: Path, n: int) -> ops.Custom:
    """EmaUpdate(decay, flat, w[n]): flat = flat * decay + concat(w) * (1 - decay), in place."""
    return in_place_op(library, "EmaUpdate", [False, True] + [False] * n)
