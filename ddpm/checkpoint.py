"""Checkpoints: weights, optimizer and EMA state with the config beside them, written atomically.

A checkpoint is one MindSpore `.ckpt` file with a CRC check, written to a temporary name and
renamed into place, so a crash leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import mindspore as ms
import yaml

from ddpm.config import Config, config_from_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.ckpt$")
META_PREFIX = "meta."  # keeps metadata apart from tensor names such as Adam's "global_step"
META_KEYS = ("format_version", "config_yaml", "epoch", "global_step")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back intact."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: Config
    epoch: int  # number of completed epochs
    global_step: int
    params: dict  # name -> Parameter, for net ("..."), optimizer ("moment1.*", ...) and EMA ("ema.*")


def epoch_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.ckpt"


def save_checkpoint(directory: str | Path, parameters: list, config: Config, epoch: int,
                    global_step: int, keep: int) -> Path:
    """Write epoch_NNNN.ckpt atomically, then drop all but the newest `keep` epochs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = epoch_path(directory, epoch)
    tmp = directory / f".{final.stem}.partial.ckpt"  # MindSpore insists on the .ckpt suffix
    meta = {"format_version": FORMAT_VERSION, "config_yaml": yaml.safe_dump(config.to_dict()),
            "epoch": epoch, "global_step": global_step}
    meta = {META_PREFIX + k: v for k, v in meta.items()}
    ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], str(tmp),
                       append_dict=meta, crc_check=True)
    os.replace(tmp, final)
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
    try:
        params = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({e}); "
                              "delete it to fall back to the previous epoch's checkpoint") from None
    missing = [k for k in META_KEYS if META_PREFIX + k not in params]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: not written by ddpm")
    meta = {k: params.pop(META_PREFIX + k) for k in META_KEYS}
    version = int(_scalar(meta["format_version"]))
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, this ddpm reads {FORMAT_VERSION}")
    config = config_from_dict(yaml.safe_load(_scalar(meta["config_yaml"])))
    return Checkpoint(path, config, int(_scalar(meta["epoch"])), int(_scalar(meta["global_step"])), params)


def _scalar(value):
    """append_dict values come back as Parameters (numbers) or plain strings."""
    return value if isinstance(value, str) else value.asnumpy().item()
