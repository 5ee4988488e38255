"""Atomic file writes and the one temporary name (ddpm.files)."""

import os
import stat

import pytest

from ddpm.files import PRIVATE_MODE, atomic_path, final_name, is_partial, open_private, partial_path


def test_a_successful_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers see the old file until the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(error), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise error
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_failed_write_before_the_temporary_exists_raises_its_own_error(tmp_path):
    with pytest.raises(ValueError, match="nothing written"), atomic_path(tmp_path / "x.png"):
        raise ValueError("nothing written")
    assert not list(tmp_path.iterdir())


def test_a_durable_write_fsyncs_the_file_then_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "w.npy").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    with atomic_path(tmp_path / "w.npy", durable=True) as tmp:
        tmp.write_bytes(b"x")
    assert synced == [(str(tmp), False), (str(tmp_path), True)]


@pytest.mark.parametrize(
    ("name", "temporary"),
    [
        ("epoch_0001.ckpt", ".epoch_0001.partial.ckpt"),  # the suffix stays: MindSpore appends .ckpt otherwise
        ("fit_result.json", ".fit_result.partial.json"),
        ("train-images-idx3-ubyte", ".train-images-idx3-ubyte.partial"),
        ("samples.tar.gz", ".samples.tar.partial.gz"),
    ],
)
def test_the_temporary_name_and_back(tmp_path, name, temporary):
    assert partial_path(tmp_path / name) == tmp_path / temporary
    assert is_partial(temporary) and final_name(temporary) == name
    assert not is_partial(name) and final_name(name) == name


@pytest.mark.parametrize("name", ["epoch_0001.partial.ckpt", ".partial", ".hidden.json", "notes.txt"])
def test_names_that_are_no_temporary(name):
    assert not is_partial(name) and final_name(name) == name


def test_a_private_file_is_owner_only_new_or_left_over(tmp_path):
    old_umask = os.umask(0)  # a umask that would leave a plain open()'s file readable by everyone
    try:
        new, leftover = tmp_path / "new.yaml", tmp_path / "leftover.yaml"
        leftover.write_text("readable by all")
        leftover.chmod(0o666)
        with open_private(new, "w") as f:
            f.write("secret")
        with open_private(leftover, "a+") as f:
            f.write(" and more")
    finally:
        os.umask(old_umask)
    assert new.read_text() == "secret" and leftover.read_text() == "readable by all and more"
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(leftover.stat().st_mode) == PRIVATE_MODE == 0o600
