import os
import signal

import mindspore as ms
import numpy as np
import pytest

from ddpm import checkpoint as ckpt
from ddpm import train as train_module
from ddpm.callbacks import Callback
from ddpm.config import ConfigError, TrainConfig, config_from_dict
from ddpm.errors import NonFiniteLossError
from ddpm.interrupt import TrainingInterrupted
from ddpm.layers import network_layers
from ddpm.lr_schedules import learning_rates
from ddpm.resume import resume_conflicts
from ddpm.train import fit
from tests.conftest import make_tiny_config


class Recorder(Callback):
    def __init__(self):
        self.losses, self.epochs, self.resumed, self.starts, self.checkpoints = [], [], [], [], []
        self.precisions = []

    def on_train_start(self, config, start_epoch, steps_per_epoch, start_step, precision):
        self.starts.append((start_epoch, start_step))
        self.precisions.append(precision)

    def on_step_end(self, global_step, metrics):
        self.losses.append(metrics["train_loss"])

    def on_checkpoint(self, global_step):
        self.checkpoints.append(global_step)

    def on_epoch_end(self, end):
        self.epochs.append(end)

    def on_resume(self, last):
        self.resumed.append(last)


class GridRecorder(Recorder):
    """Also draws 2 samples at each report: draw_samples uses the weights of that moment."""

    def __init__(self):
        super().__init__()
        self.grids = []

    def on_epoch_end(self, end):
        super().on_epoch_end(end)
        self.grids.append(end.draw_samples(2, 0))

    def on_resume(self, last):
        super().on_resume(last)
        self.grids.append(last.draw_samples(2, 0))


def test_tiny_model_overfits_a_few_hundred_real_images(tiny_config):
    config = tiny_config(data={"limit": 256}, train={"epochs": 6, "lr": 2e-3, "batch_size": 32})
    recorder = Recorder()
    fit(config, [recorder], progress=False)
    first, last = np.mean(recorder.losses[:8]), np.mean(recorder.losses[-8:])
    assert last < 0.65 * first, (first, last)  # measured: 0.45 -> 0.25
    assert [e.epoch for e in recorder.epochs] == list(range(6))


def test_a_v_prediction_model_learns_too(tiny_config):
    config = tiny_config(
        data={"limit": 256}, diffusion={"prediction": "v"}, train={"epochs": 6, "lr": 2e-3, "batch_size": 32}
    )
    recorder = Recorder()
    fit(config, [recorder], progress=False)
    first, last = np.mean(recorder.losses[:8]), np.mean(recorder.losses[-8:])
    # v starts near its all-zero output's loss (v is ~x0 at small t, the noise at large t)
    assert last < 0.85 * first, (first, last)  # measured: 0.333 -> 0.262


RESUMED = {"epochs": 2, "ema_decay": 0.9}  # the training the resume tests interrupt


@pytest.fixture(scope="module")
def straight(fashion_root, tmp_path_factory) -> tuple[Recorder, ckpt.Checkpoint]:
    """The training the resume tests interrupt, in one go: what its callbacks saw, and its last checkpoint."""
    tmp = tmp_path_factory.mktemp("straight")
    recorder = Recorder()
    result = fit(make_tiny_config(fashion_root, tmp, train=RESUMED), [recorder], progress=False)
    return recorder, ckpt.load_checkpoint(result.checkpoint)


