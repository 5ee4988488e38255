"""Post-hoc EMA (ddpm.posthoc_ema): the power-function profiles against their closed form, the
least-squares reconstruction against a directly tracked average, and the whole path through
training, a resume and `ddpm posthoc-ema`."""

import json
import shutil
import signal

import mindspore as ms
import numpy as np
import pytest

from ddpm import checkpoint as ckpt
from ddpm import posthoc_ema as posthoc
from ddpm.checkpoint_sampler import load_sampler
from ddpm.config import TrainConfig
from ddpm.interrupt import TrainingInterrupted
from ddpm.train import Trainer, fit
from tests.test_cli import ROOT, ddpm
from tests.test_train import SignalAt


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])  # the paper's two profiles
def test_length_and_exponent_invert_each_other(sigma_rel, gamma):
    assert posthoc.gamma_of(sigma_rel) == pytest.approx(gamma, abs=0.005)
    for g in (0.5, 3.0, gamma, 40.0):
        assert posthoc.gamma_of(posthoc.sigma_rel_of(g)) == pytest.approx(g, rel=1e-9)


def tracked(weights: np.ndarray, gamma: float, every: int) -> dict[int, np.ndarray]:
    """The profile's average after every `every` steps, updated as training does: weights (steps, n)."""
    average, out = weights[0] * 0, {}
    for step, w in enumerate(weights, start=1):
        decay = posthoc.power_decay(step, gamma)
        average = average * decay + w * (1 - decay)
        if step % every == 0:
            out[step] = average
    return out


def test_the_updates_weight_step_tau_by_the_power_functions_integral_over_it():
    """After n steps, step tau's weights count (tau^(g+1) - (tau-1)^(g+1)) / n^(g+1): the weighting
    (g+1) tau^g / n^(g+1) integrated over [tau-1, tau], which is what the reconstruction assumes."""
    n, gamma = 40, posthoc.gamma_of(0.1)
    one_hot = np.eye(n)  # step tau's "weights" are the tau-th unit vector: the average is the weighting
    tau = np.arange(1, n + 1, dtype=np.float64)
    expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / n ** (gamma + 1)
    np.testing.assert_allclose(tracked(one_hot, gamma, n)[n], expected, rtol=1e-9, atol=1e-15)


def test_a_snapshot_of_the_target_itself_is_chosen_alone():
    steps, gammas = [100, 100, 200, 200], [16.97, 6.94, 16.97, 6.94]
    fit = posthoc.solve(steps, gammas, 200, 6.94)
    np.testing.assert_allclose(fit.coefficients, [0, 0, 0, 1], atol=1e-9)
    assert fit.residual < 1e-6


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_a_reconstruction_equals_the_average_tracked_directly(sigma_rel):
    """Weights on a random walk, profiles 0.05 and 0.10 snapshotted every 250 of 3,750 steps (the quick
    start's): another length, rebuilt, is within 2% of how far the tracked average is from the last weights."""
    rng = np.random.default_rng(0)
    weights = np.cumsum(rng.standard_normal((3750, 20)), axis=0)
    snapshots = {s: tracked(weights, posthoc.gamma_of(s), 250) for s in (0.05, 0.10)}
    bases = [(step, s) for step in range(250, 3751, 250) for s in (0.05, 0.10)]
    fit = posthoc.solve(
        [b for b, _ in bases], [posthoc.gamma_of(s) for _, s in bases], 3750, posthoc.gamma_of(sigma_rel)
    )
    rebuilt = sum(c * snapshots[s][step] for c, (step, s) in zip(fit.coefficients, bases, strict=True))
    truth = tracked(weights, posthoc.gamma_of(sigma_rel), 3750)[3750]
    assert np.abs(rebuilt - truth).max() < 0.02 * np.abs(truth - weights[-1]).max()
    assert fit.residual < 0.05  # measured: 4.3%, 0.4%, 1.0%
    assert np.abs(rebuilt - truth).max() < 0.5 * np.abs(snapshots[0.05][3750] - truth).max()  # not just a profile


def test_short_lengths_over_long_trainings_stay_finite():
    """t^(gamma + 1) alone overflows float64 here (gamma 97 at sigma_rel 0.01): the products must not."""
    steps = [s for s in range(1000, 13126, 1000) for _ in (0, 1)] + [13125, 13125]
    gammas = [posthoc.gamma_of(s) for s in (0.05, 0.1)] * 14
    for sigma_rel in (0.01, 0.005, 0.28):
        fit = posthoc.solve(steps, gammas, 13125, posthoc.gamma_of(sigma_rel))
        assert np.isfinite(fit.coefficients).all() and np.isfinite(fit.residual), sigma_rel
        assert fit.coefficients.sum() == pytest.approx(1.0)


