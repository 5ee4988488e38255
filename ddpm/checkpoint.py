"""Checkpoints: weights, optimizer and EMA state with the config beside them, written atomically.

A checkpoint is one MindSpore `.ckpt` file with a CRC check, written to a temporary name and
renamed into place, so a crash leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import yaml

from ddpm.config import Config, config_from_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.ckpt$")
META_PREFIX = "meta."  # keeps metadata apart from tensor names such as Adam's "global_step"
META_KEYS = ("format_version", "config_yaml", "epoch", "global_step")
METRICS_KEY = "metrics_json"  # the epoch's metrics; optional, so older checkpoints still load
EMA_PREFIX = "ema."
OPTIMIZER_PREFIXES = ("moment1.", "moment2.")  # nn.Adam's state
OPTIMIZER_SCALARS = {"global_step", "beta1_power", "beta2_power", "learning_rate"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back intact."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: Config
    epoch: int  # number of completed epochs
    global_step: int
    params: dict  # name -> Parameter, for net ("..."), optimizer ("moment1.*", ...) and EMA ("ema.*")
    metrics: dict = dataclasses.field(default_factory=dict)  # of the epoch that ended here


def epoch_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.ckpt"


def save_checkpoint(directory: str | Path, parameters: list, config: Config, epoch: int,
                    global_step: int, keep: int, metrics: dict[str, float] | None = None) -> Path:
    """Write epoch_NNNN.ckpt atomically, then drop all but the newest `keep` epochs."""
    meta = {**_meta(config, epoch, global_step), METRICS_KEY: json.dumps(metrics or {})}
    final = write_ckpt(epoch_path(directory, epoch), [{"name": p.name, "data": p} for p in parameters], meta)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    log.info("saved %s", final)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete epoch checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and CRC-check a checkpoint; a damaged file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta, params = read_ckpt(path, META_KEYS, FORMAT_VERSION, "delete it to fall back to the previous epoch's checkpoint")
    metrics = json.loads(_scalar(params.pop(META_PREFIX + METRICS_KEY, "{}")))
    config = config_from_dict(yaml.safe_load(meta["config_yaml"]))
    return Checkpoint(path, config, int(meta["epoch"]), int(meta["global_step"]), params, metrics)


def write_ckpt(path: str | Path, weights, meta: dict) -> Path:
    """`weights` (a Cell, or a list of {"name", "data"}) with `meta` beside them, CRC-checked, written
    to a temporary name and renamed into place."""
    import mindspore as ms  # here, not at the top: the pipeline reads checkpoint names without loading MindSpore

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.partial.ckpt"  # MindSpore insists on the .ckpt suffix
    ms.save_checkpoint(weights, str(tmp), append_dict={META_PREFIX + k: v for k, v in meta.items()}, crc_check=True)
    os.replace(tmp, path)
    return path


def read_ckpt(path: Path, keys: tuple[str, ...], version: int, fix: str) -> tuple[dict, dict]:
    """(meta, params) of a file write_ckpt wrote: `keys` of its metadata as Python values, the rest
    as Parameters. Damage, missing keys or another format `version` are a CheckpointError; `fix`
    says what to do about damage."""
    import mindspore as ms

    try:
        params = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({e}); {fix}") from None
    missing = [k for k in keys if META_PREFIX + k not in params]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: not written by ddpm, or by another part of it")
    meta = {k: _scalar(params.pop(META_PREFIX + k)) for k in keys}
    if int(meta["format_version"]) != version:
        raise CheckpointError(f"{path} has format version {meta['format_version']}, this ddpm reads {version}")
    return meta, params


def export_weights(path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write only the sampling weights (EMA if present and wanted) and the config: a slim
    checkpoint for serving, a third of a training checkpoint's size."""
    state = load_checkpoint(path)
    weights = [{"name": name, "data": p} for name, p in sampling_weights(state, use_ema).items()]
    return write_ckpt(out, weights, _meta(state.config, state.epoch, state.global_step))


def sampling_weights(state: Checkpoint, use_ema: bool = True) -> dict:
    """The network's weights to sample with, by network parameter name: the EMA copy when the
    checkpoint has one and `use_ema`, else the raw weights."""
    if use_ema and any(name.startswith(EMA_PREFIX) for name in state.params):
        return {name[len(EMA_PREFIX):]: p for name, p in state.params.items() if name.startswith(EMA_PREFIX)}
    return {name: p for name, p in state.params.items() if not _is_training_state(name)}


def _meta(config: Config, epoch: int, global_step: int) -> dict:
    return {"format_version": FORMAT_VERSION, "config_yaml": yaml.safe_dump(config.to_dict()),
            "epoch": epoch, "global_step": global_step}


def _is_training_state(name: str) -> bool:
    """Adam's moments and counters, and the EMA shadows: not needed to sample."""
    return name.startswith(EMA_PREFIX) or name.startswith(OPTIMIZER_PREFIXES) or name in OPTIMIZER_SCALARS


def _scalar(value):
    """append_dict values come back as Parameters (numbers) or plain strings."""
    return value if isinstance(value, str) else value.asnumpy().item()