def test_resume_equals_uninterrupted(tiny_config, tmp_path, straight):
    first_half = tiny_config(train={"epochs": 1, "ema_decay": 0.9, "checkpoint_dir": str(tmp_path / "b")})
    first = GridRecorder()
    fit(first_half, [first], progress=False)
    recorder = GridRecorder()
    resumed = fit(
        tiny_config(train={"epochs": 2, "ema_decay": 0.9, "checkpoint_dir": str(tmp_path / "b")}),
        [recorder],
        resume=True,
        progress=False,
    )
    assert [e.epoch for e in recorder.epochs] == [1]  # only the missing epoch ran
    last = recorder.resumed[0]  # callbacks may catch up on the epoch a crash kept them from reporting
    assert len(recorder.resumed) == 1 and last.epoch == 0 and last.metrics == first.epochs[0].metrics
    np.testing.assert_allclose(recorder.grids[0], first.grids[0], atol=1e-5)  # the same weights, restored
    _, a = straight
    b = ckpt.load_checkpoint(resumed.checkpoint)
    assert a.global_step == b.global_step == 8
    assert set(a.params) == set(b.params) and any(k.startswith("ema.") for k in a.params)
    for name in a.params:
        np.testing.assert_allclose(
            a.params[name].asnumpy(), b.params[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )


class SignalAt(Recorder):
    """Sends this process `signals` (in turn) after step `step`, as `kill` or Ctrl-C would. Raised in the
    main thread, so each signal's handler has run before the next is sent: an os.kill may be taken by
    another thread, and two SIGINTs pending at once are one."""

    def __init__(self, step, *signals):
        super().__init__()
        self.step, self.signals = step, signals

    def on_step_end(self, global_step, metrics):
        super().on_step_end(global_step, metrics)
        if global_step == self.step:
            for signum in self.signals:
                signal.raise_signal(signum)


def checkpoint_names(directory):
    return [p.name for p in ckpt.list_checkpoints(directory)]


def test_sigterm_mid_epoch_checkpoints_and_the_resume_equals_uninterrupted(tiny_config, tmp_path, straight):
    """Stopped by SIGTERM inside epoch 1 and again inside epoch 2, resumed each time: the per-step
    losses, epoch metrics and every tensor (net, Adam, EMA) equal an uninterrupted run."""

    def config(directory):
        return tiny_config(train={**RESUMED, "checkpoint_dir": str(tmp_path / directory)})

    recorded, reference = straight
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    pieces: list[Recorder] = []
    for stop_after, names in (
        (2, ["epoch_0001_step_000002.ckpt"]),
        (6, ["epoch_0001.ckpt", "epoch_0002_step_000002.ckpt"]),
    ):
        piece = SignalAt(stop_after, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted) as stopped:
            fit(config("b"), [piece], resume=bool(pieces), progress=False)
        assert stopped.value.signum == signal.SIGTERM and stopped.value.global_step == stop_after
        assert stopped.value.checkpoint.name == names[-1] and stopped.value.exit_code == 143
        assert checkpoint_names(tmp_path / "b") == names  # the mid-epoch one beside the last complete epoch
        assert piece.checkpoints[-1] == stop_after  # callbacks were told before the checkpoint was written
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        pieces.append(piece)
    last = Recorder()
    resumed = fit(config("b"), [last], resume=True, progress=False)
    assert [p.starts for p in pieces[1:]] + [last.starts] == [[(0, 2)], [(1, 6)]]  # the exact resume points
    assert last.resumed == []  # epoch 1 was reported before any checkpoint inside epoch 2 existed
    assert checkpoint_names(tmp_path / "b") == ["epoch_0001.ckpt", "epoch_0002.ckpt"]  # superseded ones gone
    losses = pieces[0].losses + pieces[1].losses + last.losses  # steps 1-2, 3-6, 7-8
    np.testing.assert_allclose(losses, recorded.losses, rtol=1e-5)
    assert [e.epoch for e in pieces[1].epochs + last.epochs] == [0, 1]
    for a, b in zip(recorded.epochs, pieces[1].epochs + last.epochs, strict=True):
        assert a.global_step == b.global_step
        assert a.metrics["train_loss_epoch"] == pytest.approx(b.metrics["train_loss_epoch"], rel=1e-5)
    a = reference
    b = ckpt.load_checkpoint(resumed.checkpoint)
    assert a.global_step == b.global_step == 8 and set(a.params) == set(b.params)
    for name in a.params:
        np.testing.assert_allclose(
            a.params[name].asnumpy(), b.params[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_a_second_ctrl_c_interrupts_at_once(tiny_config):
    config = tiny_config()
    # Python's own handler, whatever an earlier test in this process left (conftest puts that back after)
    before = signal.default_int_handler
    signal.signal(signal.SIGINT, before)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        fit(config, [SignalAt(1, signal.SIGINT, signal.SIGINT)], progress=False)
    assert type(interrupted.value) is KeyboardInterrupt  # the default handler's, not a checkpointed stop
    assert ckpt.list_checkpoints(config.train.checkpoint_dir) == []
    assert signal.getsignal(signal.SIGINT) is before


class Listing(Recorder):
    def __init__(self, directory):
        super().__init__()
        self.directory, self.seen = directory, {}

    def on_step_end(self, global_step, metrics):
        super().on_step_end(global_step, metrics)
        self.seen[global_step] = checkpoint_names(self.directory)


def test_checkpoint_minutes_checkpoint_inside_epochs_and_keep_the_last_complete_one(tiny_config):
    config = tiny_config(train={"epochs": 2, "checkpoint_minutes": 1e-9})  # due after every step
    listing = Listing(config.train.checkpoint_dir)
    fit(config, [listing], progress=False)
    seen = listing.seen  # before the checkpoint of each step
    assert seen[2] == ["epoch_0001_step_000001.ckpt"] and seen[4] == ["epoch_0001_step_000003.ckpt"]
    assert seen[5] == ["epoch_0001.ckpt"]  # the end of epoch 1 superseded its mid-epoch checkpoints
    assert seen[6] == ["epoch_0001.ckpt", "epoch_0002_step_000001.ckpt"]
    assert checkpoint_names(config.train.checkpoint_dir) == ["epoch_0001.ckpt", "epoch_0002.ckpt"]
    assert listing.checkpoints == list(range(1, 9))
    with pytest.raises(ConfigError, match=r"train\.checkpoint_minutes: must be >= 0"):
        tiny_config(train={"checkpoint_minutes": -1})


def test_a_mid_epoch_checkpoint_holds_the_partial_epoch(tiny_config):
    config = tiny_config(train={"epochs": 1})
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(config, [SignalAt(3, signal.SIGTERM)], progress=False)
    state = ckpt.load_checkpoint(stopped.value.checkpoint)
    assert state.progress is not None
    assert (state.epoch, state.global_step, state.progress.step, len(state.progress.losses)) == (0, 3, 3, 3)
    assert state.progress.seconds > 0


def test_write_ckpt_fsyncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (tmp_path / "w.ckpt").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    weights = [{"name": "w", "data": ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w")}]
    ckpt.write_ckpt(tmp_path / "w.ckpt", weights, {"format_version": 1})
    assert synced == [(str(tmp_path / ".w.partial.ckpt"), False), (str(tmp_path), True)]


def test_existing_checkpoints_need_resume(tiny_config):
    config = tiny_config()
    fit(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        fit(config, progress=False)


def test_resume_refuses_a_different_model(tiny_config):
    fit(tiny_config(), progress=False)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.dim"):
        fit(tiny_config(model={"dim": 12}, train={"epochs": 2}), resume=True, progress=False)


def test_evaluation_settings_do_not_block_a_resume():
    saved = config_from_dict({})
    looked_at = config_from_dict(
        {
            "sample": {"steps": 10},
            "evaluate": {"fid_samples": 500},
            "classifier": {"epochs": 1},
            "train": {"epochs": 20, "lr_epochs": 10},  # longer, on the same learning-rate curve
        }
    )
    assert resume_conflicts(saved, looked_at) == []
    assert resume_conflicts(saved, config_from_dict({"train": {"lr": 1e-3}})) == ["train.lr: 0.0001 -> 0.001"]


def test_nan_loss_stops_within_one_step(tiny_config, monkeypatch):
    build = train_module.build_unet

    def poisoned(model_config, *precision):
        net = build(model_config, *precision)
        p = net.trainable_params()[0]
        p.set_data(p.value() * float("nan"))
        return net

    monkeypatch.setattr(train_module, "build_unet", poisoned)
    recorder = Recorder()
    config = tiny_config()
    with pytest.raises(NonFiniteLossError, match="step 1;"):
        fit(config, [recorder], progress=False)
    assert recorder.losses == []
    assert ckpt.list_checkpoints(config.train.checkpoint_dir) == []


def test_checkpoint_round_trip_and_crc(tiny_config):
    config = tiny_config()
    result = fit(config, progress=False)
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state.config == config and state.epoch == 1 and state.global_step == 4
    assert state.metrics["train_loss_epoch"] > 0
    good = result.checkpoint.read_bytes()
    for position in (0, 100, len(good) // 2, len(good) - 1):  # first, early, middle and last byte
        data = bytearray(good)
        data[position] ^= 0x01
        result.checkpoint.write_bytes(bytes(data))
        with pytest.raises(ckpt.CheckpointError, match=str(result.checkpoint)):
            ckpt.load_checkpoint(result.checkpoint)
    result.checkpoint.write_bytes(good[:-7])
    with pytest.raises(ckpt.CheckpointError, match=str(result.checkpoint)):
        ckpt.load_checkpoint(result.checkpoint)
    with pytest.raises(ckpt.CheckpointError, match=f"{result.checkpoint} is damaged.*delete it"):
        fit(tiny_config(train={"epochs": 2}), resume=True, progress=False)  # a resume names it too
    assert not list(result.checkpoint.parent.glob(".*partial*"))


@pytest.mark.parametrize("setting", ["fp32", "auto"])
def test_the_resolved_precision_reaches_the_callbacks_and_the_checkpoints(tiny_config, tmp_path, setting):
    recorder = Recorder()
    result = fit(tiny_config(train={"precision": setting}), [recorder], progress=False)
    resolved = network_layers(setting).precision  # auto: bf16 where the processor has bf16 units
    assert recorder.precisions == [resolved] and resolved in ("fp32", "bf16")
    assert ckpt.load_checkpoint(result.checkpoint).precision == resolved
    served = ckpt.export_weights(result.checkpoint, tmp_path / "served.ckpt")
    assert ckpt.load_checkpoint(served).precision == resolved


def test_epoch_callback_draws_samples(tiny_config):
    recorder = Recorder()
    fit(tiny_config(train={"ema_decay": 0.99}), [recorder], progress=False)
    images = recorder.epochs[0].draw_samples(3, 0)
    assert images.shape == (3, 1, 28, 28) and np.abs(images).max() <= 1.0
    np.testing.assert_array_equal(images, recorder.epochs[0].draw_samples(3, 0))


def test_adam_beta2_is_the_second_moments_decay(tiny_config):
    """After one step Adam's second moment is (1 - beta2) g^2: the same gradient, beta2 0.5 against 0.999,
    gives 500 times the moment in every element the gradient reaches."""
    moments = []
    for beta2 in (0.5, 0.999):
        trainer = train_module.Trainer(tiny_config(train={"adam_beta2": beta2}))
        rng = np.random.default_rng(0)
        x0 = rng.uniform(-1, 1, (16, 1, 28, 28)).astype(np.float32)
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        t = rng.integers(0, 50, 16).astype(np.int32)
        trainer.train_step(ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise), 0.0)
        moments.append(np.concatenate([m.asnumpy().ravel() for m in trainer.optimizer.moment2]))
    fast, default = moments
    reached = default > 1e-20
    np.testing.assert_allclose(fast[reached] / default[reached], 500.0, rtol=1e-3)
    assert reached.mean() > 0.9


def test_tutorial_lr_schedule_values():
    lr = learning_rates(TrainConfig(epochs=10, lr=1e-4, min_lr=1e-7, lr_schedule="tutorial_cosine"), 3)
    per_epoch = lr[::3]
    expected = [1.000e-4, 9.756e-5, 9.046e-5, 7.941e-5, 6.549e-5, 5.005e-5, 3.461e-5, 2.069e-5, 9.640e-6, 2.545e-6]
    np.testing.assert_allclose(per_epoch, expected, rtol=1e-3)
    assert np.all(lr[:3] == lr[0])  # constant within an epoch
    warm = learning_rates(TrainConfig(epochs=1, lr=1e-3, lr_schedule="cosine", warmup_steps=10), 100)
    assert warm[0] == pytest.approx(1e-4) and warm[9] == pytest.approx(1e-3) and warm[-1] < 1e-5


def test_the_lr_schedule_spans_lr_epochs_so_a_training_extends_on_its_own_curve():
    planned = learning_rates(TrainConfig(epochs=4, lr=1e-3, min_lr=1e-5, lr_schedule="cosine", warmup_steps=5), 10)
    first = learning_rates(
        TrainConfig(epochs=2, lr_epochs=4, lr=1e-3, min_lr=1e-5, lr_schedule="cosine", warmup_steps=5), 10
    )
    longer = learning_rates(
        TrainConfig(epochs=6, lr_epochs=4, lr=1e-3, min_lr=1e-5, lr_schedule="cosine", warmup_steps=5), 10
    )
    np.testing.assert_array_equal(first, planned[:20])  # stopped part-way along the same curve
    np.testing.assert_array_equal(longer[:40], planned)
    np.testing.assert_array_equal(longer[40:], planned[-1])  # then at the curve's last rate


def test_a_resume_may_extend_epochs_only_along_the_same_lr_curve():
    saved = config_from_dict({"train": {"epochs": 4, "lr_schedule": "cosine"}})
    message = "train.lr_epochs: the learning-rate schedule spans 4 epochs in the checkpoint and 8 now"
    assert [
        c
        for c in resume_conflicts(saved, config_from_dict({"train": {"epochs": 8, "lr_schedule": "cosine"}}))
        if c.startswith(message)
    ]
    assert (
        resume_conflicts(saved, config_from_dict({"train": {"epochs": 8, "lr_epochs": 4, "lr_schedule": "cosine"}}))
        == []
    )
    constant = config_from_dict({"train": {"epochs": 4, "lr_schedule": "constant"}})
    assert resume_conflicts(constant, config_from_dict({"train": {"epochs": 8, "lr_schedule": "constant"}})) == []
