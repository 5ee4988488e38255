import shutil

import numpy as np
import pytest

from ddpm.data import DEBIAN_DATASET_DIR, FILES, DataError, build_dataset, install_dataset, verify_dataset


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


def test_batches_are_scaled_flipped_and_replayable(fashion_root):
    a = batches(fashion_root, 0, 0, num_workers=1)
    assert a.shape == (64, 1, 28, 28) and a.dtype == np.float32
    assert a.min() == pytest.approx(-1.0) and a.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(a, batches(fashion_root, 0, 0, num_workers=1))
    assert not np.array_equal(a, batches(fashion_root, 0, 1, num_workers=1))  # new epoch, new order
    plain = batches(fashion_root, 0, 0, num_workers=1, flip=False)
    flipped = [i for i in range(64) if not np.array_equal(a[i], plain[i])]
    assert flipped and all(np.array_equal(a[i], plain[i][..., ::-1]) for i in flipped)
    assert 10 < len(flipped) < 54  # about half
