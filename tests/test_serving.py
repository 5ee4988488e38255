"""Integration: the registered model served by the real `mlflow models serve` on loopback, asked over HTTP
as the README asks it: good requests answer images, bad ones a 400 naming every bad value."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from ddpm.config import ModelConfig
from flows.config import RegistryConfig
from flows.registry import log_sampler_model, register_model
from tests import servers
from tests.test_cli import ROOT, ddpm, train_tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 1-2 min: a training, a registration, a server start

REGISTRY = RegistryConfig(model_name="serving-test")
TIMESTEPS = 20


@dataclasses.dataclass(frozen=True)
class Served:
    url: str  # the model server
    tracking_uri: str  # the registry it serves from


@pytest.fixture(scope="module")
def server(fashion_root, tmp_path_factory):
    """A tiny trained model (T = 20) registered in a SQLite store, aliased @champion and served."""
    tmp = tmp_path_factory.mktemp("serving")
    checkpoint = train_tiny(fashion_root, tmp, TIMESTEPS)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run() as run:  # as the train step logs it when training ends
            model_id = log_sampler_model(str(checkpoint), ModelConfig(dim=8, dim_mults=(1, 2)))
        version = register_model(run.info.run_id, model_id, REGISTRY).version
        MlflowClient().set_registered_model_alias(REGISTRY.model_name, REGISTRY.champion_alias, version)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it; mlflow's annotation omits that
    process, url = servers.start_model_server(
        f"models:/{REGISTRY.model_name}@{REGISTRY.champion_alias}", tmp, tracking_uri
    )
    yield Served(url, tracking_uri)
    servers.stop(process)


def post(server: Served, records: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}/invocations",
        json.dumps({"dataframe_records": records}).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_good_requests_answer_images(server):
    status, answer = post(server, [{"num": 3, "sampler": "ddim", "steps": 2, "seed": 1, "eta": 1.0}])
    assert status == 200, answer
    images = np.asarray(answer["predictions"], np.float32)
    assert images.shape == (3, 1, 28, 28) and np.isfinite(images).all()
    assert -1.0 <= images.min() < images.max() <= 1.0
    # Several rows are several requests, concatenated in order; the same row gives the same images. (Every
    # row names the same columns: MLflow cannot parse an integer column with a missing value.)
    status, answer = post(
        server, [{"num": 3, "steps": 2, "seed": 1, "eta": 1.0}, {"num": 2, "steps": 3, "seed": 2, "eta": 0.0}]
    )
    assert status == 200, answer
    rows = np.asarray(answer["predictions"], np.float32)
    assert rows.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(rows[:3], images)  # row 0 is the first request again
    status, chain = post(server, [{"num": 1, "sampler": "ddpm"}])  # the full chain: no steps, no eta
    assert status == 200 and np.isfinite(chain["predictions"]).all(), chain


@pytest.mark.parametrize(
    "record, named",
    [
        ({"num": 2, "eta": 2.0}, "eta must be a number in [0, 1], got 2.0"),
        ({"num": 2, "steps": 0}, f"steps must be an integer in [1, {TIMESTEPS}] (T, the model's timesteps), got 0"),
        ({"num": 0}, "num must be an integer in [1, 256] per request, got 0"),
        ({"num": 2, "seed": -1}, "seed must be an integer in [0, 2**63 - 1], got -1"),
        ({"num": 10**9}, "num must be an integer in [1, 256] per request, got 1000000000"),
        ({"num": 2, "sampler": "euler"}, "sampler must be one of ddpm, ddim, dpmpp_2m, got 'euler'"),
    ],
)
def test_bad_requests_answer_400_naming_the_value(server, record, named):
    status, answer = post(server, [record])
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert named in answer["message"] and "Traceback" not in json.dumps(answer)


def test_every_bad_value_of_every_row_in_one_answer(server):
    status, answer = post(
        server, [{"num": 2, "eta": 2.0, "steps": 0, "seed": 0}, {"num": 1, "eta": 0.0, "steps": 2, "seed": -1}]
    )
    assert status == 400
    assert "row 0: steps must be an integer in [1, 20]" in answer["message"]
    assert "eta must be a number in [0, 1], got 2.0; row 1: seed must be an integer" in answer["message"]


def test_rows_with_different_columns_answer_400_from_mlflow(server):
    """MLflow parses each integer column whole: one row without `steps` leaves a gap it cannot convert."""
    status, answer = post(server, [{"num": 2, "steps": 2}, {"num": 1}])
    assert status == 400 and "Failed to convert column steps" in answer["message"], answer


def test_readme_recipe_turns_the_answer_into_a_png(server, tmp_path):
    """The README's answer-to-PNG lines, run as written there on a real answer."""
    status, answer = post(server, [{"num": 4, "steps": 2}])
    assert status == 200, answer
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    readme = (ROOT / "README.md").read_text()
    to_png = readme.split("<!-- answer-to-png -->")[1].split("```python\n")[1].split("```")[0]
    result = subprocess.run([sys.executable, "-c", to_png], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "samples.png").size == (4 * 28, 28)


def test_readme_batch_path_draws_the_champion_to_an_npz(server, tmp_path):
    """The README's way to draw many images: download the champion's checkpoint, `ddpm sample` it to a file."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.tracking_uri}
    download = subprocess.run(
        [
            str(servers.BIN / "mlflow"),
            "artifacts",
            "download",
            "-u",
            f"models:/{REGISTRY.model_name}@{REGISTRY.champion_alias}",
            "-d",
            "champion",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert download.returncode == 0, download.stderr[-3000:]
    sampled = ddpm(
        "sample",
        "--checkpoint",
        "champion/artifacts/model.ckpt",
        "--num",
        "5",
        "--steps",
        "2",
        "--out",
        "samples.npz",
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (5, 1, 28, 28) and np.isfinite(images).all() and np.abs(images).max() <= 1.0


def test_python_predict_checks_the_same_way(server):
    """The README's Python API: the same rows, the same check, an MlflowException naming the value."""
    mlflow.set_tracking_uri(server.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTRY.model_name}@{REGISTRY.champion_alias}")
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it; mlflow's annotation omits that
    images = model.predict(pd.DataFrame({"num": [3], "sampler": ["ddim"], "steps": [2], "seed": [1], "eta": [1.0]}))
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.float32
    with pytest.raises(MlflowException, match=r"eta must be a number in \[0, 1\], got 2.0") as caught:
        model.predict(pd.DataFrame({"num": [3], "eta": [2.0]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
