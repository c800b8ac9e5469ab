"""The build: it refuses to start without torch and says how to fix it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_configure_without_torch_stops_with_instructions(tmp_path: Path, cmake: str) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = bare / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    result = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "cannot import torch" in message and "Install torch first" in message
    assert "pip install --no-build-isolation" in message


def test_core_builds_alone_without_python_or_torch(tmp_path: Path, cmake: str) -> None:
    result = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path / "core"), "-DPYENGINE_PYTHON=OFF"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout.lower()
    built = subprocess.run([cmake, "--build", str(tmp_path / "core")], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    assert list((tmp_path / "core").rglob("libpyengine_core.a"))
