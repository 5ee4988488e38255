"""The training skeleton both networks use (the U-Net in `ddpm.train`, the FID classifier in
`ddpm.classifier`): a jitted step factory, the check every step's loss passes, and the
classifier's loop over one epoch's batches (the U-Net's loop is `ddpm.train.fit`).

The caller owns what is particular to its network: what a step's inputs are, the learning-rate
schedule, checkpoints and callbacks; here is what every training shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import mindspore as ms
from mindspore import nn, ops
from tqdm import tqdm

from ddpm.distributed import ONE_PROCESS, World
from ddpm.errors import NonFiniteLossError
from ddpm.logs import progress_bar


def make_train_step(
    loss_fn: Callable[..., ms.Tensor], optimizer: nn.Optimizer, ema: nn.Cell | None = None, world: World = ONE_PROCESS
) -> Callable[..., ms.Tensor]:
    """A jitted step(*inputs[, ema_decay]): the loss of `loss_fn(*inputs)`, its gradients (mean-reduced
    across data-parallel workers), the optimizer's update, then `ema(parameters, decay)` if given (an
    `ddpm.ema.EMA`; the decay is the step's last argument); returns the loss of the global batch."""
    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    parallel = world.size > 1
    if parallel:
        reduce_grads = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world.size)
        sum_over_workers = ops.AllReduce()

    @ms.jit
    def train_step(*inputs):
        loss, grads = grad_fn(*(inputs[:-1] if ema is not None else inputs))
        if parallel:  # equal local batches: the mean of the workers' means is the global batch's mean
            grads = reduce_grads(grads)
            loss = sum_over_workers(loss) / world.size
        loss = ops.depend(loss, optimizer(grads))
        if ema is not None:
            loss = ops.depend(loss, ema(optimizer.parameters, inputs[-1]))
        return loss

    return train_step


def check_loss(loss: float, epoch: int, number: int, fix: str, name: str = "") -> float:
    """`loss` of step `number` (1-based, of the whole training) in epoch `epoch` (0-based) if finite;
    else NonFiniteLossError naming the step and `fix`."""
    if not math.isfinite(loss):
        label = f"{name} " if name else ""
        raise NonFiniteLossError(f"{label}loss is {loss} at epoch {epoch + 1}, step {number}; {fix}")
    return loss


def epoch_bar(
    epoch: int,
    epochs: int,
    steps: int,
    done: int,
    progress: bool,
    batch_size: int,
    name: str = "",
    batches: Iterable | None = None,
) -> tqdm:
    """The progress bar of an epoch (`done` of its `steps` already run), over `batches` or counted by
    hand; images/s with the global `batch_size`."""
    label = f"{name} " if name else ""
    return progress_bar(
        batches,
        total=steps,
        initial=done,
        desc=f"{label}epoch {epoch + 1}/{epochs}",
        unit="step",
        enabled=progress,
        images_per_unit=batch_size,
        leave=False,
    )


def epoch_losses(
    batches: Iterable,
    step: Callable[..., float],
    *,
    epoch: int,
    epochs: int,
    steps: int,
    done: int = 0,
    global_step: int = 0,
    name: str = "",
    fix: str = "",
    progress: bool = True,
    batch_size: int = 0,
) -> Iterator[float]:
    """Run `step(*batch) -> loss` on each of an epoch's batches (`done` of its `steps` already run,
    `global_step` of the whole training) behind a progress bar (images/s with the global
    `batch_size`), yielding each loss. A non-finite loss raises NonFiniteLossError naming the step
    and `fix`, before anything after the step sees it."""
    bar = epoch_bar(epoch, epochs, steps, done, progress, batch_size, name, batches)
    try:
        for number, batch in enumerate(bar, start=global_step + 1):
            loss = check_loss(step(*batch), epoch, number, fix, name)
            bar.set_postfix(loss=f"{loss:.4f}")
            yield loss
    finally:
        bar.close()
