"""Fashion-MNIST: verify the IDX files, then FashionMnistDataset -> shuffle -> [-1, 1] -> batch (-> flip)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from ddpm.errors import DataError
from ddpm.files import atomic_path

log = logging.getLogger(__name__)

# SHA-256 of the decompressed IDX files. Mirrors ship different gzip bytes; these never differ.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEBIAN_DATASET_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
PIXEL_MAX = 255.0


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (sha256 for our checks, md5 for DVC's cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_of(path: Path) -> str:
    return file_hash(path, "sha256")


def dataset_problems(root: str | Path) -> dict[Path, str]:
    """Each IDX file in `root` that is missing or does not match its known SHA-256: what is wrong, both hashes."""
    root = Path(root)
    problems = {}
    for name, expected in FILES.items():
        path = root / name
        if not path.is_file():
            problems[path] = f"{path}: missing (expected sha256 {expected})"
            continue
        actual = sha256_of(path)
        if actual != expected:
            problems[path] = (
                f"{path}: sha256 {actual}, expected {expected} ({path.stat().st_size} bytes; truncated or altered)"
            )
    return problems


def verify_dataset(root: str | Path) -> None:
    """Check every IDX file against its known SHA-256; raise one DataError naming each bad file."""
    problems = dataset_problems(root)
    if problems:
        raise DataError(
            "Fashion-MNIST check failed:\n  "
            + "\n  ".join(problems.values())
            + f"\nFetch a clean copy: `ddpm fetch-data --root {root}` "
            "(or `python -m flows.data` to pull it through DVC)."
        )


def install_dataset(source: str, root: str | Path) -> None:
    """Copy the four files from `source` (a directory or base URL of `.gz` or raw IDX files) into
    `root`, decompressing, and verify them before they replace anything already there."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as staged:  # renamed into place only once all four are verified
        for name, expected in FILES.items():
            tmp = staged.enter_context(atomic_path(root / name))
            _fetch_one(source, name, tmp)
            actual = sha256_of(tmp)
            if actual != expected:
                raise DataError(f"{source}: {name} has sha256 {actual}, expected {expected}; not installed")
    log.info("installed Fashion-MNIST from %s into %s", source, root)


def _fetch_one(source: str, name: str, dest: Path) -> None:
    if "://" in source:
        with urllib.request.urlopen(f"{source.rstrip('/')}/{name}.gz") as response, open(dest, "wb") as out:
            shutil.copyfileobj(gzip.GzipFile(fileobj=response), out)
        return
    base = Path(source)
    if (base / f"{name}.gz").is_file():
        with gzip.open(base / f"{name}.gz", "rb") as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out)
    elif (base / name).is_file():
        shutil.copyfile(base / name, dest)
    else:
        raise DataError(f"{source}: neither {name}.gz nor {name} is there")


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image indices of one epoch, a pure function of (seed, epoch) so resume replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def shard_order(order: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """One worker's part of every global batch, in order: the first B/world images of each batch go to
    rank 0, the next to rank 1, ... (steps * B,) -> (steps * B / world,); world 1 keeps the order."""
    steps, local = len(order) // batch_size, batch_size // world
    batches = order[: steps * batch_size].reshape(steps, batch_size)  # (steps, B)
    return batches[:, rank * local : (rank + 1) * local].ravel()


def build_dataset(
    root: str | Path,
    batch_size: int,
    seed: int,
    epoch: int,
    limit: int = 0,
    flip: bool = False,
    num_workers: int = 1,
    usage: str = "train",
    labels: bool = False,
    drop_remainder: bool = True,
    rank: int = 0,
    world: int = 1,
):
    """One epoch of (B / world, 1, 28, 28) float32 batches in [-1, 1] (with int32 labels if `labels`):
    worker `rank`'s part of each shuffled global batch of B, drop_remainder like the tutorial unless
    told otherwise. Training flips later, per global batch (`flip_horizontally`), so that every worker
    count sees the same augmentation; `flip` here mirrors images for evaluation references."""
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore.dataset import transforms, vision

    size = TRAIN_SIZE if usage == "train" else TEST_SIZE
    num_images = min(limit, size) if limit else size
    # Flip draws come from MindSpore's dataset seed; tying it to (seed, epoch) makes epochs replayable.
    ds.config.set_seed(seed * 100_003 + epoch)
    order = epoch_order(num_images, seed, epoch)
    if world > 1:
        order = shard_order(order, batch_size, rank, world)
    dataset = ds.FashionMnistDataset(str(root), usage=usage, sampler=ds.SubsetSampler(order.tolist()))
    dataset = dataset.project(["image", "label"] if labels else ["image"])
    ops = [vision.RandomHorizontalFlip()] if flip else []
    ops += [vision.Rescale(2.0 / PIXEL_MAX, -1.0), vision.HWC2CHW()]  # uint8 (H, W, 1) -> float32 (1, H, W)
    dataset = dataset.map(ops, input_columns="image", num_parallel_workers=num_workers)
    if labels:
        dataset = dataset.map(transforms.TypeCast(ms.int32), input_columns="label")  # uint32 -> int32
    return dataset.batch(batch_size // world, drop_remainder=drop_remainder)


def flip_horizontally(x0: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Mirror the images whose entry in `flips` is True: (B, C, H, W), (B,) -> (B, C, H, W)."""
    return np.where(flips[:, None, None, None], x0[..., ::-1], x0)


def steps_per_epoch(limit: int, batch_size: int) -> int:
    num_images = min(limit, TRAIN_SIZE) if limit else TRAIN_SIZE
    return num_images // batch_size
