"""The plugin layout's rules: families never import each other, the host never imports a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PLUGINS = REPO / "plugins"
FAMILIES = sorted(p.name for p in PLUGINS.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def module_path(path: Path) -> list[str]:
    """The dotted name of a file as installed: plugins/x.py ships as pyengine.plugins.x."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ["pyengine", *parts] if parts[0] == "plugins" else parts


def imported_modules(path: Path, module: list[str] | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module or module_path(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["pyengine", "plugins"] and len(parts) > 2 else None


def test_there_are_five_families() -> None:
    assert FAMILIES == ["attribution", "degeneracy", "features", "pathwise", "probing"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_only_the_host_and_itself(family: str) -> None:
    crossing = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((PLUGINS / family).rglob("*.py"))
        for line, module in imported_modules(path)
        if family_of(module) not in (None, family) or module == "pyengine.plugins"
    ]
    assert crossing == []


def test_the_host_imports_no_plugin() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / "pyengine").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.startswith("pyengine.plugins")
    ]
    assert wrong == []


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The import reader resolves absolute and relative imports (so the rule can fail)."""
    module = PLUGINS / "features" / "units.py"
    found = dict((m, line) for line, m in imported_modules(module))
    assert "pyengine.plugins.features._receptive" in found
    fake = tmp_path / "x.py"
    fake.write_text(
        "from pyengine.plugins.attribution import gradients\nimport pyengine.plugins.probing._fit\n"
        "from ..probing import probes\n"
    )
    found_families = [family_of(m) for _, m in imported_modules(fake, ["pyengine", "plugins", "features", "x"])]
    assert found_families == ["attribution", "probing", "probing"]


def test_no_plugin_hooks_outside_the_recording_mechanism() -> None:
    raw = [
        f"{path.relative_to(REPO)}"
        for path in sorted(PLUGINS.rglob("*.py"))
        if "register_forward_hook" in path.read_text() or "register_full_backward_hook" in path.read_text()
    ]
    assert raw == []
