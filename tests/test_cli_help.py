"""The `ddpm` command explains itself: every option has a help text, fixed sets of values are choices,
and `pipeline` and `promote` stand beside ddpm's own subcommands."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm import __main__ as ddpm_cli
from flows import cli, pipeline, promote

DDPM = Path(sys.executable).with_name("ddpm")  # the console script pyproject.toml installs


def parsers(parser: argparse.ArgumentParser, name: str):
    """`parser` and, depth first, every subcommand's parser, with the command line that reaches it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


ALL_PARSERS = [
    *parsers(cli.build_parser(), "ddpm"),
    ("ddpm pipeline", pipeline.build_parser()),
    ("ddpm promote", promote.build_parser()),
]


@pytest.mark.parametrize("name, parser", ALL_PARSERS, ids=[name for name, _ in ALL_PARSERS])
def test_every_argparse_action_has_a_help_text(name, parser):
    missing = [
        a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, f"{name}: no help for {missing}"


def test_defaults_are_shown_and_fixed_sets_are_choices():
    sample = cli.subparsers(cli.build_parser()).choices["sample"]
    text = sample.format_help()
    assert "(default: 64)" in text and "(default: auto)" in text
    choices = {a.dest: a.choices for a in sample._actions if a.choices}
    assert choices == {"sampler": ("ddpm", "ddim", "dpmpp_2m"), "device": ("auto", "CPU", "GPU", "Ascend")}
    assert "(default: params.yaml)" in pipeline.build_parser().format_help()


@pytest.mark.parametrize(
    "command, options",
    [("pipeline", ["--set KEY=VALUE", "--params PARAMS"]), ("promote", ["--version VERSION", "--params PARAMS"])],
)
def test_flow_commands_help_shows_their_options(command, options):
    result = subprocess.run([DDPM, command, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: ddpm {command}")
    assert all(option in result.stdout for option in options), result.stdout


def test_top_level_help_lists_the_flow_commands_beside_ddpms(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"    {c} " in listed for c in ("train", "sample", "evaluate", "pipeline", "promote"))


def test_an_invalid_choice_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["sample", "--checkpoint", "x.ckpt", "--sampler", "euler"])
    assert exited.value.code == 2
    assert "invalid choice: 'euler' (choose from 'ddpm', 'ddim', 'dpmpp_2m')" in capsys.readouterr().err


def test_ddpm_subcommands_are_delegated_to_ddpms_own_cli(monkeypatch):
    seen = []

    def ddpm_main(argv):
        seen.append(argv)
        return 0

    monkeypatch.setattr(ddpm_cli, "main", ddpm_main)
    assert cli.main(["-v", "fetch-data", "--root", "r"]) == 0
    assert seen == [["-v", "fetch-data", "--root", "r"]]


def test_flow_subcommands_get_the_rest_of_the_command_line(monkeypatch):
    seen = []

    def pipeline_main(argv, prog):
        seen.append((argv, prog))
        return 0

    monkeypatch.setattr(pipeline, "main", pipeline_main)
    assert cli.main(["pipeline", "--params", "q.yaml", "--set", "train.epochs=1"]) == 0
    assert seen == [(["--params", "q.yaml", "--set", "train.epochs=1"], "ddpm pipeline")]
