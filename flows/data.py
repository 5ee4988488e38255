"""DVC-versioned Fashion-MNIST: pull it from the DVC remote, or bootstrap it from an upstream
source, verify it against both our SHA-256 list and data.dvc, and push it to the remote.

A damaged file in the workspace is replaced by DVC's copy (with a warning naming it and both
hashes); a damaged copy in DVC's cache is an error naming the cache file and both hashes, never a
quiet fallback to upstream. `python -m flows.data` is the first stage of dvc.yaml and the first
task of the Prefect flow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from ddpm.data import FILES, DataError, dataset_problems, file_hash, install_dataset
from ddpm.errors import run_entry_point
from ddpm.logs import configure_logging
from flows.config import load_params
from flows.steps import USER_ERRORS

log = logging.getLogger(__name__)

DATA_DVC = "data.dvc"
DATA_JSON = "outputs/data.json"  # the data version, as a plain file DVC stages can depend on


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the DVC of this environment (not whatever `dvc` is on PATH)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def data_hashes(repo: Path) -> tuple[str, str]:
    """(the directory hash data.dvc records, the hash of the files on disk now), as DVC computes them."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:  # DVC resolves outputs against the cwd
        out = dvc_repo.stage.load_one(DATA_DVC).outs[0]
        return out.hash_info.value, out.get_hash().value


def dvc_data_hash(repo: Path) -> str:
    """The directory hash data.dvc records (tagged on every MLflow run)."""
    return data_hashes(repo)[0]


def fetch_data(repo: str | Path, data_root: str, sources: tuple[str, ...], remote: str = "") -> str:
    """Make `data_root` hold the verified files data.dvc records, record their version in
    outputs/data.json (what the train stage depends on), and return where they came from."""
    repo = Path(repo).resolve()
    origin = _obtain(repo, repo / data_root, sources, remote)
    record = repo / DATA_JSON
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"dvc_md5": dvc_data_hash(repo), "sha256": FILES}, indent=2) + "\n")
    return origin


def _obtain(repo: Path, root: Path, sources: tuple[str, ...], remote: str) -> str:
    remote_args = ("-r", remote) if remote else ()
    damage = dataset_problems(root)
    if not damage and _matches(repo):
        return "workspace"
    damaged = [path for path in damage if path.is_file()]
    if damaged:  # known-bad copies: delete them, so that DVC (whose state cache may vouch for them) restores them
        log.warning(
            "damaged data in the workspace:\n  %s\nreplacing it with the version %s records, from DVC",
            "\n  ".join(damage[path] for path in damaged),
            DATA_DVC,
        )
        for path in damaged:
            path.unlink()
    pulled = dvc("pull", *remote_args, DATA_DVC, cwd=repo)
    if pulled.returncode == 0:
        damage = dataset_problems(root)
        if not damage and _matches(repo):
            return "dvc-remote"
        if damage:
            problems = [*damage.values(), *damaged_cache_files(repo, remote)]
            raise DataError(
                "DVC gave back damaged data:\n  "
                + "\n  ".join(problems)
                + "\nDelete the damaged DVC cache file(s) and rerun to pull a good copy from the DVC "
                "remote. Where the remote's copy is damaged too, delete the files named there as well: "
                "the rerun then bootstraps from upstream and pushes a good copy."
            )
    log.info("not on the DVC remote (%s); bootstrapping from upstream", pulled.stderr.strip().splitlines()[-1:])
    errors = []
    for source in sources:
        try:
            install_dataset(source, root)
            break
        except (DataError, OSError) as e:
            errors.append(f"{source}: {e}")
    else:
        raise DataError("could not get Fashion-MNIST from the DVC remote or any source:\n  " + "\n  ".join(errors))
    recorded, actual = data_hashes(repo)
    if recorded != actual:
        raise DataError(
            f"{root} passed its SHA-256 checks but hashes to {actual} while {DATA_DVC} records "
            f"{recorded}; was {DATA_DVC} edited? Restore it with `git checkout {DATA_DVC}`"
        )
    for step in (("commit", "-f", "-q", DATA_DVC), ("push", *remote_args, DATA_DVC)):
        result = dvc(*step, cwd=repo)
        if result.returncode != 0:
            raise DataError(f"`dvc {' '.join(step)}` failed: {result.stderr.strip()}")
    return "upstream"


def _matches(repo: Path) -> bool:
    recorded, actual = data_hashes(repo)
    return recorded == actual


def damaged_cache_files(repo: Path, remote: str = "") -> list[str]:
    """DVC cache files of data.dvc whose content does not hash to their name (DVC trusts its cache),
    each with the remote's copy it was pulled from (checked too when the remote is a local directory)."""
    from dvc.config import RemoteConfigError
    from dvc.repo import Repo

    damaged = []
    with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:
        out = dvc_repo.stage.load_one(DATA_DVC).outs[0]
        try:
            odb = dvc_repo.cloud.get_remote_odb(remote or None)
        except RemoteConfigError:  # no remote: DVC pulled from its cache alone
            odb = None
        for key, _, hash_info in out.get_obj() or ():
            path = Path(out.cache.oid_to_path(hash_info.value))
            actual = file_hash(path, "md5") if path.is_file() else "missing"
            if actual != hash_info.value:
                damaged.append(
                    f"DVC cache file {path} ({'/'.join(key)}): md5 {actual}, expected {hash_info.value}; "
                    f"{remote_copy(odb, hash_info.value, out.hash_info.value)}"
                )
    return damaged


def remote_copy(odb, oid: str, listing: str) -> str:
    """Where the remote holds object `oid` of directory `listing` (its .dir object), whether that copy is
    damaged when we can read it here, and how to replace it: while the remote holds a directory's
    listing, `dvc push` takes all of its files for present and uploads none."""
    if odb is None:
        return "no DVC remote is configured"
    path, listing = odb.oid_to_path(oid), odb.oid_to_path(listing)
    replace = f"delete it and the directory's listing {listing} there"
    if odb.fs.protocol != "local":
        where = odb.fs.unstrip_protocol(path)
        return f"the remote's copy {where}: if the same error follows, it is damaged too: {replace}"
    if not Path(path).is_file():
        return f"the remote's copy {path}: missing"
    actual = file_hash(Path(path), "md5")
    return f"the remote's copy {path}: " + ("good" if actual == oid else f"damaged too (md5 {actual}): {replace}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch Fashion-MNIST through DVC")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    configure_logging()
    return run_entry_point(lambda: fetch(args.params), log, USER_ERRORS)


def fetch(params: str) -> int:
    config, pipeline = load_params(params)
    origin = fetch_data(Path.cwd(), config.data.root, pipeline.fetch.sources, pipeline.dvc_remote)
    log.info("Fashion-MNIST ready in %s (from %s)", config.data.root, origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
