"""Writing samples to .npy/.npz batch by batch (ddpm.arrays)."""

import itertools

import numpy as np
import pytest

from ddpm.arrays import write_arrays
from ddpm.files import partial_path

SHAPE = (10, 1, 28, 28)
BATCH = 4


def batches(images, written_before=None, path=None):
    """Yield `images` in batches of BATCH; with `path`, record the partial file's size before each batch."""
    for start in range(0, len(images), BATCH):
        if path is not None:
            written_before.append(partial_path(path).stat().st_size)
        yield images[start : start + BATCH]


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_arrays_round_trip_and_stream_to_disk(tmp_path, images, suffix):
    path = tmp_path / f"samples{suffix}"
    sizes: list[int] = []
    assert write_arrays(path, batches(images, sizes, path), SHAPE, {"sampler": "ddim", "steps": 5}) == path
    assert not partial_path(path).exists()
    # Each batch reached the file before the next was drawn: memory holds one batch, not the array.
    batch_bytes = BATCH * 28 * 28 * 4
    assert all(later - earlier >= batch_bytes for earlier, later in itertools.pairwise(sizes)), sizes
    loaded = np.load(path)
    if suffix == ".npz":
        assert sorted(loaded.files) == ["images", "sampler", "steps"]
        assert loaded["sampler"] == "ddim" and loaded["steps"] == 5
        loaded = loaded["images"]
    assert loaded.dtype == np.float32 and loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded, images)


def test_a_failed_write_leaves_no_file(tmp_path, images):
    def failing():
        yield images[:BATCH]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_arrays(tmp_path / "x.npz", failing(), SHAPE)
    with pytest.raises(ValueError, match="got 4 images, expected 10"):
        write_arrays(tmp_path / "x.npy", iter([images[:BATCH]]), SHAPE)
    assert list(tmp_path.iterdir()) == []
