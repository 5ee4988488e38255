"""Evaluating a checkpoint: held-out denoising loss, and sample quality (FID, its floor, class coverage).

The checkpoint gives the network and the diffusion process; the current config says how to
evaluate it (evaluate, sample and classifier sections), so changing an evaluation setting
re-scores an old checkpoint with the new setting. Noise and samples come from evaluate.seed, so
candidates are scored on identical inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from ddpm.checkpoint_sampler import CheckpointSampler, load_sampler
from ddpm.classifier import FeatureNetwork, embed_split, load_classifier
from ddpm.config import Config
from ddpm.data import verify_dataset
from ddpm.denoising import denoising_loss
from ddpm.fid import GaussianStats, class_histogram, class_kl, fid_of, gaussian_stats
from ddpm.runtime import set_cpu_threads

log = logging.getLogger(__name__)

# Metric keys of the predicted-class shares, one per class k: of the samples, and of the real images
# of the floor (the histograms beside each other in the pipeline's report figure)
CLASS_FRACTION, REAL_CLASS_FRACTION = "class_frac_", "real_class_frac_"


def evaluate_checkpoint(
    checkpoint: str, config: Config, progress: bool = True, use_ema: bool = True
) -> dict[str, float]:
    """Denoising loss and sample quality of `checkpoint` (its EMA weights, if it has them, unless
    `use_ema` is off), evaluated as `config` says."""
    verify_dataset(config.data.root)
    sampler = load_sampler(checkpoint, config.train.device, use_ema)
    set_cpu_threads(config.train.threads)
    sampler = dataclasses.replace(sampler, config=dataclasses.replace(sampler.config, sample=config.sample))
    return {**denoising_loss(sampler, config, progress), **sample_quality(sampler, config, progress)}


@dataclasses.dataclass(frozen=True)
class FidReference:
    test: GaussianStats  # features of the first N test images
    floor: float  # FID of the first N training images against `test`: what real images score
    class_kl: float  # class KL of those N training images: the class coverage real images score
    class_fractions: np.ndarray  # (K,) their predicted-class histogram


def fid_reference(
    network: FeatureNetwork, root: str, num: int, batch_size: int, flip: bool, progress: bool = False
) -> FidReference:
    """The test-set Gaussian every FID is measured against, and the real-vs-real floor at the same N.

    With `flip`, half the real images are mirrored, as the model's training data were: a model
    trained with data.flip learns that distribution (mirrored shoes included), and the classifier's
    features are not mirror-invariant.
    """
    test, _, _ = embed_split(network, root, "test", num, batch_size, flip, progress)
    train, train_probs, _ = embed_split(network, root, "train", num, batch_size, flip, progress)
    reference = FidReference(
        gaussian_stats(test),
        fid_of(gaussian_stats(train), gaussian_stats(test)),
        class_kl(train_probs),
        class_histogram(train_probs),
    )
    log.info(
        "FID floor (%d train vs %d test images%s): %.4f; class KL of those training images %.4f (histogram %s)",
        num,
        num,
        ", half mirrored" if flip else "",
        reference.floor,
        reference.class_kl,
        np.round(reference.class_fractions, 3).tolist(),
    )
    return reference


def sample_quality(sampler: CheckpointSampler, config: Config, progress: bool = True) -> dict[str, float]:
    """fid, fid_floor, fid_ratio, class_kl and class_kl_floor of evaluate.fid_samples images drawn
    with the sample section's sampler and steps, the predicted-class shares of the samples and of the
    real images (class_frac_k, real_class_frac_k), and how long drawing them took. The real images
    are mirrored as the model's own training data were (its checkpoint's data.flip)."""
    ev = config.evaluate
    network = load_classifier(config.classifier.checkpoint, config.train.device)
    reference = fid_reference(
        network, config.data.root, ev.fid_samples, ev.batch_size, sampler.config.data.flip, progress
    )
    started = time.perf_counter()
    images = sampler.draw(ev.fid_samples, ev.seed, progress=progress)  # (N, 1, 28, 28) in [-1, 1]
    seconds = time.perf_counter() - started
    features, probs = network.embed(images, ev.batch_size)
    fid = fid_of(gaussian_stats(features), reference.test)
    fractions = class_histogram(probs)
    metrics = {
        "fid": fid,
        "fid_floor": reference.floor,
        "fid_ratio": fid / reference.floor,
        "class_kl": class_kl(probs),
        "class_kl_floor": reference.class_kl,
        "sample_seconds": seconds,
        "classifier_accuracy": network.test_accuracy,
        **{f"{CLASS_FRACTION}{k}": float(share) for k, share in enumerate(fractions)},
        **{f"{REAL_CLASS_FRACTION}{k}": float(share) for k, share in enumerate(reference.class_fractions)},
    }
    log.info(
        "FID %.4f (floor %.4f, ratio %.2f), class KL %.4f (histogram %s), %d samples in %.0f s",
        fid,
        reference.floor,
        metrics["fid_ratio"],
        metrics["class_kl"],
        np.round(fractions, 3).tolist(),
        ev.fid_samples,
        seconds,
    )
    return metrics
