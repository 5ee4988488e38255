"""An exponential moving average of the weights, the copy that samples (Ho et al., 2020, appendix B).

The shadows live in one flat float32 buffer, updated by one expression over all parameters: a
concatenation of the weights, two products, a sum and an assignment, six kernels where one update
per parameter tensor launched four each; with ddpm/kernels one operator (EmaUpdate) that reads the
weights where they are, without the concatenation's copies (docs/performance.md, "Kernels per
training step"). Each element is computed as before, shadow * decay + param * (1 - decay) in
float32, so the averages are the same bit for bit.
Checkpoints still hold one tensor per parameter (`ema.<name>`), split out of the buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ddpm.checkpoint import EMA_PREFIX

EMA_RAMP = 10  # the decay ramps as (1 + n) / (EMA_RAMP + n), so early weights fade fast
FLAT_SUFFIX = "flat"  # the buffer's own name after the prefix; never written to a checkpoint


class EMA(nn.Cell):
    """Shadow copies of the weights, updated after every optimizer step."""

    def __init__(self, params: Sequence[ms.Parameter], update: ops.Custom | None = None, prefix: str = EMA_PREFIX):
        """`update`: an operator doing the update in place (ddpm/kernels' EmaUpdate,
        `Layers.ema_update`), else MindSpore's expression does it. `prefix` names the shadows
        (`ema.<name>`; a post-hoc profile's `posthoc.<sigma_rel>.<name>`)."""
        super().__init__()
        self.names = [prefix + p.name for p in params]
        self.prefix = prefix
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.cumsum([0, *self.sizes])
        flat = _concat([p.asnumpy() for p in params])
        self.flat = ms.Parameter(ms.Tensor(flat), prefix + FLAT_SUFFIX, requires_grad=False)
        self.update = update

    def construct(self, params, decay):
        if self.update is not None:
            return self.update(decay, self.flat, *params)
        weights = ops.concat([p.reshape(-1) for p in params])
        return ops.assign(self.flat, self.flat * decay + weights * (1.0 - decay))

    def shadows(self) -> list[ms.Parameter]:
        """The averages as one Parameter per weight (`ema.<name>`, copies): what a checkpoint holds."""
        flat = self.flat.asnumpy()
        return [
            ms.Parameter(ms.Tensor(flat[a:b].reshape(shape).copy()), name, requires_grad=False)  # not views
            for name, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True)
        ]

    def load(self, tensors: Mapping[str, ms.Tensor]) -> None:
        """Set the averages from `ema.<name>` tensors (a checkpoint's), every one of them required."""
        arrays = [tensors[name].asnumpy() for name in self.names]
        for name, shape, array in zip(self.names, self.shapes, arrays, strict=True):
            if tuple(array.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        self.flat.set_data(ms.Tensor(_concat(arrays)))

    def copy_to(self, net: nn.Cell) -> None:
        """Load the averaged weights into `net` (another instance of the trained network)."""
        weights = {s.name.removeprefix(self.prefix): s for s in self.shadows()}
        ms.load_param_into_net(net, weights, strict_load=True)


class EMAGroup(nn.Cell):
    """Several averages of the same weights (the EMA, post-hoc profiles), one decay each per step."""

    def __init__(self, averages: Sequence[EMA]):
        super().__init__()
        self.averages = nn.CellList(averages)

    def construct(self, params, decays):
        done = decays
        for i, average in enumerate(self.averages):  # unrolled when compiled
            done = ops.depend(done, average(params, decays[i]))
        return done


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.astype(np.float32, copy=False).ravel() for a in arrays])


def ema_decay_at(step: int, max_decay: float) -> float:
    return min(max_decay, (1 + step) / (EMA_RAMP + step))
