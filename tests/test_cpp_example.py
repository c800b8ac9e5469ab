"""C++ programs link pyengine_core alone (no Python, no libtorch): gram_stream matches numpy, and
capture_gram reads a capture with the system's libhdf5 (not h5py's copy) and matches gram-spectrum."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import pyengine
from conftest import REPO
from pyengine.data import Shapes, TensorDataset
from pyengine.data.base import TorchDataset
from pyengine.models import DemoCNN

NO_HDF5 = (
    "capture_gram not built: CMake found no HDF5 C library and headers "
    "(Debian/Ubuntu: apt-get install libhdf5-dev; `make test` installs it as root)"
)


@pytest.fixture(scope="module")
def example_build(cmake: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("cpp-example")
    subprocess.run(
        [cmake, "-S", str(REPO / "examples" / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        check=True,
        capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True)
    return build


def program(build: Path, name: str) -> Path | None:
    return next((p for p in build.rglob(name) if p.is_file() and os.access(p, os.X_OK)), None)


def test_cpp_program_links_the_core(example_build: Path) -> None:
    binary = program(example_build, "gram_stream")
    assert binary is not None
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


@pytest.fixture(scope="module")
def capture_gram(example_build: Path) -> Path:
    binary = program(example_build, "capture_gram")
    if binary is None:
        pytest.skip(NO_HDF5)
    return binary


def run_gram(binary: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def parsed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """capture_gram's output: the scalars, the eigenvalues and (with --matrix) the matrix."""
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = {"rows": []}
    for line in result.stdout.splitlines():
        key, *values = line.split()
        if key == "row":
            out["rows"].append([float(v) for v in values])
        elif key == "eigenvalues":
            out[key] = np.array([float(v) for v in values])
        else:
            out[key] = values[0]
    return out


def assert_spectrum_equal(ours: np.ndarray, theirs: torch.Tensor) -> None:
    """Equal to 1e-10 relative to the largest eigenvalue (both float64, summed in other orders)."""
    reference = theirs.double().numpy()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-10 * abs(reference).max())


def test_capture_gram_links_the_system_libhdf5(capture_gram: Path) -> None:
    linked = subprocess.run(["ldd", str(capture_gram)], capture_output=True, text=True).stdout
    hdf5 = [line.split("=>")[-1].split("(")[0].strip() for line in linked.splitlines() if "libhdf5" in line]
    assert hdf5 and all(Path(path).exists() for path in hdf5), linked
    assert not any("h5py" in path or "site-packages" in path for path in hdf5), linked
    assert "torch" not in linked and "python" not in linked


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_capture_gram_equals_gram_spectrum(capture_gram: Path, tmp_path: Path, dtype: str) -> None:
    """Conv maps (channels are units, positions samples), a pooled map and a (rows, units) layer of
    the demo CNN, stored float16 or float32 with the default gzip + shuffle + fletcher32, read in
    row blocks that do not divide the rows: the spectra equal gram-spectrum's, centred or not, and
    the printed covariance equals numpy's from h5py's copy of the values."""
    torch.manual_seed(0)
    model = DemoCNN(width=4, image_size=16).eval()
    layers = ["features.relu1", "features.pool2", "classifier.relu4"]
    path = pyengine.capture(
        model, Shapes(90, seed=3, size=16), layers, tmp_path / "acts.h5", dtype=dtype, progress=False
    )
    for center in (True, False):
        result = pyengine.run("gram-spectrum", model, store=path, layers=layers, center=center, progress=False)
        for layer in layers:
            flags = ["--rows", "7", "--threads", "2"] + ([] if center else ["--no-center"])
            ours = parsed(run_gram(capture_gram, path, layer, *flags, "--matrix"))
            assert int(ours["units"]) == result.units[layer] and int(ours["samples"]) == result.samples[layer]
            assert_spectrum_equal(ours["eigenvalues"], result.eigenvalues[layer])
            with h5py.File(path, "r") as file:
                values = file[f"activations/{layer}"][:].astype(np.float64)
            x = np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])
            expected = np.cov(x, rowvar=False, bias=True) if center else x.T @ x / len(x)
            np.testing.assert_allclose(np.array(ours["rows"]), expected, rtol=0, atol=1e-12 * abs(expected).max())