def test_bad_lengths_are_config_errors():
    assert TrainConfig(posthoc_ema=(0.05, 0.1)).check() == []
    for bad in ((0.0,), (0.3,), (0.05, 0.05), (0.0501, 0.0502)):
        assert any("train.posthoc_ema" in e for e in TrainConfig(posthoc_ema=bad).check()), bad
    assert any("train.posthoc_every" in e for e in TrainConfig(posthoc_every=0).check())
    assert TrainConfig(posthoc_ema=(0.05,), posthoc_lengths=(0.02, 0.1)).check() == []
    assert TrainConfig(posthoc_lengths=(0.02,)).check() == [
        "train.posthoc_lengths: needs train.posthoc_ema, the profiles they are rebuilt from"
    ]
    assert any("train.posthoc_lengths" in e for e in TrainConfig(posthoc_ema=(0.05,), posthoc_lengths=(0.5,)).check())


PROFILES = {"ema_decay": 0.9, "posthoc_ema": [0.05, 0.1], "posthoc_every": 3, "epochs": 2}


def test_the_trainer_tracks_each_profile_of_its_weights(tiny_config):
    """Five steps by hand, the weights recorded after each: every profile holds their power-function
    average, the EMA its own, and a checkpoint both."""
    trainer = Trainer(tiny_config(train=PROFILES))
    rng = np.random.default_rng(0)
    history = []
    for step in range(1, 6):
        x0 = ms.Tensor(rng.uniform(-1, 1, (16, 1, 28, 28)).astype(np.float32))
        t = ms.Tensor(rng.integers(0, 50, 16).astype(np.int32))
        noise = ms.Tensor(rng.standard_normal((16, 1, 28, 28)).astype(np.float32))
        trainer.train_step(x0, t, noise, 0.9, step)
        history.append(np.concatenate([p.asnumpy().ravel() for p in trainer.net.trainable_params()]))
    weights = np.stack(history).astype(np.float64)  # (steps, parameters)
    for profile, gamma in zip(trainer.profiles, trainer.gammas, strict=True):
        np.testing.assert_allclose(profile.flat.asnumpy(), tracked(weights, gamma, 5)[5], rtol=1e-4, atol=1e-6)
    names = {p.name for p in trainer.parameters()}  # what a checkpoint holds
    for prefix in ("ema.", "posthoc.0.050.", "posthoc.0.100."):
        assert len([n for n in names if n.startswith(prefix)]) == len(trainer.net.trainable_params()), prefix


@pytest.fixture(scope="module")
def trained(fashion_root, tmp_path_factory):
    """Two epochs of 4 steps with two profiles snapshotted every 3 steps, in one go."""
    from tests.conftest import make_tiny_config

    tmp = tmp_path_factory.mktemp("posthoc")
    result = fit(make_tiny_config(fashion_root, tmp, train=PROFILES), progress=False)
    return result.checkpoint


def test_training_snapshots_every_n_steps_and_at_each_epoch_end(trained):
    folder = trained.parent / posthoc.SNAPSHOT_DIR
    assert sorted(p.name for p in folder.iterdir()) == [f"step_{s:08d}.ckpt" for s in (3, 4, 6, 8)]
    state = ckpt.load_checkpoint(trained)
    (last,) = [s for s in posthoc.read_snapshots(trained.parent, state) if s.global_step == 8]
    for name, value in last.params.items():  # the last snapshot is the checkpoint's profiles
        np.testing.assert_array_equal(value.asnumpy(), state.params[name].asnumpy(), err_msg=name)


