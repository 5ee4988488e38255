"""ddpm's import map has no circles: no module imports, at its top or inside a function, one that imports it
back (directly or through others). A circle hides which module decides; runtime.py decides the backend and
ddpm/kernels/build.py, which it calls, only compiles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "ddpm", ROOT / "ddpm" / "kernels")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_map() -> dict[str, set[str]]:
    """{module: the ddpm modules it imports anywhere in its source}; `from ddpm import x` names module x."""
    modules = {module_name(path): path for package in PACKAGES for path in sorted(package.glob("*.py"))}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{name}: relative import"
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    imported.add(target if target in modules else node.module)
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the circle it closes."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_the_map_sees_function_level_imports():
    graph = import_map()
    assert "ddpm.kernels.build" in graph["ddpm.runtime"]  # the library's build: runtime decides
    assert "ddpm.runtime" not in graph["ddpm.kernels.build"]


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_ddpm_imports_no_module_that_imports_it_back():
    assert circles(import_map()) == []
