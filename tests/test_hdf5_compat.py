"""Captures open in the system's HDF5 tools (h5ls, h5dump; Debian 12: HDF5 1.10), not only in h5py's
copy of libhdf5: the format bounds (v110), float16, gzip + shuffle and fletcher32 all read there,
with the values h5py reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from conftest import run_cli
from pyengine.data import TensorDataset

H5DUMP, H5LS = shutil.which("h5dump"), shutil.which("h5ls")
pytestmark = pytest.mark.skipif(
    H5DUMP is None or H5LS is None,
    reason="needs the system HDF5 tools h5dump and h5ls (Debian/Ubuntu: apt-get install hdf5-tools; "
    "`make test` installs them as root)",
)


def run_tool(*args: str | Path, plugins: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run h5ls/h5dump; ``plugins``: HDF5_PLUGIN_PATH, e.g. an empty folder so no filter plugin is found."""
    env = {**os.environ, **({"HDF5_PLUGIN_PATH": str(plugins)} if plugins else {})}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)


def tool(*args: str | Path) -> str:
    result = run_tool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dump_command(path: Path, dataset: str, out: Path) -> list[str | Path]:
    return [str(H5DUMP), "-d", dataset, "-y", "-w", "0", "-m", "%.9g", "-o", out, path]


def dumped(path: Path, dataset: str, out: Path) -> np.ndarray:
    """h5dump's values of ``dataset``, flat; floats as the system libhdf5 converts them to native
    float, printed with 9 digits (which round-trip a float32)."""
    out.unlink(missing_ok=True)
    tool(*dump_command(path, dataset, out))
    text = out.read_text()
    return np.array([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)


def listed(path: Path) -> dict[str, tuple[int, ...]]:
    """h5ls -r: each dataset's current shape."""
    shapes = {}
    for line in tool(str(H5LS), "-r", path).splitlines():
        found = re.match(r"(\S+)\s+Dataset \{([^}]*)\}", line)
        if found:
            dims = [d.split("/")[0].strip() for d in found.group(2).split(",")]
            shapes[found.group(1)] = tuple(int(d) for d in dims)
    return shapes


def h5py_datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, obj: out.__setitem__("/" + name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def test_a_cli_capture_reads_in_the_system_tools_equal_to_h5py(tmp_path: Path) -> None:
    """``pyengine capture`` (float16, gzip + shuffle + fletcher32): h5ls lists every dataset with
    h5py's shape and filters, and h5dump's values of every dataset equal h5py's exactly."""
    path = tmp_path / "acts.h5"
    layers = "features.relu1,features.pool2,classifier.relu4"
    result = run_cli(
        "capture", "--model", "demo-cnn", "--model-arg", "width=4", "--model-arg", "image_size=16",
        "--data", "shapes", "--data-arg", "n=40", "--data-arg", "size=16", "--layers", layers, "--out", str(path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = h5py_datasets(path)
    assert listed(path) == {name: values.shape for name, values in expected.items()}
    assert {f"/activations/{layer}" for layer in layers.split(",")} <= set(expected)
    for name, values in expected.items():
        dump = dumped(path, name, tmp_path / "values.txt")
        if values.dtype.kind == "f":
            dump, values = dump.astype(np.float32), values.astype(np.float32)
        np.testing.assert_array_equal(dump, values.ravel())
    details = tool(str(H5LS), "-v", f"{path}/activations/features.relu1")
    assert "shuffle" in details and "deflate-1" in details and "fletcher32" in details
    assert "16-bit little-endian floating-point" in details


def test_float16_edge_values_convert_exactly(tmp_path: Path) -> None:
    """Subnormals, the largest float16, negative values and -0 convert to the system library's native
    floats exactly as numpy widens them (HDF5 1.10 knows no predefined float16 type)."""
    values = torch.tensor(
        [[6e-8, 1e-7, 3.05e-5, 6.1e-5, 65504.0, -65504.0], [-0.0, 0.0, -1e-7, 1 / 3, -2.5, 1024.5]]
    ).repeat(5, 1)
    model = nn.Sequential(nn.Identity())
    path = pyengine.capture(model, TensorDataset(values), ["0"], tmp_path / "edge.h5", dtype="float16", progress=False)
    with h5py.File(path, "r") as file:
        stored = file["activations/0"][()]
    assert stored.dtype == np.float16 and (stored[::2, :2] > 0).all() and stored[0, 0] < 6.2e-5  # subnormals
    dump = dumped(path, "/activations/0", tmp_path / "values.txt").astype(np.float32)
    np.testing.assert_array_equal(dump, stored.astype(np.float32).ravel())
    assert np.signbit(dump[6]) and not np.signbit(dump[7])


def test_an_lzf_capture_lists_but_its_values_need_h5pys_filter(tmp_path: Path) -> None:
    """``--compression lzf``: the layout opens in the system tools (h5ls lists it, naming filter
    lzf-32000), but a libhdf5 without h5py's lzf plugin reads no values; gzip is the default."""
    model = nn.Sequential(nn.Linear(3, 4))
    data = TensorDataset(torch.randn(16, 3))
    path = pyengine.capture(model, data, ["0"], tmp_path / "lzf.h5", compression="lzf", progress=False)
    assert listed(path)["/activations/0"] == (16, 4)
    assert "lzf-32000" in tool(str(H5LS), "-v", f"{path}/activations/0")
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    out = tmp_path / "values.txt"
    failed = run_tool(*dump_command(path, "/activations/0", out), plugins=empty)
    assert failed.returncode != 0 and not re.search(r"\d", out.read_text() if out.exists() else "")
    np.testing.assert_array_equal(dumped(path, "/inputs/index", tmp_path / "index.txt"), np.arange(16))
