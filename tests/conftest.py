import functools
import gzip
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import ddpm  # noqa: F401  (sets MindSpore's environment before anything imports it)
from ddpm.config import Config, config_from_dict
from ddpm.data import DEBIAN_DATASET_DIR
from ddpm.interrupt import STOP_SIGNALS, Handler, put_back
from tests.freeze import Freezer

DEBIAN_DATASET = Path(DEBIAN_DATASET_DIR)
TINY_MODEL = {"dim": 8, "dim_mults": [1, 2], "image_size": 28, "channels": 1}
# ~3 s on 2 cores, about 50% test accuracy: enough to tell images apart, not to judge them finely
TINY_CLASSIFIER = {"channels": [8, 16], "features": 32, "epochs": 1, "batch_size": 16, "limit": 512}
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")  # what MLflow keeps in os.environ


# The modules that take longest (measured: their module fixtures run a whole pipeline, or they run
# several), started first so that pytest-xdist's two workers (`--dist loadscope`: one module per
# worker at a time, in this order with `--no-loadscope-reorder`, else by test count) finish together
# instead of one of them starting a 7-minute module last.
LONGEST_FIRST = (
    "test_pipeline",
    "test_faults_prefect",
    "test_faults",
    "test_faults_deployment",
    "test_classifier",
    "test_tracking_outage",  # these four are slow-only modules of 3-4 minutes: before the short ones, so
    "test_workers_stop",  # that the slow run does not end on one of them while the other worker idles
    "test_serving",
    "test_prefect_restart",
    "test_train",
    "test_cli",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order (some tests build on the one before)


@pytest.fixture(autouse=True, scope="module")
def free_compiled_graphs():
    """Free the graphs MindSpore compiled for a module's tests: each jitted step or forward keeps its
    network's weights and optimizer state alive, so one pytest process otherwise grows past 10 GB."""
    yield
    ms = sys.modules.get("mindspore")  # a module that never loaded it has nothing to free (importing it: ~4 s)
    if ms is not None:
        ms.ms_memory_recycle()


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    """The real Fashion-MNIST IDX files, decompressed from Debian's dataset-fashion-mnist."""
    if not DEBIAN_DATASET.is_dir():
        pytest.fail(f"{DEBIAN_DATASET} missing: run `apt-get install -y dataset-fashion-mnist`")
    root = tmp_path_factory.mktemp("fashion-mnist")
    for gz in DEBIAN_DATASET.glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(root / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def make_tiny_config(fashion_root: Path, tmp: Path, **sections) -> Config:
    """A small, fast configuration over real images, writing under `tmp`; keyword overrides as {"section": {...}}."""
    raw: dict[str, dict[str, Any]] = {
        "data": {"root": str(fashion_root), "limit": 64, "num_workers": 1},
        "model": dict(TINY_MODEL),
        "diffusion": {"timesteps": 50, "schedule": "scaled_linear"},
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "device": "CPU",
            "checkpoint_dir": str(tmp / "ckpt"),
        },
        "sample": {"steps": 5, "num": 4, "batch_size": 4},
        "evaluate": {"num_images": 100, "t_points": 5, "fid_samples": 64},
        "classifier": {**TINY_CLASSIFIER, "checkpoint": str(tmp / "classifier.ckpt")},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


@pytest.fixture
def tiny_config(fashion_root, tmp_path):
    """`make_tiny_config` in the test's tmp_path."""
    return functools.partial(make_tiny_config, fashion_root, tmp_path)


@pytest.fixture(scope="module")
def library() -> Path:
    """ddpm/kernels' compiled library, for the tests of its operators; they skip where it cannot be built."""
    from ddpm.runtime import native_library

    path = native_library()
    if path is None:
        pytest.skip("ddpm/kernels unavailable here (the warning names why)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(fashion_root, tmp_path_factory) -> Path:
    """A tiny model trained by `ddpm train` (T = 20; tests/test_cli.py `train_tiny`), once per test process,
    for the tests that only sample from one."""
    from tests.test_cli import train_tiny

    return train_tiny(fashion_root, tmp_path_factory.mktemp("tiny-checkpoint"), timesteps=20)


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """For the fault tests: a project with its data fetched through DVC once per test process (~13 s);
    tests work on copies."""
    from flows.data import fetch_data  # MLflow, Prefect and DVC load only for the modules that use it
    from tests.test_pipeline import make_project

    tmp = tmp_path_factory.mktemp("faults")
    repo = make_project(tmp)
    fetch_data(repo, "data/fashion-mnist", (DEBIAN_DATASET_DIR,))
    return repo


@pytest.fixture(scope="session")
def references(tmp_path_factory, worker_id) -> Path:
    """Where the fault tests' uninterrupted reference trainings are kept (tests/faults.py): one directory
    for the whole session, shared by its pytest-xdist workers."""
    root = tmp_path_factory.getbasetemp()
    path = (root if worker_id == "master" else root.parent) / "reference-trainings"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def project(template, tmp_path) -> Path:
    repo = tmp_path / "project"
    shutil.copytree(template, repo, symlinks=True)
    return repo


@pytest.fixture(scope="session")
def freezer(tmp_path_factory) -> Freezer:
    """Stops a test's subprocess at a file open (tests/freeze.py), compiled once per session."""
    return Freezer(tmp_path_factory.mktemp("freezer"))


def restored_tracking_uri():
    """mlflow.set_tracking_uri sets the process's tracking URI and MLFLOW_TRACKING_URI in os.environ, which
    flows.config reads, and mlflow.set_experiment leaves its experiment id active in the process: a test (or
    a module's fixture) that points MLflow at its server must not point the next module there, nor have its
    runs start in an experiment id of another store."""
    before = {key: os.environ.get(key) for key in MLFLOW_VARIABLES}
    service = sys.modules.get("mlflow.tracking._tracking_service.utils")  # only if MLflow is loaded: most
    fluent = sys.modules.get("mlflow.tracking.fluent")  # tests never load it
    uri = getattr(service, "_tracking_uri", None)  # private globals of MLflow's
    experiment = getattr(fluent, "_active_experiment_id", None)
    yield
    service = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if service is not None and service._tracking_uri != uri:  # type: ignore[attr-defined]
        service.set_tracking_uri(uri)  # None unsets it
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        fluent._active_experiment_id = experiment  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def restored_stop_handlers():
    """A test that runs an entry point in-process (Prefect's flow engine, the CLI's main) may leave its SIGINT
    or SIGTERM handler installed: the next test in the worker must find the handlers it started with (a
    second Ctrl-C reaching a leftover handler, or none, ended an xdist worker)."""
    before: dict[int, Handler] = {
        signum: handler for signum in STOP_SIGNALS if (handler := signal.getsignal(signum)) is not None
    }
    yield
    put_back(before)


module_tracking_uri = pytest.fixture(autouse=True, scope="module", name="module_tracking_uri")(restored_tracking_uri)
per_test_tracking_uri = pytest.fixture(autouse=True, name="per_test_tracking_uri")(restored_tracking_uri)


@pytest.fixture
def mlflow_state(monkeypatch):
    """Start with no tracking URI or experiment in os.environ and none active in the process (a test of
    `flows.tracking.connect`, which sets them); the autouse fixtures above put back what was there."""
    from mlflow.tracking import fluent

    for key in MLFLOW_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
