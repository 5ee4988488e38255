"""Evaluating a checkpoint: the metric keys, FID beside its floor, and scoring by the current config."""

import dataclasses
import math

import numpy as np
import pytest

from ddpm.checkpoint_sampler import load_sampler
from ddpm.classifier import embed_split, train_classifier
from ddpm.data import build_dataset
from ddpm.evaluate import evaluate_checkpoint, fid_reference, sample_quality
from ddpm.fid import class_kl, fid_of, gaussian_stats
from ddpm.train import fit

QUALITY_KEYS = {"fid", "fid_floor", "fid_ratio", "class_kl", "class_kl_floor", "sample_seconds", "classifier_accuracy"}


def test_evaluate_reports_fid_beside_its_floor(tiny_config):
    config = tiny_config(sample={"batch_size": 64}, train={"ema_decay": 0.9})
    checkpoint = fit(config, progress=False).checkpoint
    network = train_classifier(config, progress=False)
    metrics = evaluate_checkpoint(str(checkpoint), config, progress=False)
    assert QUALITY_KEYS | {"eval_loss"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    assert metrics["fid"] > 0 and metrics["fid_floor"] > 0
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["fid_floor"])
    assert 0.0 <= metrics["class_kl"] <= math.log(10) and metrics["sample_seconds"] > 0
    assert 0.0 <= metrics["class_kl_floor"] <= math.log(10)
    # The class histograms behind the two KLs, for the report figure: shares of the 10 classes.
    for prefix, kl in (("class_frac_", "class_kl"), ("real_class_frac_", "class_kl_floor")):
        shares = np.array([metrics[f"{prefix}{k}"] for k in range(10)])
        assert shares.sum() == pytest.approx(1.0) and (shares >= 0).all()
        seen = shares > 0
        assert metrics[kl] == pytest.approx(np.sum(shares[seen] * np.log(10 * shares[seen])))
    assert metrics["classifier_accuracy"] == network.test_accuracy

    # The raw weights are another model than their EMA: other samples, another FID, same floor.
    raw = evaluate_checkpoint(str(checkpoint), config, progress=False, use_ema=False)
    assert raw["fid"] != pytest.approx(metrics["fid"]) and raw["fid_floor"] == metrics["fid_floor"]

    # The current config, not the one saved in the checkpoint, says how many images to score.
    fewer = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, fid_samples=32))
    floor = sample_quality(load_sampler(checkpoint, "CPU"), fewer, progress=False)["fid_floor"]
    assert floor != pytest.approx(metrics["fid_floor"])


def test_noise_scores_far_above_the_floor_and_mirroring_follows_the_training_data(tiny_config):
    config = tiny_config()
    network = train_classifier(config, progress=False)
    plain = fid_reference(network, config.data.root, 256, batch_size=64, flip=False)
    noise = np.random.default_rng(0).uniform(-1, 1, (256, 1, 28, 28)).astype(np.float32)
    assert fid_of(gaussian_stats(network.embed(noise, batch_size=64)[0]), plain.test) > 10 * plain.floor

    # Real images of which about half are mirrored, as a model trained with data.flip draws them,
    # sit closer to the half-mirrored reference than to the plain one.
    mirrored = fid_reference(network, config.data.root, 256, batch_size=64, flip=True)
    # another draw: other images and flips
    another = build_dataset(config.data.root, 256, seed=1, epoch=0, limit=512, flip=True, usage="test")
    x0 = next(another.create_tuple_iterator(output_numpy=True, num_epochs=1))[0]
    half_mirrored = gaussian_stats(network.embed(x0, batch_size=64)[0])
    assert fid_of(half_mirrored, mirrored.test) < fid_of(half_mirrored, plain.test)  # measured: 0.45 < 1.07

    # The class KL floor: the class coverage of the floor's real training images, mirrored likewise.
    for reference, flip in ((plain, False), (mirrored, True)):
        probs = embed_split(network, config.data.root, "train", 256, batch_size=64, flip=flip)[1]
        assert reference.class_kl == pytest.approx(class_kl(probs)) and 0.0 <= reference.class_kl < math.log(10)
