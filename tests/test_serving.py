"""Integration: the registered model served on loopback by `ddpm serve` (as the README serves it) and by
MLflow's own `mlflow models serve`, asked over HTTP as the README asks it: good requests answer images,
bad ones a 400 naming every bad value, a body over the limit a 413."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from ddpm.config import ModelConfig
from flows.config import RegistryConfig
from flows.pyfunc_model import RATE_ENV
from flows.registry import log_sampler_model, register_model
from flows.serve import MAX_BODY_BYTES
from tests import servers
from tests.test_cli import ROOT, ddpm, train_tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 1-2 min: a training, a registration, a server start

REGISTRY = RegistryConfig(model_name="serving-test")
CHAMPION = f"models:/{REGISTRY.model_name}@{REGISTRY.champion_alias}"
TIMESTEPS = 20
LONG_TIMESTEPS = 1000
# Seconds: `-t 30`. Room for a small request's first draw, which compiles the network
# for its batch shape (5-8 s on 2 busy cores), while 256 x 1,000 evaluations take tens of minutes.
SHORT_TIMEOUT = 30
LONGEST = {"num": 256, "sampler": "ddpm"}  # the largest legal request: 256 x T U-Net evaluations


@dataclasses.dataclass(frozen=True)
class Served:
    url: str  # the model server
    tracking_uri: str  # the registry it serves from


def register_tiny(fashion_root: Path, tmp: Path, timesteps: int) -> str:
    """A tiny trained model registered in a SQLite store in `tmp` and aliased @champion; returns the store's URI."""
    checkpoint = train_tiny(fashion_root, tmp, timesteps)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run() as run:  # as the train step logs it when training ends
            model_id = log_sampler_model(str(checkpoint), ModelConfig(dim=8, dim_mults=(1, 2)))
        version = register_model(run.info.run_id, model_id, REGISTRY).version
        MlflowClient().set_registered_model_alias(REGISTRY.model_name, REGISTRY.champion_alias, version)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it; mlflow's annotation omits that
    return tracking_uri


def serve(workdir: Path, tracking_uri: str, options: tuple[str, ...] = (), env: dict | None = None, mlflow_serve=False):
    workdir.mkdir(exist_ok=True)
    process, url = servers.start_model_server(CHAMPION, workdir, tracking_uri, options, env, mlflow_serve)
    yield Served(url, tracking_uri)
    servers.stop(process)


@pytest.fixture(scope="module")
def server(fashion_root, tmp_path_factory):
    """The tiny model (T = 20), served as the README serves @champion (`ddpm serve`)."""
    tmp = tmp_path_factory.mktemp("serving")
    yield from serve(tmp, register_tiny(fashion_root, tmp, TIMESTEPS))


@pytest.fixture(scope="module")
def long_chain(fashion_root, tmp_path_factory) -> tuple[Path, str]:
    """The tiny model with T = 1,000: its full ddpm chain of 256 images takes far longer than SHORT_TIMEOUT."""
    tmp = tmp_path_factory.mktemp("serving-long")
    return tmp, register_tiny(fashion_root, tmp, LONG_TIMESTEPS)


@pytest.fixture(scope="module")
def timed_server(long_chain):
    """The long-chain model behind a SHORT_TIMEOUT, its budget from the rate it measures when it loads; served
    by `mlflow models serve`, whose scoring app `ddpm serve` runs too."""
    tmp, tracking_uri = long_chain
    yield from serve(tmp / "timed", tracking_uri, ("-t", str(SHORT_TIMEOUT)), mlflow_serve=True)


@pytest.fixture(scope="module")
def misjudging_server(long_chain):
    """The same, told a rate far above what it draws (as a server sharing its cores misjudges its own):
    its budget admits a request that runs past the timeout."""
    tmp, tracking_uri = long_chain
    yield from serve(
        tmp / "misjudging", tracking_uri, ("-t", str(SHORT_TIMEOUT)), {RATE_ENV: str(10**12)}, mlflow_serve=True
    )


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
        body = e.read().decode()
        try:
            return e.code, json.loads(body)
        except json.JSONDecodeError:  # the scoring server's 504 is plain text
            return e.code, {"message": body}


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


def test_more_rows_than_images_per_request_are_refused_whole(server):
    status, answer = post(server, [{"num": 1}] * 300)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert "300 rows, more than 256 per request" in answer["message"] and "row 0" not in answer["message"]


def post_body(server: Served, body: bytes, chunked: bool = False) -> tuple[int, dict]:
    """POST `body` as is: with its Content-Length, or `chunked` in 8 KiB chunks and no length declared."""
    connection = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=120)
    headers = {"Content-Type": "application/json"}
    try:
        if chunked:
            chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
            connection.request("POST", "/invocations", chunks, headers, encode_chunked=True)
        else:
            connection.request("POST", "/invocations", body, headers)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, {"message": text}


def padded(size: int) -> bytes:
    """A legal request of one image, padded with JSON whitespace to `size` bytes: only its size can be wrong."""
    body = json.dumps({"dataframe_records": [{"num": 1, "steps": 2, "seed": 3}]})
    return (body[:-1] + " " * (size - len(body)) + "}").encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_answers_413_and_a_body_within_it_is_drawn(server, chunked):
    status, answer = post_body(server, padded(MAX_BODY_BYTES + 100), chunked)
    assert status == 413, answer
    assert f"over this server's limit of {MAX_BODY_BYTES:,} bytes" in answer["message"]
    status, answer = post_body(server, padded(MAX_BODY_BYTES), chunked)  # handed on whole, however it came
    assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 1, 28, 28), answer


def test_a_request_the_server_cannot_draw_within_its_timeout_is_refused_naming_the_limit(timed_server):
    """256 images of the full 1,000-step chain: 256,000 evaluations, far past the timeout, refused before drawing."""
    status, answer = post(timed_server, [LONGEST])
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    message = answer["message"]
    assert "the rows ask 256,000 U-Net evaluations (num x steps; sampler ddpm walks all T = 1000)" in message
    assert f"within its {SHORT_TIMEOUT} s request timeout" in message and "-t SECONDS" in message
    status, answer = post(timed_server, [{"num": 1, "steps": 2}])  # within it: drawn
    assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 1, 28, 28), answer


def test_a_draw_past_the_timeout_gives_way_to_the_next_request(misjudging_server):
    """The server answers 504 at its timeout; the abandoned draw stops at its next step and frees the
    network, so the next request is drawn (it waited behind minutes of drawing before)."""
    status, answer = post(misjudging_server, [LONGEST])
    assert status == 504, answer
    status, answer = post(misjudging_server, [{"num": 1, "steps": 2}])
    assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 1, 28, 28), answer


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
