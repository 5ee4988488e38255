"""Reading a params file: params.yaml, or an overlay of it.

An overlay (e.g. configs/quickstart.yaml) holds only the keys it changes and names the file it changes
with a top-level `extends:`, relative to its own folder; bases may be overlays too. `read_params` merges
the chain; ddpm/config.py validates the result. Errors never quote a file: the path given may not be a
params file at all (a credentials file passed by mistake), and errors reach logs that others read.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import ConfigError

EXTENDS = "extends"  # an overlay's top-level key: the params file it changes, relative to the overlay's folder


@dataclass(frozen=True)
class ParamsFile:
    """A params file with its `extends` chain merged in: what it says, and which file said each key."""

    sections: dict[str, Any]
    origins: dict[str, str]  # "section" and "section.key" -> the last file of the chain that set it


def read_params(path: str | Path, root: Path | None = None, known: Collection[str] = ()) -> ParamsFile:
    """The sections of a params file, deep-merged onto the file it `extends` (and so on down the chain),
    or a ConfigError naming what is wrong, never quoting the file. With `root`, every file of the chain
    must resolve (symlinks followed) inside that directory, checked before the file is opened. A file
    with none of the `known` sections is no params file: an error that names none of its keys."""
    chain: list[tuple[Path, dict[str, Any]]] = []  # the overlay first, its base after it
    current, named_by = Path(path), ""
    while True:
        resolved = current.resolve()
        if any(resolved == seen.resolve() for seen, _ in chain):
            raise ConfigError(f"{chain[-1][0]}: `{EXTENDS}` loops back to {current}; end the chain at params.yaml")
        if root is not None and not is_inside(resolved, root):
            raise ConfigError(
                f"{current}: outside {root}; params files are read only from inside it (symlinks resolved). "
                "Copy the file into it"
            )
        raw = read_yaml_mapping(current, named_by)
        base = raw.pop(EXTENDS, None)
        if known and raw and not raw.keys() & set(known):
            raise ConfigError(f"{current}: not a params file (none of its top-level keys is {', '.join(known)})")
        chain.append((current, raw))
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"{current}: `{EXTENDS}` must be the path of the params file this one changes, relative to its folder"
            )
        named_by = f"{current}: `{EXTENDS}: {base}` names "
        current = current.parent / base
    sections: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for file, raw in reversed(chain):
        deep_merge(sections, raw)
        origins.update(dict.fromkeys(dotted_keys(raw), str(file)))
    return ParamsFile(sections, origins)


def read_yaml_mapping(path: Path, named_by: str = "") -> dict[str, Any]:
    """One YAML file's top-level mapping. Errors say where, never what: a file passed by mistake (a
    credentials file) must not reach the logs, so no line of it is quoted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{named_by}params file not found: {path}") from None
    try:
        text = data.decode("utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8", "replace")
        raise ConfigError(f"{path}: not valid YAML at {_line_column(before)} (not UTF-8 text)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({yaml_problem_kind(e.problem or e.context)})") from None
    except yaml.reader.ReaderError as e:
        where = _line_column(text[: e.position])
        raise ConfigError(f"{path}: not valid YAML at {where} (a character YAML does not allow)") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got a {type(raw).__name__}")
    return raw


# PyYAML quotes the offending text in its problems (`found undefined alias 'x'`) as well as its own
# tokens (`expected ',' or '}', but got '<stream end>'`): tokens are kept, a quoted character dropped,
# and the problem is cut off at any longer quoted text (which could hold quotes of its own).
_YAML_TOKEN = re.compile(r"'<[a-z ]+>'|'[-,:?\[\]{} ]'")
_ONE_CHARACTER = re.compile(r"'(?:[^'\\]|\\[a-z\\]|\\x[0-9a-f]{2})'|\"'\"")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|['\"]")


def yaml_problem_kind(problem: str | None) -> str:
    """PyYAML's description of a problem, without any text of the file."""
    text, kept = problem or "unreadable", 0
    while quoted := _QUOTED.search(text, kept):
        if _YAML_TOKEN.fullmatch(quoted.group()):
            kept = quoted.end()
        elif _ONE_CHARACTER.fullmatch(quoted.group()):
            text, kept = text[: quoted.start()].rstrip() + text[quoted.end() :], quoted.start()
        else:
            return text[: quoted.start()].rstrip(" ,:") or "unreadable"
    return text


def _line_column(before: str) -> str:
    """Where the text after `before` starts, as an editor counts (from 1)."""
    return f"line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}"


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    """Set every key of `overlay` in `base`, in place: mappings merge key by key, anything else replaces."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = dict(base[key])
            deep_merge(base[key], value)
        else:
            base[key] = value


def dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """{"train": {"lr": 1}} -> ["train", "train.lr"]: every mapping and value, by its dotted path."""
    keys = []
    for key, value in data.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or below it, both with symlinks and `..` resolved."""
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents
