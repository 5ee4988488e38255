"""The register step: the evaluated model becomes a version of the registered model, @candidate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flows.config import PipelineConfig
from flows.registry import Registration, register_model
from flows.steps import REGISTERED_JSON, Trained, write_json


def register(pipeline: PipelineConfig, repo: Path, trained: Trained) -> Registration:
    registration = register_model(trained.run_id, trained.model_id, pipeline.registry)
    write_json(repo / REGISTERED_JSON, dataclasses.asdict(registration))
    return registration
