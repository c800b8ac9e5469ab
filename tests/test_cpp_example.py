"""A C++ program links pyengine_core alone (no Python, no libtorch) and matches numpy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from conftest import REPO


def test_cpp_program_links_the_core(tmp_path: Path, cmake: str) -> None:
    build = tmp_path / "build"
    subprocess.run(
        [cmake, "-S", str(REPO / "examples" / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        check=True,
        capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    binary = next(p for p in build.rglob("gram_stream") if p.is_file())
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    assert "torch" not in linked and "python" not in linked
    n, d = 700, 45
    result = subprocess.run([str(binary), str(n), str(d), "64", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    values = dict(line.split() for line in result.stdout.splitlines())
    x = np.sin(0.001 * np.arange(n * d)).astype(np.float32).astype(np.float64).reshape(n, d)
    assert float(values["trace"]) == np.float64(np.trace(x.T @ x)).item() or abs(
        float(values["trace"]) - np.trace(x.T @ x)
    ) <= 1e-10 * np.trace(x.T @ x)
    assert abs(float(values["sum"]) - x.sum()) <= 1e-9 * abs(x).sum()
    bad = subprocess.run([str(binary), "1", "0", "1", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected" in bad.stderr
