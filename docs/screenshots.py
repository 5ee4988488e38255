"""Take the README's screenshots of the MLflow UI from a real run, in headless Chromium.

    uv run python docs/screenshots.py [--checkout DIR] [--tracking-uri URI] [--out docs/images]

Given a checkout where the pipeline ran (its mlflow.db, or --tracking-uri), it starts `mlflow
server` on a free port, finds the newest version of the registered model and its training run
through MLflow's client, and writes three PNGs to --out:

    mlflow_run.png            the run's overview (dataset, tags, registered model, metrics)
    mlflow_run_artifact.png   the run's artifacts tab showing report.png, or the last epoch's sample
                              grid when the run has no report
    mlflow_model_version.png  the registered model version's page: the card in its description

Needs Debian's `chromium` (apt-get install -y chromium). MLflow's UI is a single-page app, so each
page gets a virtual-time budget to render before the capture.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

log = logging.getLogger("screenshots")

MODEL_NAME = "ddpm-fashion-mnist"  # params.yaml's registry.model_name
REPORT = "report.png"  # the run's report figure, logged when the pipeline ends
IMAGES_DIR = "images"  # where mlflow.log_image keeps each step's image, as images/<key>+step+<N>+...
HEALTH_TIMEOUT = 180  # seconds for `mlflow server` to answer /health (15-60 s on 2 shared cores)
RENDER_BUDGET_MS = 20000  # Chromium's virtual time for the single-page app to fetch and draw
CHROMIUM_TIMEOUT = 300  # seconds of real time per capture (a busy 2-core machine needs minutes)
STOP_TIMEOUT = 30  # seconds for the server to exit after SIGTERM before it is killed
WINDOW = (1400, 1000)  # pixels: wide enough for the run page's two columns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkout: Path, tracking_uri: str, port: int, log_file: typing.IO[str]) -> subprocess.Popen:
    """`mlflow server` on loopback in the checkout (so sqlite:///mlflow.db and ./mlruns resolve there),
    logging to `log_file`: a pipe nobody reads would fill and stall the server mid-request."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # its own session, so that stopping it reaches the workers it starts
    return subprocess.Popen(
        command, cwd=checkout, stdout=log_file, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def wait_healthy(server: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"mlflow server did not answer {base}/health within {HEALTH_TIMEOUT} s")


def pages(client: MlflowClient, model_name: str, base: str) -> dict[str, str]:
    """The file name of each screenshot -> the UI address to capture, for the newest model version."""
    versions = client.search_model_versions(f"name='{model_name}'")
    if not versions:
        raise RuntimeError(f"no version of {model_name} registered: run the pipeline in the checkout first")
    version = max(versions, key=lambda v: int(v.version))
    run = client.get_run(version.run_id)
    run_page = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    log.info("model %s version %s, run %s (%s)", model_name, version.version, run.info.run_id, run.info.run_name)
    return {
        "mlflow_run.png": run_page,
        "mlflow_run_artifact.png": f"{run_page}/artifacts/{shown_artifact(client, run.info.run_id)}",
        "mlflow_model_version.png": f"{base}/#/models/{model_name}/versions/{version.version}",
    }


def shown_artifact(client: MlflowClient, run_id: str) -> str:
    """The run's report figure, else its last logged sample grid (MLflow names them by step)."""
    if any(a.path == REPORT for a in client.list_artifacts(run_id)):
        return REPORT
    grids = [a.path for a in client.list_artifacts(run_id, IMAGES_DIR) if a.path.endswith(".png")]
    if not grids:
        raise RuntimeError(f"run {run_id} has neither {REPORT} nor sample grids under {IMAGES_DIR}/")
    return max(grids, key=lambda path: int(path.split("+step+")[1].split("+")[0]))


def capture(chromium: str, url: str, out: Path, profile: Path) -> None:
    command = [
        chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-crash-reporter",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={RENDER_BUDGET_MS}", f"--screenshot={out}", url,
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root
    subprocess.run(command, check=True, capture_output=True, timeout=CHROMIUM_TIMEOUT)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=Path.cwd(), help="where the pipeline ran (default: here)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="relative to --checkout")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    checkout, out = args.checkout.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "mlflow-server.log", "w") as server_log:
        server = start_server(checkout, args.tracking_uri, port, server_log)
        try:
            wait_healthy(server, base, Path(server_log.name))
            targets = pages(MlflowClient(tracking_uri=base), args.model_name, base)
            profile = Path(tmp) / "chromium"
            for name, url in targets.items():
                capture(chromium, url, out / name, profile)
                log.info("%s <- %s", out / name, url)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
