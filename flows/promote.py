"""`python -m flows.promote [--version N]`: move @champion to a version that passes the gate (flows.gate).
Exit 0 promoted; 1 refused by the gate, or outranked by a better version promoted at the same time;
2 an error (a bad params file, an unreadable registry: nothing is promoted on an unknown champion)."""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow.exceptions import MlflowException

from ddpm.__main__ import Parser
from ddpm.errors import run_entry_point
from ddpm.logs import configure_logging
from flows.config import load_params
from flows.gate import promote
from flows.steps import USER_ERRORS
from flows.tracking import connect

log = logging.getLogger("flows.promote")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of `python -m flows.promote`, alias `ddpm promote` (flows/cli.py)."""
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument(
        "--version", help="model version to promote (default: the @candidate); it still passes the gate"
    )
    parser.add_argument("--params", default="params.yaml", help="the settings file (its registry and tracking)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging()
    # a version without the metric is MLflow's error
    return run_entry_point(lambda: promote_version(args.params, args.version), log, (*USER_ERRORS, MlflowException))


def promote_version(params: str, version: str | None) -> int:
    _, pipeline = load_params(params)
    connect(pipeline)
    decision = promote(pipeline.registry, version)
    log.info("%s", decision.reason)
    return 0 if decision.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
