"""The boundary between the ML library and its orchestration, as the interpreter sees it: ddpm
imports no orchestration, and importing a flows module loads no MindSpore (flows drives ddpm
through functions that import it where they are called), except the msrun worker, which trains."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWS_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "flows").rglob("*.py")
)
TRAINS_AT_IMPORT = {"flows.worker"}  # an msrun worker process: importing it is training
ORCHESTRATION = ("prefect", "mlflow", "dvc")
DDPM_LIGHT = [
    "ddpm",
    "ddpm.config",
    "ddpm.callbacks",
    "ddpm.checkpoint",
    "ddpm.data",
    "ddpm.images",
    "ddpm.fid",
    "ddpm.schedule",
    "ddpm.runtime",
    "ddpm.distributed",
    "ddpm.logs",
    "ddpm.lr_schedules",
    "ddpm.reverse_process",
]


def loaded_after_import(*modules: str) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        f"import importlib, json, sys; [importlib.import_module(m) for m in {list(modules)!r}]; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def loaded_by_each(modules: list[str], forbidden: set[str]) -> dict[str, set[str]]:
    """What importing each module loads, as far as `forbidden` goes. Importing them together loads the
    union of what each loads alone, so a union without any forbidden package clears each module in one
    interpreter (a flows module imports Prefect and MLflow: ~3 s each); otherwise each module gets a
    fresh interpreter of its own, a few at a time, so that the failures name the culprits."""
    together = loaded_after_import(*modules)
    if not together & forbidden:
        return dict.fromkeys(modules, together)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(modules, pool.map(loaded_after_import, modules), strict=True))


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """What importing each checked module loads: the flows modules checked for MindSpore, the light
    ddpm modules for MindSpore and orchestration."""
    flows_modules = [m for m in FLOWS_MODULES if m not in TRAINS_AT_IMPORT]
    return {
        **loaded_by_each(flows_modules, {"mindspore"}),
        **loaded_by_each(DDPM_LIGHT, {"mindspore", *ORCHESTRATION}),
    }


@pytest.mark.parametrize("module", [m for m in FLOWS_MODULES if m not in TRAINS_AT_IMPORT])
def test_importing_a_flows_module_loads_no_mindspore(module, loaded):
    assert "mindspore" not in loaded[module]


@pytest.mark.parametrize("module", DDPM_LIGHT)
def test_ddpm_records_and_settings_load_neither_mindspore_nor_orchestration(module, loaded):
    assert "mindspore" not in loaded[module] and not loaded[module] & set(ORCHESTRATION)


def test_ddpm_never_imports_orchestration():
    for path in (ROOT / "ddpm").rglob("*.py"):
        text = path.read_text()
        for name in ORCHESTRATION:
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path} imports {name}"


def test_flows_never_imports_mindspore_by_name():
    for path in (ROOT / "flows").rglob("*.py"):
        assert "import mindspore" not in path.read_text() and "from mindspore" not in path.read_text(), path
