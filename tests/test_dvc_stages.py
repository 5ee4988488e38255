"""dvc.yaml lists exactly what each stage reads: every module of ours that the stage's entry point
imports, directly or through others (also inside functions), and no params a stage does not read,
so that changing how a model is looked at never retrains it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PACKAGES = ("ddpm", "flows")
NATIVE_SOURCES = "ddpm/kernels"  # compiled C++ beside the Python: a stage that imports it depends on the folder
# Modules that a module runs without importing them: msrun's worker processes, the model code MLflow loads.
STARTED_BY = {"flows/parallel.py": ["flows.worker"], "flows/registry.py": ["flows.pyfunc_model"]}


def module_file(name: str) -> Path | None:
    """The file of one of our modules (a package's __init__.py), or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere in it, with the packages on the way (their __init__ runs)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    with_parents: set[str] = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def code_of(entry: str) -> set[str]:
    """Repository paths of every file of ours that importing `entry` can run."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
        todo.extend(STARTED_BY.get(str(path.relative_to(ROOT)), []))
    return {str(p.relative_to(ROOT)) for p in seen}


def stage_entries(stage: dict) -> list[str]:
    """The modules a stage's command runs: `python -m flows.stages NAME` runs flows.steps.NAME too."""
    args = stage["cmd"].split()
    module = args[args.index("-m") + 1]
    return [module, f"flows.steps.{args[-1]}"] if module == "flows.stages" else [module]


def deps_cover(deps: list[str], path: str) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


CODE_STAGES = [name for name, stage in DVC_YAML["stages"].items() if name != "fetch"]


@pytest.mark.parametrize("name", CODE_STAGES)
def test_each_stage_depends_on_all_the_code_it_runs(name):
    stage = DVC_YAML["stages"][name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    code = set().union(*(code_of(entry) for entry in stage_entries(stage)))
    assert code, f"no code found for stage {name}"
    missing = sorted(path for path in code if not deps_cover(deps, path))
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not depend on them"
    if any(path.startswith("ddpm/kernels/") for path in code):
        assert NATIVE_SOURCES in deps, f"stage {name} runs the native kernels: depend on {NATIVE_SOURCES}"
    unused = sorted(dep for dep in deps if dep.endswith(".py") and dep not in code)
    assert not unused, f"dvc.yaml stage {name} depends on {unused}, which it never runs"


def test_the_code_walk_follows_imports_inside_functions():
    code = code_of("flows.steps.train")
    assert "ddpm/train.py" in code  # imported inside train(), where MindSpore may load
    assert "flows/registry.py" in code and "ddpm/evaluate.py" not in code


LOOKING_AT_A_MODEL = [
    "sample.sampler",
    "sample.steps",
    "sample.eta",
    "sample.num",
    "sample.seed",
    "sample.clip_x0",
    "sample.batch_size",
    "evaluate.fid_samples",
    "evaluate.seed",
    "tracking.uri",
    "tracking.connect_timeout",
    "registry.metric",
    "registry.candidate_alias",
]


def read_params(stage: dict) -> list[str]:
    return [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]


@pytest.mark.parametrize("key", LOOKING_AT_A_MODEL)
def test_changing_how_a_model_is_looked_at_does_not_retrain_it(key):
    params = read_params(DVC_YAML["stages"]["train"])
    section = key.split(".")[0]
    assert key not in params and section not in params, f"the train stage re-runs when {key} changes"


def test_comparing_samplers_and_fid_sizes_re_runs_evaluate():
    params = read_params(DVC_YAML["stages"]["evaluate"])
    for key in ("sample.sampler", "sample.steps", "sample.eta", "evaluate"):
        assert key in params, key
