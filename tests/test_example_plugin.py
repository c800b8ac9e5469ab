"""A third-party plugin package, installed into the environment, is discovered and runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, run_cli

EXAMPLE = REPO / "examples" / "pyengine-example-plugin"


@pytest.fixture(scope="module")
def installed_example() -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "--disable-pip-version-check",
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True,
        text=True,  # -P: not the repo
        env={**os.environ, **(env or {})},
    )


def test_discovered_by_the_cli(installed_example: None) -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["example"]["techniques"] == ["logit-margin", "unit-ablation"]
    assert rows["example"]["builtin"] is False
    assert rows["example"]["package"] == "pyengine-example-plugin 0.1.0"


def test_runs_through_python_api(installed_example: None) -> None:
    result = python(
        "import torch, pyengine\n"
        "m = torch.nn.Linear(4, 3); x = torch.randn(6, 4)\n"
        "r = pyengine.run('logit-margin', m, x)\n"
        "top = m(x).detach().topk(2).values\n"
        "print(torch.allclose(r.margins, top[:, 0] - top[:, 1]), r.margins.shape[0])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "6"]


def test_runs_through_the_cli(installed_example: None, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'out = "r.h5"\n[model]\nname = "demo-cnn"\nargs = { image_size = 16 }\n'
        '[data]\nname = "shapes"\nargs = { n = 10, size = 16 }\ninputs = 5\n'
        '[[technique]]\nname = "logit-margin"\noptions = { batch_size = 2 }\n'
    )
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "logit-margin/run-001: mean margin" in result.stdout
    assert (tmp_path / "r.h5").exists()


def test_load_plugins_restricts_entry_points(installed_example: None) -> None:
    listing = "import pyengine; print(' '.join(sorted(pyengine.techniques())))"
    only_builtins = python(listing, {"PYENGINE_LOAD_PLUGINS": ""}).stdout.split()
    selected = python(listing, {"PYENGINE_LOAD_PLUGINS": "example"}).stdout.split()
    everything = python(listing).stdout.split()
    assert "gram-spectrum" in only_builtins and "logit-margin" not in only_builtins
    assert selected == everything == sorted(only_builtins + ["logit-margin", "unit-ablation"])
    assert_user_error(
        run_cli("plugins", env={"PYENGINE_LOAD_PLUGINS": "nope"}),
        "PYENGINE_LOAD_PLUGINS names 'nope', which is not an installed pyengine plugin (installed: example",
    )


def test_the_plugins_own_tests_pass(installed_example: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        cwd=EXAMPLE,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout
