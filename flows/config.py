"""The pipeline's own sections of params.yaml (fetch, tracking, registry), beside ddpm's.

Where a setting names a service (tracking URI, DVC remote), the environment wins over the file:
MLFLOW_TRACKING_URI, DDPM_DVC_REMOTE. Prefect's API comes from PREFECT_API_URL as Prefect reads it.

    uv run python -m flows.config configs/quickstart.yaml   # the `dvc exp run` options for an overlay
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm import config as ddpm_config
from ddpm.config import Config, Overrides, build_config, invalid
from ddpm.errors import run_entry_point
from ddpm.logs import configure_logging
from ddpm.params_file import is_inside, read_params

log = logging.getLogger("flows.config")

# DVC's stages read params.yaml: `dvc exp run` sets an overlay's values there (-r: nothing runs after an error)
DVC_EXAMPLE = "uv run python -m flows.config configs/quickstart.yaml | xargs -r -d '\\n' uv run dvc exp run"
SQLITE_PREFIX = "sqlite:///"  # then a path, relative unless it starts with "/"


def checkout_root() -> Path:
    """The checkout the pipeline runs for: DVC's DVC_ROOT (the original one, also for experiments
    that DVC runs in temporary copies), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


@dataclass(frozen=True)
class FetchConfig:
    # Where to bootstrap Fashion-MNIST when the DVC remote lacks it, tried in order.
    sources: tuple[str, ...] = (
        "/usr/share/datasets/fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    )
    remote: str = ""  # DVC remote name; "" = the repository's default (see .dvc/config)

    def check(self) -> list[str]:
        return [] if self.sources else ["fetch.sources: list at least one source"]


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides this
    experiment: str = "ddpm-fashion-mnist"
    log_every: int = 1  # log train_loss every N steps
    connect_timeout: float = 5.0  # seconds to wait for a tracking server before failing

    def check(self) -> list[str]:
        errors = [] if self.log_every >= 1 else [f"tracking.log_every: must be >= 1, got {self.log_every}"]
        if self.connect_timeout <= 0:
            errors.append(f"tracking.connect_timeout: must be > 0, got {self.connect_timeout}")
        return errors


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "ddpm-fashion-mnist"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    metric: str = "fid"  # the gate compares this run metric (FID on the classifier's features)
    greater_is_better: bool = False

    def check(self) -> list[str]:
        """Also what keeps the gate closed: a candidate alias equal to the champion's would make every
        registration a promotion, and a flipped direction for a known metric would promote worse models."""
        errors = [] if self.model_name else ["registry.model_name: must not be empty"]
        for key in ("candidate_alias", "champion_alias"):
            alias = getattr(self, key)
            if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
                errors.append(
                    f"registry.{key}: MLflow aliases are 1-255 letters, digits, _ or -, not 'latest' "
                    f"or v<number>; got {alias!r}"
                )
        if self.candidate_alias.lower() == self.champion_alias.lower():
            errors.append(
                f"registry.candidate_alias: must differ from champion_alias ({self.champion_alias!r}): "
                "new versions would become champion without passing the gate"
            )
        lower_is_better = ("fid", "fid_ratio", "class_kl", "eval_loss")  # what the evaluate step logs
        if self.metric in lower_is_better and self.greater_is_better:
            errors.append(
                f"registry.greater_is_better: {self.metric} is lower-is-better; true would promote worse models"
            )
        if not self.metric:
            errors.append("registry.metric: must name the run metric the gate compares, e.g. fid")
        return errors


@dataclass(frozen=True)
class WorkspaceConfig:
    lock_timeout: float = 600.0  # seconds a second pipeline in this checkout waits before it is refused

    def check(self) -> list[str]:
        return [] if self.lock_timeout >= 0 else [f"workspace.lock_timeout: must be >= 0, got {self.lock_timeout}"]


@dataclass(frozen=True)
class PipelineConfig:
    fetch: FetchConfig = field(default_factory=FetchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)

    @property
    def tracking_uri(self) -> str:
        """The store: MLFLOW_TRACKING_URI, else tracking.uri, a relative SQLite path resolved against the
        checkout, so that DVC's queued and --temp experiments (run in copies of it, DVC_ROOT naming the
        original) record into the checkout's store, not into a copy deleted after the run."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri
        path = uri.removeprefix(SQLITE_PREFIX)
        if uri.startswith(SQLITE_PREFIX) and not Path(path).is_absolute():
            return SQLITE_PREFIX + str(checkout_root() / path)
        return uri

    @property
    def dvc_remote(self) -> str:
        return os.environ.get("DDPM_DVC_REMOTE") or self.fetch.remote

    def check(self) -> list[str]:
        """Constraints across the pipeline's sections: none; each section checks its own."""
        return []


PIPELINE_SECTIONS = tuple(f.name for f in dataclasses.fields(PipelineConfig))
assert set(PIPELINE_SECTIONS) == set(ddpm_config.PIPELINE_SECTIONS), "ddpm must skip exactly these sections"


def load_params(
    path: str | Path = "params.yaml", overrides: Overrides | None = None, repo: str | Path | None = None
) -> tuple[Config, PipelineConfig]:
    """Both halves of a params file (params.yaml or an overlay of it), validated together: one error lists
    every bad field. With `repo`, the checkout the pipeline runs in, the params file (and each file it
    extends) and every path setting must be inside the checkout: a deployment's `params` and `overrides`
    come from whoever may start a run and must not reach other files of the worker."""
    root = Path(repo).resolve() if repo is not None else None
    params = read_params(path, root, (*ddpm_config.SECTIONS, *PIPELINE_SECTIONS))
    config, pipeline = params_from_dict(params.sections, overrides, params.origins)
    errors = checkout_path_errors(config, root) if root is not None else []
    if errors:
        raise invalid(errors)
    return config, pipeline


PATH_SETTINGS = ("data.root", "train.checkpoint_dir", "classifier.checkpoint")  # files the pipeline reads or writes


def checkout_path_errors(config: Config, repo: Path) -> list[str]:
    """Every path setting stays inside the checkout (symlinks resolved), and train.checkpoint_dir is a
    directory of its own there: a training clears it before the next one."""
    repo = repo.resolve()
    errors = []
    for key in PATH_SETTINGS:
        section, name = key.split(".")
        value, example = (getattr(getattr(c, section), name) for c in (config, Config()))
        path = (repo / value).resolve()
        if key == "train.checkpoint_dir" and (path == repo or path in repo.parents):
            errors.append(
                f"{key}: {value!r} is the checkout {repo} or a folder holding it; name a directory of its own "
                f"inside it, e.g. {example}"
            )
        elif not is_inside(path, repo):
            errors.append(
                f"{key}: {value!r} is outside the checkout {repo} (symlinks resolved); the pipeline reads and "
                f"writes only inside its checkout: name a path inside it, e.g. {example}"
            )
    return errors


def params_from_dict(
    raw: dict[str, Any], overrides: Overrides | None = None, origins: Mapping[str, str] | None = None
) -> tuple[Config, PipelineConfig]:
    """Both halves of `raw`, each section with its overrides applied; one error lists every bad field."""
    overrides = overrides or {}
    mine = {key: value for key, value in overrides.items() if key.split(".", 1)[0] in PIPELINE_SECTIONS}
    own = {name: value for name, value in raw.items() if name in PIPELINE_SECTIONS}
    errors, pipeline = build_config(PipelineConfig, own, mine, origins)
    ml_overrides = {key: value for key, value in overrides.items() if key not in mine}
    ml_errors, config = build_config(Config, raw, ml_overrides, origins, PIPELINE_SECTIONS)
    if config is None or pipeline is None:
        raise invalid(errors + ml_errors)
    return config, pipeline


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: MLflow params and DVC's params view alike."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def dvc_set_params(params: str | Path, base: str | Path = "params.yaml") -> list[str]:
    """`dvc exp run` options that make `base` (the file dvc.yaml's stages read) hold the resolved values of
    the params file `params` (an overlay of it): each key that differs set, each key `params` lacks removed."""
    wanted, current = (flatten(read_params(p).sections) for p in (params, base))
    sets = [f"--set-param=++{key}={hydra_value(value)}" for key, value in wanted.items() if current.get(key) != value]
    return sets + [f"--set-param=~{key}" for key in current if key not in wanted]


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar, which `dvc exp run --set-param` parses."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    # Quoted: backslashes before a quote or at the end doubled, then quotes escaped (Hydra's escaping).
    escaped = re.sub(r"(\\+)(?='|$)", r"\1\1", str(value)).replace("'", "\\'")
    return f"'{escaped}'"


def main(argv: list[str] | None = None) -> int:
    """Print the `dvc exp run` options that run the DVC stages with a params file's resolved values."""
    parser = argparse.ArgumentParser(description=main.__doc__, epilog=f"e.g. {DVC_EXAMPLE}")
    parser.add_argument("params", help="the params file, e.g. an overlay of params.yaml")
    args = parser.parse_args(argv)
    configure_logging()
    return run_entry_point(lambda: print_dvc_options(args.params), log)


def print_dvc_options(params: str) -> int:
    load_params(params, repo=Path.cwd())  # the stages validate it too: fail here, before DVC starts
    sets = dvc_set_params(params)
    log.info("%s: %d keys differ from params.yaml%s", params, len(sets), "" if sets else ": run `dvc repro`")
    sys.stdout.write("".join(f"{option}\n" for option in sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
