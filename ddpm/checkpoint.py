"""Checkpoints: weights, optimizer and EMA state with the config beside them, written atomically.

A checkpoint is one MindSpore `.ckpt` file with a CRC check, written to a temporary name, fsynced,
renamed into place and the rename fsynced, so a crash or a power loss leaves either the previous
file or the new one, never half of one. `epoch_NNNN.ckpt` holds N complete epochs;
`epoch_NNNN_step_SSSSSS.ckpt` is a mid-epoch checkpoint, S steps into epoch N (1-based), which
resumes exactly there and is deleted once a newer checkpoint supersedes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import re
from pathlib import Path

import yaml

from ddpm.config import Config, config_from_dict
from ddpm.errors import CheckpointError, CheckpointWriteError
from ddpm.files import atomic_path, final_name, remove_leftover

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.ckpt$")
MID_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})_step_(\d{6,})\.ckpt$")
CHECKPOINT_FILE = re.compile(r"^epoch_\d{4,}(_step_\d{6,})?\.ckpt$")  # either
META_PREFIX = "meta."  # keeps metadata apart from tensor names such as Adam's "global_step"
META_KEYS = ("format_version", "config_yaml", "epoch", "global_step")
METRICS_KEY = "metrics_json"  # the epoch's metrics; optional, so older checkpoints still load
PROGRESS_KEY = "progress_json"  # a mid-epoch checkpoint's EpochProgress; absent at an epoch's end
PRECISION_KEY = "precision"  # fp32 | bf16: what train.precision resolved to on the machine that trained last
EMA_PREFIX = "ema."
POSTHOC_PREFIX = "posthoc."  # post-hoc EMA profiles (ddpm.posthoc_ema): posthoc.<sigma_rel>.<parameter>
POSTHOC_DIR = "posthoc"  # in a checkpoint directory: the profiles' snapshots and the averages built from them
OPTIMIZER_PREFIXES = ("moment1.", "moment2.")  # nn.Adam's state
WRITE_PROBE = ".write_probe"  # created and deleted by check_writable
CHECKPOINT_SUFFIX = ".ckpt"
MINDSPORE_TMP_SUFFIX = ".tmp"  # ms.save_checkpoint writes x.tmp, then renames it to x.ckpt

OPTIMIZER_SCALARS = {"global_step", "beta1_power", "beta2_power", "learning_rate"}


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    """How far into an epoch a mid-epoch checkpoint is: what resuming there needs to finish the epoch
    exactly as an uninterrupted run would (its metrics included)."""

    step: int  # steps of the epoch done
    losses: tuple[float, ...]  # their losses, for the epoch's mean
    seconds: float  # training time spent in the epoch so far


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: Config
    epoch: int  # number of completed epochs
    global_step: int
    params: dict  # name -> Parameter, for net ("..."), optimizer ("moment1.*", ...) and EMA ("ema.*")
    metrics: dict = dataclasses.field(default_factory=dict)  # of the last complete epoch
    progress: EpochProgress | None = None  # into the next epoch; None at an epoch's end
    precision: str | None = None  # resolved train.precision of the last training; None before it was recorded

    @property
    def keeps_ema(self) -> bool:
        """Whether the checkpoint holds an EMA of the weights (the weights it samples with)."""
        return any(name.startswith(EMA_PREFIX) for name in self.params)


def epoch_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.ckpt"


def mid_epoch_path(directory: str | Path, epoch: int, step: int) -> Path:
    """The checkpoint `step` steps into epoch `epoch` (1-based: epoch - 1 epochs complete)."""
    return Path(directory) / f"epoch_{epoch:04d}_step_{step:06d}.ckpt"


def save_checkpoint(
    directory: str | Path,
    parameters: list,
    config: Config,
    epoch: int,
    global_step: int,
    keep: int,
    metrics: dict[str, float] | None = None,
    progress: EpochProgress | None = None,
    precision: str | None = None,
) -> Path:
    """Write epoch_NNNN.ckpt (`epoch` complete epochs), or with `progress` the mid-epoch checkpoint
    that far into the next epoch, atomically; then drop the checkpoints it supersedes: older
    mid-epoch ones, and all but the newest `keep` complete epochs (a mid-epoch checkpoint never
    replaces a complete epoch's)."""
    meta = {**_meta(config, epoch, global_step, precision), METRICS_KEY: json.dumps(metrics or {})}
    if progress is None:
        path = epoch_path(directory, epoch)
    else:
        path = mid_epoch_path(directory, epoch + 1, progress.step)
        meta[PROGRESS_KEY] = json.dumps(dataclasses.asdict(progress))
    final = write_ckpt(path, [{"name": p.name, "data": p} for p in parameters], meta)
    found = list_checkpoints(directory)
    newer = found.index(final)
    stale = [p for p in found[:newer] if MID_EPOCH_FILE.match(p.name)]
    if progress is None:
        stale += [p for p in found if EPOCH_FILE.match(p.name)][:-keep]
    for old in stale:
        old.unlink()
    log.info("saved %s", final)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in `directory` (complete epochs and mid-epoch ones), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if m := EPOCH_FILE.match(p.name):
            found.append(((int(m.group(1)), 0), p))  # N epochs done, 0 steps into the next
        elif m := MID_EPOCH_FILE.match(p.name):
            found.append(((int(m.group(1)) - 1, int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def written_here(name: str) -> bool:
    """Whether a file of this name in a checkpoint directory is one training writes: a checkpoint, its
    temporary files (ours and MindSpore's), the writability probe, or the post-hoc EMA's folder."""
    if name.endswith(MINDSPORE_TMP_SUFFIX):  # MindSpore's temporary of the .ckpt it writes
        name = name.removesuffix(MINDSPORE_TMP_SUFFIX) + CHECKPOINT_SUFFIX
    return name in (WRITE_PROBE, POSTHOC_DIR) or bool(CHECKPOINT_FILE.match(final_name(name)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in `directory`, where a resume continues."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def latest_epoch_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint of a complete epoch in `directory`."""
    found = [p for p in list_checkpoints(directory) if EPOCH_FILE.match(p.name)]
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and CRC-check a checkpoint; a damaged file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta, params = read_ckpt(
        path, META_KEYS, FORMAT_VERSION, "delete it to fall back to the previous epoch's checkpoint"
    )
    metrics = json.loads(_scalar(params.pop(META_PREFIX + METRICS_KEY, "{}")))
    progress = params.pop(META_PREFIX + PROGRESS_KEY, None)
    if progress is not None:
        fields = json.loads(_scalar(progress))
        progress = EpochProgress(fields["step"], tuple(fields["losses"]), fields["seconds"])
    precision = params.pop(META_PREFIX + PRECISION_KEY, None)
    precision = None if precision is None else _scalar(precision)
    config = config_from_dict(yaml.safe_load(meta["config_yaml"]))
    epoch, global_step = int(meta["epoch"]), int(meta["global_step"])
    return Checkpoint(path, config, epoch, global_step, params, metrics, progress, precision)


def check_writable(directory: str | Path) -> None:
    """Create `directory` and a file in it (then delete it), or raise CheckpointWriteError: an
    unwritable checkpoint directory is found before training, not after the first epoch."""
    directory = Path(directory)
    probe = directory / WRITE_PROBE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoints to {directory} ({_reason(e, directory)}): make it a "
            "writable directory or set train.checkpoint_dir to one"
        ) from None


def write_ckpt(path: str | Path, weights, meta: dict) -> Path:
    """`weights` (a Cell, or a list of {"name", "data"}) with `meta` beside them, CRC-checked, written
    to a temporary name, fsynced, renamed into place and the directory fsynced, so the rename
    survives a power loss. A failed write (full disk, unwritable directory) leaves no partial file
    and raises CheckpointWriteError naming the file and the fix; `path` keeps its previous content."""
    import mindspore as ms  # here, not at the top: the pipeline reads checkpoint names without loading MindSpore

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, durable=True) as tmp:  # tmp keeps .ckpt, the suffix MindSpore insists on
            try:
                with _mindspore_log_off():  # its "Failed to save ..." line would precede our one clear error
                    ms.save_checkpoint(
                        weights, str(tmp), append_dict={META_PREFIX + k: v for k, v in meta.items()}, crc_check=True
                    )
            except BaseException:
                remove_leftover(tmp.with_suffix(MINDSPORE_TMP_SUFFIX))  # MindSpore's own temporary of ours
                raise
    except (OSError, RuntimeError) as e:  # MindSpore reports a failed write as a RuntimeError
        raise CheckpointWriteError(
            f"could not write checkpoint {path} ({_reason(e, path.parent)}); the previous checkpoints are intact. "
            f"Free space on {path.parent} or make it writable (or set train.checkpoint_dir elsewhere), then rerun "
            "with --resume"
        ) from None
    return path


@contextlib.contextmanager
def _mindspore_log_off():
    from mindspore import log as ms_log

    logger = ms_log._get_logger()  # MindSpore's own logger object (it has no public handle)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _reason(error: BaseException, directory: Path) -> str:
    """The OS's reason for a failed write into `directory` (MindSpore wraps it in a RuntimeError)."""
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file, not a directory"
    cause = error if isinstance(error, OSError) else error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"{errno.errorcode.get(cause.errno, cause.errno)}: {cause.strerror}"
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


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
    return write_sampling_checkpoint(out, sampling_weights(state, use_ema), state)


def write_sampling_checkpoint(out: str | Path, weights: dict, state: Checkpoint) -> Path:
    """`weights` (network parameter name -> array or Parameter) with `state`'s config, epoch and step:
    a checkpoint `ddpm sample`, `ddpm evaluate` and serving read like a training's."""
    import mindspore as ms

    tensors = [
        {"name": name, "data": w if isinstance(w, ms.Parameter) else ms.Tensor(w)} for name, w in weights.items()
    ]
    return write_ckpt(out, tensors, _meta(state.config, state.epoch, state.global_step, state.precision))


def sampling_weights(state: Checkpoint, use_ema: bool = True) -> dict:
    """The network's weights to sample with, by network parameter name: the EMA copy when the
    checkpoint has one and `use_ema`, else the raw weights."""
    if use_ema and state.keeps_ema:
        return {name[len(EMA_PREFIX) :]: p for name, p in state.params.items() if name.startswith(EMA_PREFIX)}
    return {name: p for name, p in state.params.items() if not is_training_state(name)}


def _meta(config: Config, epoch: int, global_step: int, precision: str | None) -> dict:
    meta = {
        "format_version": FORMAT_VERSION,
        "config_yaml": yaml.safe_dump(config.to_dict()),
        "epoch": epoch,
        "global_step": global_step,
    }
    if precision is not None:  # None: a checkpoint from before the precision was recorded
        meta[PRECISION_KEY] = precision
    return meta


def is_training_state(name: str) -> bool:
    """Adam's moments and counters, the EMA's and the post-hoc profiles' shadows: not the network."""
    return name.startswith((EMA_PREFIX, POSTHOC_PREFIX, *OPTIMIZER_PREFIXES)) or name in OPTIMIZER_SCALARS


def _scalar(value):
    """append_dict values come back as Parameters (numbers) or plain strings."""
    return value if isinstance(value, str) else value.asnumpy().item()
