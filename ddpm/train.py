"""Training the diffusion model: `fit(config, callbacks)`, used by the CLI, the DVC stage and the
Prefect flow alike: one loop over the epochs' steps, on the jitted step the classifier shares (`ddpm.loop`).

Side effects (tracking, progress, early stopping) enter through callbacks; where a training starts
and when a checkpoint is due are `ddpm.resume`'s. A checkpoint is written at the end of every
epoch, every `train.checkpoint_minutes` within one, and at the step boundary after a SIGTERM or
SIGINT (`ddpm.interrupt`); a resume continues at the exact step, replaying the data order and the
draws of the steps it skips, so it ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm import checkpoint as ckpt
from ddpm import posthoc_ema as posthoc
from ddpm.callbacks import Callback, EpochEnd, FitResult
from ddpm.checkpoint_sampler import SampleRequest, make_noise_predictor, sample_batches
from ddpm.config import Config
from ddpm.data import build_dataset, flip_horizontally, steps_per_epoch, verify_dataset
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import ONE_PROCESS, World, init_world
from ddpm.ema import EMA, EMAGroup, ema_decay_at
from ddpm.interrupt import StopRequest, TrainingInterrupted
from ddpm.layers import network_layers
from ddpm.loop import check_loss, epoch_bar, make_train_step
from ddpm.lr_schedules import learning_rates
from ddpm.resume import Checkpointer, resume_conflicts, resume_point
from ddpm.reverse_process import NoisePredictor
from ddpm.runtime import backend, select_device, set_cpu_threads
from ddpm.unet import build_unet

log = logging.getLogger(__name__)

FLIP_PROBABILITY = 0.5  # random horizontal flip, as the tutorial's RandomHorizontalFlip
PREVIEW_SAMPLER, PREVIEW_ETA = "ddim", 1.0  # the preview grid draws fresh noise each step, as the default sampler does


LR_PARAM = "learning_rate"  # nn.Adam's per-step learning-rate parameter


class Trainer:
    """The network, optimizer and EMA of one training run, and their checkpointed state."""

    def __init__(self, config: Config, world: World = ONE_PROCESS):
        self.config = config
        self.world = world
        self.steps_per_epoch = steps_per_epoch(config.data.limit, config.train.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.limit={config.data.limit} gives no full batch of {config.train.batch_size}")
        ms.set_seed(config.train.seed)  # weight init
        self.precision = backend(config.train.precision).precision  # train.precision resolved on this device
        self.net = build_unet(config.model, self.precision)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.lr = learning_rates(config.train, self.steps_per_epoch)
        layers = network_layers(config.train.precision)  # Adam and the EMA on the network's backend
        params = self.net.trainable_params()
        self.optimizer = layers.adam(params, ms.Tensor(self.lr), config.train.adam_beta2)
        self.ema = EMA(params, layers.ema_update(len(params))) if config.train.ema_decay > 0 else None
        self.profiles = [  # post-hoc EMA's power-function averages, by sigma_rel
            EMA(params, layers.ema_update(len(params)), posthoc.profile_prefix(s)) for s in config.train.posthoc_ema
        ]
        self.gammas = [posthoc.gamma_of(s) for s in config.train.posthoc_ema]
        self.averages = ([self.ema] if self.ema is not None else []) + self.profiles  # in the order of their decays

        def loss_fn(x0, t, noise):
            return self.diffusion.training_loss(self.net, x0, t, noise)

        updates = EMAGroup(self.averages) if self.profiles else self.ema  # the EMA alone: its graph as before
        self._train_step = make_train_step(loss_fn, self.optimizer, updates, world)
        self._sampling_net: nn.Cell | None = None
        self._predict: NoisePredictor | None = None

    def train_step(self, x0: ms.Tensor, t: ms.Tensor, noise: ms.Tensor, ema_decay: float, step: int = 1) -> float:
        """One optimizer step on x0 (B, C, H, W), t (B,), noise (B, C, H, W), the EMA at `ema_decay`
        and the post-hoc profiles at their decay for update number `step` (1-based); the global
        batch's loss."""
        decays = ([ema_decay] if self.ema is not None else []) + [posthoc.power_decay(step, g) for g in self.gammas]
        if self.profiles:
            return float(self._train_step(x0, t, noise, ms.Tensor(decays, ms.float32)).asnumpy())
        return float(self._train_step(x0, t, noise, *(ms.Tensor(d, ms.float32) for d in decays)).asnumpy())

    def shadows(self) -> list[ms.Parameter]:
        """The EMA's and the post-hoc profiles' averages, one Parameter per weight each (copies)."""
        return [s for average in self.averages for s in average.shadows()]

    def parameters(self) -> list[ms.Parameter]:
        """Everything a resume needs: weights, Adam moments and step, averages (deduplicated)."""
        params = {p.name: p for p in self.optimizer.get_parameters()}
        params.update({p.name: p for p in self.shadows()})
        params.pop(LR_PARAM)  # derived from the config, which may extend the run
        return list(params.values())

    def restore(self, state: ckpt.Checkpoint) -> None:
        changed = resume_conflicts(state.config, self.config)
        if changed:
            raise ckpt.CheckpointError(
                f"{state.path} was trained with different settings ({', '.join(changed)}); "
                "resume with the same params or train into a new train.checkpoint_dir"
            )
        missing = [p.name for p in self.parameters() if p.name not in state.params]
        if missing:
            raise ckpt.CheckpointError(f"{state.path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for p in self.optimizer.get_parameters():
            if p.name != LR_PARAM:
                p.set_data(state.params[p.name].value())
        for average in self.averages:
            average.load(state.params)

    def noise_predictor(self):
        """A jitted inference forward with the weights to sample with: EMA's if on, else the live ones."""
        if self._predict is None:
            self._sampling_net = build_unet(self.config.model, self.precision) if self.ema is not None else self.net
            self._predict = make_noise_predictor(self._sampling_net, self.diffusion.schedule, self.diffusion.prediction)
        if self.ema is not None:
            self.ema.copy_to(self._sampling_net)
        return self._predict


def fit(config: Config, callbacks: Sequence[Callback] = (), resume: bool = False, progress: bool = True) -> FitResult:
    """Train `config.train.epochs` epochs, checkpointing each; with `resume`, continue after the
    newest checkpoint in `train.checkpoint_dir`, mid-epoch ones included. On SIGTERM or SIGINT,
    finish the step, checkpoint and raise TrainingInterrupted. Under msrun (`ddpm.distributed`),
    every worker calls this; rank 0 alone checkpoints and runs the callbacks, and signals act as
    without fit (msrun kills its workers on Ctrl-C)."""
    train = config.train
    select_device(train.device)
    set_cpu_threads(train.threads)
    world = init_world(train.device)
    verify_dataset(config.data.root)
    directory = Path(train.checkpoint_dir)
    if world.is_main:
        ckpt.check_writable(directory)
    trainer = Trainer(config, world)
    if not world.is_main:
        callbacks, progress = (), False
    start = resume_point(trainer, directory, resume)
    log.info("precision %s (train.precision: %s)", trainer.precision, train.precision)
    for cb in callbacks:
        cb.on_train_start(config, start.epoch, trainer.steps_per_epoch, start.global_step, trainer.precision)
    if start.epoch and start.progress is None:
        assert start.path is not None  # epochs done: their checkpoint
        last = EpochEnd(start.epoch - 1, start.global_step, start.metrics, start.path, make_sampler(trainer))
        for cb in callbacks:
            cb.on_resume(last)

    mine = world.local(train.batch_size)  # every worker draws for the global batch and keeps its part
    global_step, metrics = start.global_step, start.metrics
    with StopRequest(enabled=world.size == 1) as stop:
        saver = Checkpointer(trainer, directory, callbacks, stop, start.metrics)
        for epoch in range(start.epoch, train.epochs):
            run = Epoch(trainer, epoch, start.progress if epoch == start.epoch else None, progress)
            for x0 in run.batches():
                flips, t, noise = draw_step(run.rng, trainer)
                x0 = flip_horizontally(x0, flips[mine])
                decay = ema_decay_at(global_step, train.ema_decay)
                loss = trainer.train_step(
                    ms.Tensor(x0), ms.Tensor(t[mine]), ms.Tensor(noise[mine]), decay, global_step + 1
                )
                lr = float(trainer.lr[global_step])  # the rate this step used
                global_step += 1
                run.record(loss, global_step)  # a non-finite loss raises here, before anything sees it
                for cb in callbacks:
                    cb.on_step_end(global_step, {"train_loss": loss, "lr": lr})
                finished = run.metrics() if run.finished else None
                snapshot_if_due(trainer, directory, global_step, finished is not None)  # before the step's checkpoint
                path = saver.save_if_due(epoch, global_step, run.progress(), finished)
                if finished is not None:
                    assert path is not None  # an epoch's end is always checkpointed
                    metrics = finished
                    # Checkpointed before the callbacks report the epoch: a crash while they do loses no
                    # training. A run that is stopping leaves the report to its resume (on_resume).
                    if not stop.requested:
                        end = EpochEnd(epoch, global_step, metrics, path, make_sampler(trainer))
                        for cb in callbacks:
                            cb.on_epoch_end(end)
                if path is not None and stop.signum is not None:  # a signal, and this step is checkpointed
                    raise TrainingInterrupted(stop.signum, path, global_step, run.where)
    final = ckpt.latest_epoch_checkpoint(directory)
    if final is None:
        raise ValueError(f"nothing to train: train.epochs={train.epochs} and no checkpoint in {directory}")
    result = FitResult(final, train.epochs, global_step, metrics)
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def snapshot_if_due(trainer: Trainer, directory: Path, global_step: int, epoch_end: bool) -> None:
    """Snapshot the post-hoc profiles every train.posthoc_every steps and at each epoch's end. Before
    the step's checkpoint, so a crash between them replays the step and writes the snapshot again."""
    every = trainer.config.train.posthoc_every
    if trainer.profiles and trainer.world.is_main and (epoch_end or global_step % every == 0):
        shadows = [s for profile in trainer.profiles for s in profile.shadows()]
        posthoc.write_snapshot(directory, global_step, shadows, trainer.config)


def draw_step(rng: np.random.Generator, trainer: Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One global batch's flips (B,), timesteps t (B,) and noise (B, C, H, W), in the order training draws them."""
    config = trainer.config
    batch, model = config.train.batch_size, config.model
    shape = (batch, model.channels, model.image_size, model.image_size)
    flips = rng.random(batch) < FLIP_PROBABILITY if config.data.flip else np.zeros(batch, bool)
    t = rng.integers(0, trainer.diffusion.timesteps, size=shape[:1], dtype=np.int32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    return flips, t, noise


class Epoch:
    """One pass over the data, from `resumed.step` on if given: its batches in the epoch's fixed
    order, the generator of its draws (the skipped steps' replayed), its losses and its clock."""

    def __init__(self, trainer: Trainer, epoch: int, resumed: ckpt.EpochProgress | None, progress: bool):
        data, train, world = trainer.config.data, trainer.config.train, trainer.world
        self.epoch, self.epochs, self.steps = epoch, train.epochs, trainer.steps_per_epoch
        self.images_per_step = train.batch_size
        self.fix = (
            f"no checkpoint was written for this step. Lower train.lr (now {train.lr}) or check the data, "
            "then rerun with --resume."
        )
        done = resumed.step if resumed else 0
        self.rng = np.random.default_rng([train.seed, epoch, 1])  # flips, t and noise, replayable per epoch
        for _ in range(done):  # replay the draws of the steps the checkpoint holds
            draw_step(self.rng, trainer)
        self.dataset = build_dataset(
            data.root,
            train.batch_size,
            train.seed,
            epoch,
            data.limit,
            num_workers=data.num_workers,
            rank=world.rank,
            world=world.size,
        )
        if done:
            self.dataset = self.dataset.skip(done)  # batches, in the epoch's fixed order
        trainer.net.set_train(True)  # sampling a preview may have switched it off
        self.losses = list(resumed.losses) if resumed else []
        self.spent = resumed.seconds if resumed else 0.0
        self.started = time.perf_counter()
        self.bar = epoch_bar(self.epoch, self.epochs, self.steps, done, progress, train.batch_size)

    def batches(self) -> Iterator[np.ndarray]:
        """The epoch's remaining x0 batches (B, C, H, W)."""
        for (x0,) in self.dataset.create_tuple_iterator(output_numpy=True, num_epochs=1):
            yield x0

    def record(self, loss: float, global_step: int) -> None:
        """Count the step's loss into the epoch; a non-finite one raises NonFiniteLossError."""
        if not math.isfinite(loss):
            self.bar.close()  # before the error reaches the terminal
        self.losses.append(check_loss(loss, self.epoch, global_step, self.fix))
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.bar.update()

    @property
    def finished(self) -> bool:
        return len(self.losses) == self.steps

    @property
    def where(self) -> str:
        """Where in the training this epoch is, for a stop's message."""
        if self.finished:
            return f"end of epoch {self.epoch + 1}"
        return f"{len(self.losses)} of {self.steps} steps into epoch {self.epoch + 1}"

    def seconds(self) -> float:
        return self.spent + time.perf_counter() - self.started

    def progress(self) -> ckpt.EpochProgress:
        """The state a mid-epoch checkpoint holds."""
        return ckpt.EpochProgress(len(self.losses), tuple(self.losses), self.seconds())

    def metrics(self) -> dict[str, float]:
        """The finished epoch's metrics, logged."""
        self.bar.close()
        seconds = self.seconds()
        metrics = {
            "train_loss_epoch": float(np.mean(self.losses)),
            "epoch_seconds": seconds,
            "images_per_second": len(self.losses) * self.images_per_step / seconds,
        }
        log.info(
            "epoch %d/%d: loss %.4f, %.0f s, %.1f img/s",
            self.epoch + 1,
            self.epochs,
            metrics["train_loss_epoch"],
            seconds,
            metrics["images_per_second"],
        )
        return metrics


def make_sampler(trainer: Trainer) -> Callable[..., np.ndarray]:
    """A function drawing the preview grid with the trainer's sampling weights: DDIM with the train
    section's preview settings, never the `sample` section (the evaluation's)."""
    train, model = trainer.config.train, trainer.config.model

    def draw(num: int | None = None, seed: int | None = None, progress: bool = False) -> np.ndarray:
        request = SampleRequest(
            train.sample_num if num is None else num,
            train.sample_seed if seed is None else seed,
            PREVIEW_SAMPLER,
            train.sample_steps,
            PREVIEW_ETA,
        )
        batches = sample_batches(
            trainer.noise_predictor(),
            trainer.diffusion.schedule,
            request,
            model,
            batch_size=train.sample_num,
            clip_x0=True,
            progress=progress,
        )
        return np.concatenate(list(batches))

    return draw
