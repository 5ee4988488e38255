"""`ddpm serve`: a registered model over HTTP, as `mlflow models serve` serves it, with the request body bounded.

It runs MLflow's own scoring app (the same /invocations, /ping, /health and /version, the same answers and
request timeout) in one uvicorn process on loopback, behind one addition: a request body over
`--max-body-bytes` is refused with 413 before it is parsed. `mlflow models serve` reads any body whole
into memory and parses it, so there a proxy has to bound it (docs/scale.md).

    uv run ddpm serve                          # @champion of params.yaml's registry on http://127.0.0.1:5001
    uv run ddpm serve -m "models:/ddpm-fashion-mnist/3" -t 600
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException

from ddpm.__main__ import Parser
from ddpm.errors import run_entry_point
from ddpm.logs import configure_logging
from flows.config import load_params
from flows.errors import TrackingError
from flows.steps import USER_ERRORS
from flows.tracking import connect

log = logging.getLogger("flows.serve")

PORT = 5001  # beside the MLflow UI's 5000
TIMEOUT = 300  # seconds a request may draw (MLflow's default 60 s: about 80 DDIM-50 images on 2 CPU cores)
# A request is a few rows of five columns (the most images a request may ask fit in a few hundred bytes);
# 64 KiB leaves room for any legal one, pretty-printed.
MAX_BODY_BYTES = 64 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: an HTTP request whose body exceeds `max_bytes` (by its Content-Length, or as it
    streams in) is answered 413 without reaching `app`; any other is passed on with its body."""

    def __init__(self, app: App, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.refuse(send, int(length) if length.isdigit() else None)
        body = bytearray()  # read here, bounded, and handed on whole: a legal body is small
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(send, None)
            if not message.get("more_body"):
                break
        await self.app(scope, replay(bytes(body), receive), send)

    async def refuse(self, send: Send, length: int | None) -> None:
        size = "a body of unknown size" if length is None else f"a body of {length:,} bytes"
        text = (
            f"{size} is over this server's limit of {self.max_bytes:,} bytes; a request is rows of num, "
            "sampler, steps, eta and seed (README, 'Serve the champion over HTTP')"
        )
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": text.encode()})


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then whatever the connection says next (its disconnect)."""
    given = False

    async def receive_body() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_body


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of `python -m flows.serve`, alias `ddpm serve` (flows/cli.py); -m, -p, -t and --host as
    `mlflow models serve` names them."""
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("-m", "--model-uri", help="the model to serve (default: @champion of --params' registry)")
    parser.add_argument("-p", "--port", type=int, default=PORT, help="the port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind; it has no authentication")
    parser.add_argument("-t", "--timeout", type=int, default=TIMEOUT, help="seconds a request may take")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger requests answer 413")
    parser.add_argument("--params", default="params.yaml", help="the settings file (its registry and tracking)")
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from mlflow.pyfunc import scoring_server

    _, pipeline = load_params(args.params)
    connect(pipeline)  # the registry `models:/` resolves against, as the pipeline registered it
    uri = args.model_uri or f"models:/{pipeline.registry.model_name}@{pipeline.registry.champion_alias}"
    # Read by the scoring app (its 504) and by the model, which refuses what it cannot draw in time.
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(args.timeout)
    log.info("loading %s", uri)
    try:
        model = scoring_server.load_model_with_mlflow_config(uri)
    except MlflowException as e:
        raise TrackingError(
            f"cannot serve {uri}: {e.message}. Register and promote a model first (`ddpm pipeline`, "
            "`ddpm promote`), or name one with -m"
        ) from None
    app = BodyLimit(scoring_server.init(model), args.max_body_bytes)
    limit = f"{args.max_body_bytes:,}"
    log.info("serving %s on http://%s:%d (request bodies up to %s bytes)", uri, args.host, args.port, limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.timeout < 1 or args.max_body_bytes < 1:
        build_parser(prog).error("--timeout and --max-body-bytes must be positive")
    configure_logging()
    return run_entry_point(lambda: serve(args), log, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
