"""The README and docs/plugin-guide.md run as written.

- Each ```python block of README.md runs in a fresh child ``python -P`` (its own namespace) in an
  empty folder: the README's blocks are independent examples. A block right after
  ``<!-- not run: WHY -->`` (it needs torchvision, downloaded weights or a tokenizer) is compiled,
  and every ``pyengine.run("name", ..., option=...)`` in it must name a registered technique and
  its options.
- The ```python blocks of docs/plugin-guide.md run in order in one child (the guide is one session).
- The README's config (the ```toml block with ``[[technique]]``) runs with ``pyengine run`` as
  written, and again with its optional ``weights`` and ``store`` lines switched on, after making
  those files the way its comments say.
- ``pyengine techniques`` lists every option of every technique with its default and doc;
  ``scripts/readme_numbers.py`` prints a stored faithfulness result as the README's table.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import REPO, run_cli
from pyengine import host

README = REPO / "README.md"
GUIDE = REPO / "docs" / "plugin-guide.md"
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)^```", re.M | re.S)
RUN_KEYWORDS = {"data", "output", "store", "save", "run_name", "device", "seed", "progress", "accept_other_model"}


def blocks(path: Path, lang: str) -> list[tuple[int, str, str | None]]:
    """(line, code, why it is not run) of every top-level ``lang`` block."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start("code")) + 1, m["code"], m["why"])
        for m in BLOCK.finditer(text)
        if m["lang"] == lang
    ]


def run_python(code: str, cwd: Path) -> None:
    script = cwd / "block.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


README_PYTHON = blocks(README, "python")


@pytest.mark.parametrize("line, code, why", README_PYTHON, ids=[f"README.md:{line}" for line, _, _ in README_PYTHON])
def test_readme_python_block(line: int, code: str, why: str | None, tmp_path: Path) -> None:
    if why is None:
        run_python(code, tmp_path)
        return
    tree = ast.parse(code)  # a block not run still parses and names real techniques and options
    found = host.techniques()
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pyengine.run" and node.args
    ]
    assert calls, f"README.md:{line}: a block marked not run has no pyengine.run to check"
    for call in calls:
        name = ast.literal_eval(call.args[0])
        assert name in found, f"README.md:{line}: unknown technique {name!r}"
        options = {f.name for f in found[name].Options.describe()}
        for keyword in call.keywords:
            assert keyword.arg in options | RUN_KEYWORDS, f"README.md:{line}: {name} has no option {keyword.arg!r}"


def test_not_run_blocks_are_few() -> None:
    assert sum(why is not None for _, _, why in README_PYTHON) <= 3


def test_plugin_guide_runs_in_order(tmp_path: Path) -> None:
    found = blocks(GUIDE, "python")
    assert found and all(why is None for _, _, why in found)
    run_python("\n".join(code for _, code, _ in found), tmp_path)


def readme_config() -> str:
    (config,) = [code for _, code, _ in blocks(README, "toml") if "[[technique]]" in code]
    return config


def test_readme_config_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(readme_config())
    result = run_cli("run", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gram-spectrum/run-001: " in result.stdout and (tmp_path / "results.h5").exists()


def test_readme_config_with_its_optional_files(tmp_path: Path) -> None:
    """``weights`` and ``store`` switched on, the files made as the config's comments say."""
    config = readme_config()
    weights = re.search(r'^# (weights = "(.*?)")', config, re.M)
    store = re.search(r'^# (store = "(.*?)").*\n((?:\s+#.*\n)+)', config, re.M)
    assert weights and store
    args = tomllib.loads(config)["model"]["args"]
    from pyengine.models import DemoCNN

    torch.manual_seed(0)
    torch.save(DemoCNN(**args).state_dict(), tmp_path / weights[2])
    command = " ".join(line.strip().lstrip("#").strip() for line in store[3].splitlines())
    command = command.removeprefix("pyengine capture ").replace("[--weights", "--weights").replace(".pt]", ".pt")
    captured = run_cli("capture", *command.split(), cwd=tmp_path)
    assert captured.returncode == 0, captured.stderr
    switched = config.replace(weights[0], weights[1]).replace("# " + store[1], store[1])
    (tmp_path / "config.toml").write_text(switched)
    result = run_cli("run", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gram-spectrum/run-001: layer features.relu3" in result.stdout


def test_readme_entry_point_is_the_example_plugins() -> None:
    (snippet,) = [code for _, code, _ in blocks(README, "toml") if "entry-points" in code]
    example = tomllib.loads((REPO / "examples" / "pyengine-example-plugin" / "pyproject.toml").read_text())
    assert tomllib.loads(snippet)["project"]["entry-points"] == example["project"]["entry-points"]


def test_techniques_lists_every_option_with_default_and_doc() -> None:
    listed = run_cli("techniques")
    assert listed.returncode == 0, listed.stderr
    for name, technique in host.techniques().items():
        one = run_cli("techniques", name).stdout.splitlines()
        assert one[0] == f"{name}: {technique.summary}"
        options = technique.Options.describe()
        assert one[1:] == [f"    {o.name} = {o.default!r}: {o.doc}" for o in options], name
        assert all(o.doc.strip() for o in options), name
        assert "\n".join(one) in listed.stdout


def test_readme_numbers_script(tmp_path: Path, small_cnn: torch.nn.Module) -> None:
    from pyengine.data import Shapes

    results = tmp_path / "results.h5"
    res = pyengine.run(
        "faithfulness",
        small_cnn,
        data=Shapes(8, seed=1, size=16),
        techniques=["saliency", "grad-cam"],
        steps=4,
        save=results,
        run_name="demo",
        progress=False,
    )
    script = [sys.executable, "-P", str(REPO / "scripts" / "readme_numbers.py"), "faithfulness", str(results)]
    printed = subprocess.run(script, capture_output=True, text=True, check=True).stdout.splitlines()
    assert (
        printed[0].startswith("| technique (defaults) | pointing game |") and printed[1] == "| --- | --- | --- | --- |"
    )
    order = sorted(res.pointing, key=lambda name: (-res.pointing[name], name))
    best = f"{max(res.pointing.values()):.3f}"
    for row, name in zip(printed[2:], order, strict=True):
        cells = row.strip("| ").split(" | ")
        assert cells[0].split(" ")[0] == name
        point = f"{res.pointing[name]:.3f}"
        assert cells[1] == (f"**{point}**" if point == best else point)
        assert cells[2:] == [f"{res.deletion_auc[name]:.3f}", f"{res.insertion_auc[name]:.3f}"]
    page = tmp_path / "page.md"
    marker = "<!-- numbers: scripts/readme_numbers.py faithfulness -->"
    page.write_text(f"before\n{marker}\nold\n<!-- /numbers -->\nafter\n")
    subprocess.run([*script, "--write", str(page)], check=True)
    assert page.read_text() == "before\n" + marker + "\n" + "\n".join(printed) + "\n<!-- /numbers -->\nafter\n"
    assert README.read_text().count(marker) == 1
    page.write_text("no markers\n")
    failed = subprocess.run([*script, "--write", str(page)], capture_output=True, text=True)
    assert failed.returncode == 2 and "expected one" in failed.stderr