def test_a_stopped_and_resumed_training_writes_the_same_snapshots(tiny_config, tmp_path, trained):
    config = tiny_config(train={**PROFILES, "checkpoint_dir": str(tmp_path / "b")})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for stop_after in (2, 5):  # before the first snapshot, and between two
        with pytest.raises(TrainingInterrupted):
            fit(config, [SignalAt(stop_after, signal.SIGTERM)], resume=stop_after > 2, progress=False)
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    fit(config, resume=True, progress=False)
    for reference in sorted((trained.parent / posthoc.SNAPSHOT_DIR).iterdir()):
        a = ms.load_checkpoint(str(reference))
        b = ms.load_checkpoint(str(tmp_path / "b" / posthoc.SNAPSHOT_DIR / reference.name))
        assert set(a) == set(b)
        for name in (n for n in a if n.startswith(ckpt.POSTHOC_PREFIX)):
            np.testing.assert_allclose(a[name].asnumpy(), b[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def posthoc_cli(fashion_root, checkpoint, lengths, cwd):
    """`ddpm posthoc-ema`, scoring on 100 test images."""
    scoring = [f"--set=data.root={fashion_root}", "--set=evaluate.num_images=100"]
    params = ["--params", str(ROOT / "params.yaml"), *scoring]
    return ddpm("posthoc-ema", "--checkpoint", str(checkpoint), "--sigma-rel", lengths, *params, cwd=cwd)


def test_posthoc_ema_writes_checkpoints_that_sample_and_names_the_lowest_loss(trained, fashion_root):
    result = posthoc_cli(fashion_root, trained, "0.1,0.07", trained.parent)
    assert result.returncode == 0, result.stderr
    chosen = json.loads(result.stdout)
    candidates = {str(trained): chosen["ema_loss"]} | {
        str(posthoc.posthoc_path(ckpt.load_checkpoint(trained), float(s))): loss for s, loss in chosen["losses"].items()
    }
    # the raw weights (length 0) are a candidate beside the EMA
    assert set(chosen["losses"]) == {"0.100", "0.070", "0.000"} and all(np.isfinite(list(candidates.values())))
    assert chosen["checkpoint"] == min(candidates, key=candidates.__getitem__)
    assert chosen["sigma_rel"] == (None if chosen["checkpoint"] == str(trained) else float(chosen["checkpoint"][-9:-5]))
    state = ckpt.load_checkpoint(trained)
    same = ckpt.load_checkpoint(posthoc.posthoc_path(state, 0.1))  # a profile's own length: that profile
    rebuilt = ckpt.load_checkpoint(posthoc.posthoc_path(state, 0.07))
    assert same.global_step == rebuilt.global_step == 8 and same.config == state.config
    network = [n for n in state.params if not ckpt.is_training_state(n)]
    assert sorted(same.params) == sorted(rebuilt.params) == sorted(network)
    for name in network:
        profile = state.params["posthoc.0.100." + name].asnumpy()
        np.testing.assert_allclose(same.params[name].asnumpy(), profile, atol=1e-6, err_msg=name)
    moved = [
        not np.allclose(rebuilt.params[n].asnumpy(), state.params["posthoc.0.100." + n].asnumpy()) for n in network
    ]
    assert sum(moved) > len(network) // 2  # another average, not a copy of a profile
    images = load_sampler(posthoc.posthoc_path(state, 0.07)).sample(load_sampler(trained).request(2, 0, "ddim", 3, 1.0))
    assert images.shape == (2, 1, 28, 28) and np.isfinite(images).all()


def test_posthoc_ema_refuses_bad_input_in_one_line(trained, tmp_path, tiny_config, fashion_root):
    bad_length = posthoc_cli(fashion_root, trained, "0.5", tmp_path)
    assert bad_length.returncode == 2 and "--sigma-rel: must be numbers in (0, 0.28]" in bad_length.stderr

    plain = fit(tiny_config(train={"checkpoint_dir": str(tmp_path / "plain")}), progress=False).checkpoint
    none = posthoc_cli(fashion_root, plain, "0.1", tmp_path)
    assert none.returncode == 2 and "Traceback" not in none.stderr
    assert (
        none.stderr.strip()
        .splitlines()[-1]
        .endswith("train with train.posthoc_ema set (e.g. [0.05, 0.1]) to keep them")
    )

    shutil.copytree(
        trained.parent / posthoc.SNAPSHOT_DIR,
        tmp_path / "plain" / posthoc.SNAPSHOT_DIR,
        ignore=shutil.ignore_patterns("epoch_*"),
    )
    foreign = posthoc_cli(fashion_root, plain, "0.1", tmp_path)
    assert foreign.returncode == 2 and "is from another training than" in foreign.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "plain" / posthoc.SNAPSHOT_DIR).glob("epoch_*"))  # nothing written


def test_the_pipeline_counts_the_snapshots_as_the_trainings_own(trained):
    from flows.steps.train import foreign_files

    assert (trained.parent / posthoc.SNAPSHOT_DIR).is_dir() and foreign_files(trained.parent) == []
