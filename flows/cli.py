"""The `ddpm` command users run: ddpm's own subcommands (train, sample, evaluate, ...: `python -m ddpm`),
and beside them `pipeline` (the Prefect flow, flows/pipeline.py), `promote` (the registry's gate,
flows/promote.py) and `serve` (a registered model over HTTP, flows/serve.py). Those load Prefect and MLflow,
so their modules are imported only when they run, and each keeps its own parser: `ddpm pipeline --help` is
`python -m flows.pipeline --help`."""

from __future__ import annotations

import argparse
import importlib
import sys

from ddpm import __main__ as ddpm_cli

# subcommand -> (the module whose main() runs it, its line in `ddpm --help`)
FLOW_COMMANDS = {
    "pipeline": ("flows.pipeline", "fetch -> classifier -> train -> evaluate -> register, as one Prefect flow"),
    "promote": ("flows.promote", "move @champion to a registered version that passes the gate"),
    "serve": ("flows.serve", "serve a registered model (default @champion) over HTTP on loopback"),
}


def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The action that holds `parser`'s subcommands (argparse exposes it only among its actions)."""
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def build_parser() -> argparse.ArgumentParser:
    """ddpm's parser with pipeline and promote listed; their options are parsed by their own modules."""
    parser = ddpm_cli.build_parser()
    parser.description = __doc__
    for name, (_, summary) in FLOW_COMMANDS.items():
        subparsers(parser).add_parser(name, help=summary, add_help=False)  # --help goes on to the module's parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)  # exits 2 on an unknown subcommand, 0 on --help
    if args.command not in FLOW_COMMANDS:
        return ddpm_cli.main(argv)  # parses again, strictly
    module = importlib.import_module(FLOW_COMMANDS[args.command][0])
    return module.main(rest, prog=f"ddpm {args.command}")


if __name__ == "__main__":
    sys.exit(main())