def test_capture_gram_units_flatten_and_last(capture_gram: Path, tmp_path: Path) -> None:
    """--units flatten (every value of a row is a unit) and --units last equal gram-spectrum's."""
    torch.manual_seed(1)
    model = DemoCNN(width=4, image_size=16).eval()
    path = pyengine.capture(model, Shapes(60, seed=5, size=16), ["features.pool2"], tmp_path / "a.h5", progress=False)
    for units in ("flatten", "last"):
        result = pyengine.run(
            "gram-spectrum", model, store=path, layers=["features.pool2"], units=units, progress=False
        )
        ours = parsed(run_gram(capture_gram, path, "features.pool2", "--units", units))
        assert int(ours["units"]) == result.units["features.pool2"]
        assert_spectrum_equal(ours["eigenvalues"], result.eigenvalues["features.pool2"])


def test_capture_gram_drops_padded_tokens(capture_gram: Path, tmp_path: Path) -> None:
    """A BERT block's (B, T, D) values: units last (recorded at capture), /inputs/mask's padded
    positions left out, as gram-spectrum does."""
    pytest.importorskip("transformers")
    from lm_models import build_lm, token_corpus

    items = token_corpus(10, 17)
    for item in items:
        item["concepts"] = {k: v for k, v in item["concepts"].items() if k != "topic_token"}
    model, layer = build_lm("bert"), "bert.encoder.layer.0"
    path = tmp_path / "tokens.h5"
    pyengine.capture(model, TorchDataset(items), [layer], path, progress=False)
    result = pyengine.run("gram-spectrum", model, store=path, layers=[layer], progress=False)
    ours = parsed(run_gram(capture_gram, path, layer))
    with h5py.File(path, "r") as file:
        real = int(file["inputs/mask"][:].sum())
        assert real < file["inputs/mask"].size  # some rows are padded
    assert int(ours["unit_dim"]) == 2 and int(ours["samples"]) == result.samples[layer] == real
    assert_spectrum_equal(ours["eigenvalues"], result.eigenvalues[layer])


def test_capture_gram_errors_are_one_line(capture_gram: Path, tmp_path: Path) -> None:
    """A bad path, a missing layer, a file that is not a capture, an lzf capture (h5py's filter,
    which a plain libhdf5 lacks) and a damaged chunk (uncompressed: only the fletcher32 checksum
    can tell): exit status 2 and one line naming the problem."""
    data = TensorDataset(torch.randn(12, 3))
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
    good = pyengine.capture(model, data, ["1"], tmp_path / "good.h5", progress=False)
    lzf = pyengine.capture(model, data, ["1"], tmp_path / "lzf.h5", compression="lzf", progress=False)
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["x"] = np.zeros(3)
    damaged = pyengine.capture(model, data, ["1"], tmp_path / "damaged.h5", compression="none", progress=False)
    assert parsed(run_gram(capture_gram, damaged, "1"))["samples"] == "12"
    with h5py.File(damaged, "r") as file:
        offset = file["activations/1"].id.get_chunk_info(0).byte_offset
    with open(damaged, "r+b") as raw:
        raw.seek(offset + 6)
        byte = raw.read(1)
        raw.seek(offset + 6)
        raw.write(bytes([byte[0] ^ 0x40]))
    no_plugins = {"HDF5_PLUGIN_PATH": str(tmp_path)}  # no lzf plugin can be found there
    cases = [
        ((tmp_path / "missing.h5", "1"), "missing.h5: cannot open it as an HDF5 file"),
        ((good, "2"), "no layer '2' in /activations (stored: 1)"),
        ((tmp_path / "other.h5", "1"), "not a pyengine capture"),
        ((lzf, "1"), "compressed with HDF5 filter 32000 (lzf), which this libhdf5 lacks"),
        ((damaged, "1"), "reading rows 0..12 of /activations/1 failed (damaged file?)"),
        ((good, "1", "--units", "rows"), "--units rows is invalid"),
        ((good, "1", "--rows", "0"), "--rows 0 is invalid"),
        ((good,), "usage: capture_gram CAPTURE.h5 LAYER"),
    ]
    for args, message in cases:
        result = run_gram(capture_gram, *args, env=no_plugins)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert lines[0].startswith("capture_gram: error: ")
