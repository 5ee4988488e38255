"""The classifier step: the FID feature network, trained once and reused while its settings hold."""

from __future__ import annotations

import logging
from pathlib import Path

from ddpm.config import Config
from flows.steps import CLASSIFIER_JSON, write_json

log = logging.getLogger(__name__)


def classifier(config: Config, repo: Path, progress: bool = True) -> dict:
    """Reuse the checkpoint if it was trained with these settings, else train it. Records its test
    accuracy in outputs/classifier.json."""
    from ddpm.classifier import train_classifier, trained_classifier

    network = trained_classifier(config.classifier)
    reused = network is not None
    if network is not None:
        log.info("reusing %s (test accuracy %.4f)", config.classifier.checkpoint, network.test_accuracy)
    else:
        network = train_classifier(config, progress)
    record = {"test_accuracy": network.test_accuracy, "checkpoint": config.classifier.checkpoint, "reused": reused}
    write_json(repo / CLASSIFIER_JSON, record)
    return record
