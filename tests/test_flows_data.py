"""DVC-versioned fetching with real `dvc` in a temporary git repository and a local remote."""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpm.data import DEBIAN_DATASET_DIR, FILES, DataError, sha256_of
from flows.data import fetch_data
from tests.test_pipeline import run

ROOT = Path(__file__).resolve().parents[1]
ROOT_DIR = "data/fashion-mnist"


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for name in ("data.dvc", ".dvcignore", ".dvc/.gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc" / "config").write_text(
        f"[core]\n    remote = local\n    analytics = false\n['remote \"local\"']\n    url = {tmp_path / 'remote'}\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def dvc(repo, *args):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


def test_bootstrap_push_then_pull_from_the_remote(repo, tmp_path):
    assert fetch_data(repo, ROOT_DIR, (str(tmp_path / "nowhere"), DEBIAN_DATASET_DIR)) == "upstream"
    assert list((tmp_path / "remote").rglob("*.dir")), "pushed to the DVC remote"
    assert (repo / "outputs" / "data.json").is_file()
    assert fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,)) == "workspace"
    shutil.rmtree(repo / ROOT_DIR)
    shutil.rmtree(repo / ".dvc" / "cache")
    assert fetch_data(repo, ROOT_DIR, ("/nonexistent",)) == "dvc-remote"  # no upstream needed any more


def test_corrupt_workspace_file_is_named_and_replaced_from_dvc(repo, caplog):
    fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))
    labels = repo / ROOT_DIR / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="flows.data"):
        assert fetch_data(repo, ROOT_DIR, ("/nonexistent",)) == "dvc-remote"  # not upstream: DVC's own copy
    assert str(labels) in caplog.text and FILES["train-labels-idx1-ubyte"] in caplog.text
    assert sha256_of(labels) == FILES["train-labels-idx1-ubyte"]
    assert dvc(repo, "status", "data.dvc").stdout.strip().endswith("up to date.")


def test_bit_rot_in_the_dvc_cache_is_an_error_naming_both_files_and_hashes(repo):
    fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))
    labels = repo / ROOT_DIR / "train-labels-idx1-ubyte"
    md5 = hashlib.md5(labels.read_bytes()).hexdigest()
    cached = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    rot(cached)  # same size and mtime: DVC's own state cache cannot notice
    labels.unlink()
    with pytest.raises(DataError) as info:
        fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))  # upstream would work: it must not hide the rot
    text = str(info.value)
    assert str(labels) in text and FILES["train-labels-idx1-ubyte"] in text and sha256_of(labels) in text
    assert str(cached) in text and md5 in text and hashlib.md5(cached.read_bytes()).hexdigest() in text
    assert "Delete the damaged DVC cache file" in text
    cached.unlink()  # the fix the error names
    assert fetch_data(repo, ROOT_DIR, ("/nonexistent",)) == "dvc-remote"


def test_a_damaged_copy_on_the_dvc_remote_is_an_error_naming_it_and_the_fix_repairs_the_remote(repo, tmp_path):
    """DVC trusts the remote (verify = false, .dvc/config): the pull succeeds, our own checks find the
    damage and name the remote's copy, never a quiet bootstrap that would leave the remote damaged."""
    fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))  # bootstrapped and pushed
    md5 = hashlib.md5((repo / ROOT_DIR / "train-labels-idx1-ubyte").read_bytes()).hexdigest()
    on_remote = tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]
    rot(on_remote)
    shutil.rmtree(repo / ROOT_DIR)
    shutil.rmtree(repo / ".dvc" / "cache")  # as on a fresh clone
    with pytest.raises(DataError) as info:
        fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))  # upstream would work: it must not hide the damage
    listing = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    on_remote_listing = tmp_path / "remote" / "files" / "md5" / listing[:2] / listing[2:]
    damaged_md5 = hashlib.md5(on_remote.read_bytes()).hexdigest()
    assert (
        f"the remote's copy {on_remote}: damaged too (md5 {damaged_md5}): delete it and the directory's listing "
        f"{on_remote_listing} there"
    ) in str(info.value)
    (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()  # the fix the error names
    on_remote.unlink()
    on_remote_listing.unlink()  # else `dvc push` would take every file of the directory for present
    assert fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,)) == "upstream"
    assert hashlib.md5(on_remote.read_bytes()).hexdigest() == md5  # the remote holds a good copy again


def rot(path):
    """Flip one bit in place, keeping size and modification time, as failing storage does."""
    stat = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_data_dvc_that_does_not_match_the_real_files_is_an_error(repo):
    text = (repo / "data.dvc").read_text().replace("5f974fc0", "00000000")
    (repo / "data.dvc").write_text(text)
    with pytest.raises(DataError, match=r"hashes to 5f974fc0.* while data\.dvc records 00000000"):
        fetch_data(repo, ROOT_DIR, (DEBIAN_DATASET_DIR,))


def test_no_source_at_all_names_every_attempt(repo, tmp_path):
    with pytest.raises(DataError) as info:
        fetch_data(repo, ROOT_DIR, (str(tmp_path / "a"), str(tmp_path / "b")))
    assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)


FLAKY_THEN_MISSING = """
import sys
from prefect import flow
from flows import pipeline

attempts = []
real_fetch = pipeline.fetch_data

def first_attempt_times_out(*args):
    attempts.append(1)
    if len(attempts) == 1:
        raise OSError("the DVC remote timed out")
    return real_fetch(*args)

pipeline.fetch_data = first_attempt_times_out

@flow
def fetch_only(repo: str, sources: list[str]):
    return pipeline.fetch.with_options(retry_delay_seconds=0)(repo, "data/fashion-mnist", tuple(sources), "")

state = fetch_only(sys.argv[1], sys.argv[2:], return_state=True)
print("ATTEMPTS", len(attempts), state.type.value)
"""


@pytest.mark.slow
def test_pipeline_fetch_retries_io_errors_but_not_missing_or_damaged_data(repo, tmp_path):
    """The Prefect task's retry condition: a transient OSError is retried, a DataError (nothing
    to fetch, or damaged) fails at once with its message, since a retry would fail the same way."""
    done = run(
        [sys.executable, "-c", FLAKY_THEN_MISSING, str(repo), str(tmp_path / "nowhere")],
        ROOT,
        {"PREFECT_HOME": str(tmp_path / "prefect-home")},
    )
    output = done.stdout + done.stderr
    assert "ATTEMPTS 2 FAILED" in done.stdout, output  # the timeout retried once, the DataError not at all
    assert "could not get Fashion-MNIST from the DVC remote or any source" in output
    assert str(tmp_path / "nowhere") in output and "NameError" not in output
