import shutil

import numpy as np
import pytest

from ddpm.data import (
    DEBIAN_DATASET_DIR,
    FILES,
    DataError,
    build_dataset,
    flip_horizontally,
    install_dataset,
    shard_order,
    verify_dataset,
)


def test_real_dataset_verifies(fashion_root):
    verify_dataset(fashion_root)


@pytest.fixture
def copy_of_data(fashion_root, tmp_path):
    root = tmp_path / "fm"
    shutil.copytree(fashion_root, root)
    return root


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_named_with_both_hashes(copy_of_data, damage):
    path = copy_of_data / "train-labels-idx1-ubyte"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "flip":
        path.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    else:
        path.unlink()
    with pytest.raises(DataError) as info:
        verify_dataset(copy_of_data)
    text = str(info.value)
    assert str(path) in text and FILES["train-labels-idx1-ubyte"] in text
    assert "ddpm fetch-data" in text  # names the fix
    if damage != "delete":
        assert len([w for w in text.split() if len(w.strip(",()")) == 64]) >= 2  # actual and expected hashes


def test_install_from_debian_package_and_refuse_bad_source(tmp_path):
    install_dataset(DEBIAN_DATASET_DIR, tmp_path / "ok")
    verify_dataset(tmp_path / "ok")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 10)
    target = tmp_path / "target"
    shutil.copytree(tmp_path / "ok", target)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte has sha256"):
        install_dataset(str(bad), target)
    verify_dataset(target)  # the good copy already there is untouched


def batches(root, seed, epoch, **kw):
    dataset = build_dataset(root, 16, seed, epoch, limit=64, **kw)
    return np.concatenate([b[0] for b in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)])


def test_batches_are_scaled_shuffled_and_replayable(fashion_root):
    a = batches(fashion_root, 0, 0, num_workers=1)
    assert a.shape == (64, 1, 28, 28) and a.dtype == np.float32
    assert a.min() == pytest.approx(-1.0) and a.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(a, batches(fashion_root, 0, 0, num_workers=2))
    assert not np.array_equal(a, batches(fashion_root, 0, 1, num_workers=1))  # new epoch, new order


def test_workers_split_every_global_batch_between_them(fashion_root):
    whole = batches(fashion_root, 0, 3).reshape(4, 16, 1, 28, 28)  # (steps, B, ...)
    parts = [batches(fashion_root, 0, 3, rank=r, world=2).reshape(4, 8, 1, 28, 28) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_shard_order_partitions_each_batch_in_rank_order():
    order = np.arange(10) * 7  # 2 batches of 4 and a remainder of 2, dropped
    assert shard_order(order, 4).tolist() == [0, 7, 14, 21, 28, 35, 42, 49]
    assert shard_order(order, 4, rank=0, world=2).tolist() == [0, 7, 28, 35]
    assert shard_order(order, 4, rank=1, world=2).tolist() == [14, 21, 42, 49]


def test_flip_mirrors_exactly_the_chosen_images():
    x0 = np.random.default_rng(0).standard_normal((3, 1, 4, 5)).astype(np.float32)
    out = flip_horizontally(x0, np.array([True, False, True]))
    np.testing.assert_array_equal(out[0], x0[0][..., ::-1])
    np.testing.assert_array_equal(out[1], x0[1])
    np.testing.assert_array_equal(out[2, 0, :, 0], x0[2, 0, :, -1])
