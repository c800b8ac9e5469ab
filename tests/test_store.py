"""Activation capture and the HDF5 store: layout, streaming, errors, crash-resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import pyengine
import pyengine.models
from conftest import hooks_on
from pyengine.capture import param_hash
from pyengine.data import Shapes, TensorDataset
from pyengine.errors import NotFoundError, PyengineError, StoreError
from pyengine.store import CHUNK_BYTES, SCHEMA_VERSION

LAYERS = ["features.relu1", "features.pool2", "classifier.relu4"]


def direct_outputs(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o.detach())) for n in LAYERS]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return out


def test_capture_layout_and_values(small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path) -> None:
    path = pyengine.capture(
        small_cnn, small_shapes, LAYERS, tmp_path / "acts.h5", batch_size=10, dtype="float32", progress=False
    )
    assert path == tmp_path / "acts.h5" and not (tmp_path / "acts.h5.partial").exists()
    assert hooks_on(small_cnn) == []
    everything = small_shapes.batch(range(len(small_shapes)))
    expected = direct_outputs(small_cnn, everything.inputs)
    with h5py.File(path, "r") as f:
        meta = f["meta"].attrs
        assert meta["format"] == "pyengine" and meta["schema_version"] == SCHEMA_VERSION
        assert meta["pyengine_version"] == pyengine.__version__
        assert meta["model_class"] == "pyengine.models.demo.DemoCNN"
        assert meta["model_param_hash"] == param_hash(small_cnn)
        assert meta["dataset_name"] == "shapes" and meta["dataset_size"] == len(small_shapes)
        config = json.loads(meta["config"])
        assert config["layers"] == LAYERS and config["dtype"] == "float32"
        assert list(f["activations"]) == LAYERS  # insertion order
        for name in LAYERS:
            dataset = f[f"activations/{name}"]
            assert dataset.compression == "gzip" and dataset.maxshape[0] is None
            chunk_bytes = np.prod(dataset.chunks) * dataset.dtype.itemsize
            row_bytes = np.prod(dataset.shape[1:]) * dataset.dtype.itemsize
            assert chunk_bytes <= CHUNK_BYTES and chunk_bytes + row_bytes > CHUNK_BYTES  # ~1 MiB
            np.testing.assert_allclose(dataset[:], expected[name].numpy(), rtol=1e-5, atol=1e-6)  # batch-size rounding
        np.testing.assert_array_equal(f["inputs/index"][:], np.arange(len(small_shapes)))
        np.testing.assert_array_equal(f["inputs/labels"][:], everything.labels.numpy())
        np.testing.assert_array_equal(f["concepts/texture"][:], everything.concepts["texture"].numpy())
        assert json.loads(f["concepts/colour"].attrs["categories"]) == ["red", "green", "blue", "yellow"]


def test_float16_and_gzip(small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path) -> None:
    path = pyengine.capture(
        small_cnn,
        small_shapes,
        ["classifier.relu4"],
        tmp_path / "a.h5",
        compression="gzip",
        start=10,
        stop=50,
        progress=False,
    )
    expected = direct_outputs(small_cnn, small_shapes.batch(range(10, 50)).inputs)["classifier.relu4"]
    with pyengine.StoreReader(path) as reader:
        assert len(reader) == 40 and reader.shape("classifier.relu4") == (40, 64)
        blocks = list(reader.iter_layer("classifier.relu4", rows=7, dtype=torch.float64))
        assert [b.shape[0] for b in blocks] == [7] * 5 + [5]
        torch.testing.assert_close(torch.cat(blocks), expected.half().double(), rtol=2e-3, atol=1e-3)
        assert torch.equal(reader.index(), torch.arange(10, 50))
        assert reader.describe()["layers"]["classifier.relu4"]["compression"] == "gzip"


def test_streaming_reads_one_block_at_a_time(tmp_path: Path) -> None:
    model, data = pyengine.models.DemoCNN(width=4, image_size=64), Shapes(80, size=64)  # 32 KiB rows
    path = pyengine.capture(model, data, ["features.relu1"], tmp_path / "a.h5", progress=False)
    with pyengine.StoreReader(path) as reader:
        chunk = h5py.File(path, "r")["activations/features.relu1"].chunks[0]
        sizes = [block.shape[0] for block in reader.iter_layer("features.relu1")]
    assert max(sizes) == chunk == 32 and sum(sizes) == len(data)


def test_capture_input_errors(small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path) -> None:
    with pytest.raises(
        NotFoundError,
        match="no layer 'features.relu9' in DemoCNN; closest: features.relu3, features.relu2, features.relu1",
    ):
        pyengine.capture(small_cnn, small_shapes, ["features.relu9"], tmp_path / "a.h5")
    with pytest.raises(PyengineError, match="dtype='int8' is invalid: expected one of float16, float32"):
        pyengine.capture(small_cnn, small_shapes, ["features.relu1"], tmp_path / "a.h5", dtype="int8")
    with pytest.raises(PyengineError, match="compression='zstd' is invalid"):
        pyengine.capture(small_cnn, small_shapes, ["features.relu1"], tmp_path / "a.h5", compression="zstd")
    with pytest.raises(PyengineError, match="expected 0 <= start < stop <= 96"):
        pyengine.capture(small_cnn, small_shapes, ["features.relu1"], tmp_path / "a.h5", stop=500)
    assert list(tmp_path.iterdir()) == []


def test_capture_is_idempotent_and_refuses_other_configs(
    small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path
) -> None:
    path = pyengine.capture(small_cnn, small_shapes, ["classifier.relu4"], tmp_path / "a.h5", progress=False)
    stamp = path.stat().st_mtime_ns
    assert pyengine.capture(small_cnn, small_shapes, ["classifier.relu4"], path, progress=False) == path
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(StoreError, match="exists with a different capture configuration"):
        pyengine.capture(small_cnn, small_shapes, ["features.relu1"], path, progress=False)
    pyengine.capture(small_cnn, small_shapes, ["features.relu1"], path, overwrite=True, progress=False)
    with pyengine.StoreReader(path) as reader:
        assert reader.layers == ["features.relu1"]


def test_tensor_datasets_and_user_concepts(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    data = TensorDataset(torch.randn(30, 5), torch.arange(30) % 2, {"parity": torch.arange(30) % 2})
    path = pyengine.capture(model, data, ["1"], tmp_path / "t.h5", batch_size=8, dtype="float32", progress=False)
    with pyengine.StoreReader(path) as reader:
        assert torch.equal(reader.concept("parity"), torch.arange(30) % 2)
        assert torch.allclose(next(reader.iter_layer("1", rows=30)), model(data.inputs).detach())


def test_foreign_truncated_and_newer_files_are_clear_errors(
    small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a pyengine store"):
        pyengine.StoreReader(foreign)

    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        pyengine.StoreReader(text)

    good = pyengine.capture(small_cnn, small_shapes, ["features.relu1"], tmp_path / "good.h5", progress=False)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated.h5: not a readable HDF5 file"):
        with pyengine.StoreReader(truncated) as reader:
            list(reader.iter_layer("features.relu1"))

    newer = tmp_path / "newer.h5"
    newer.write_bytes(good.read_bytes())
    with h5py.File(newer, "r+") as f:
        f["meta"].attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer than this pyengine's"):
        pyengine.StoreReader(newer)
    with pytest.raises(StoreError, match="no such file"):
        pyengine.StoreReader(tmp_path / "missing.h5")
    with pyengine.StoreReader(good) as reader, pytest.raises(StoreError, match="stored layers: features.relu1"):
        reader.shape("features.relu2")


CAPTURE_SCRIPT = textwrap.dedent("""
    import sys, torch, pyengine
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN
    torch.manual_seed(0)
    model = DemoCNN(width=4, image_size=32)
    data = Shapes(600, seed=5, size=32)
    def on_batch(rows):
        print(rows, flush=True)
    pyengine.capture(model, data, ["features.relu1", "features.relu3", "classifier.relu4"], sys.argv[1],
                     batch_size=16, progress=False, on_batch=on_batch)
    print("done", flush=True)
""")


def run_capture_script(path: Path, script: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)


def test_killed_capture_resumes_bit_for_bit(tmp_path: Path) -> None:
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE_SCRIPT)
    interrupted = tmp_path / "resumed.h5"
    for kill_after in (3, 9):  # kill twice, at different points
        with run_capture_script(interrupted, script) as process:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(kill_after)]
            assert all(line.strip().isdigit() for line in lines), lines
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert (tmp_path / "resumed.h5.partial").exists() and not interrupted.exists()
        with pytest.raises(StoreError, match="unfinished capture; run the same capture again to resume it"):
            pyengine.StoreReader(tmp_path / "resumed.h5.partial")

    resumed = run_capture_script(interrupted, script)
    output, _ = resumed.communicate(timeout=300)
    first_row = int(output.split()[0])
    assert first_row > 16 and output.strip().endswith("done")  # it resumed, not restarted

    reference = run_capture_script(tmp_path / "reference.h5", script)
    reference.communicate(timeout=300)
    with h5py.File(interrupted, "r") as a, h5py.File(tmp_path / "reference.h5", "r") as b:
        names: list[str] = []
        b.visit(lambda name: names.append(name) if isinstance(b[name], h5py.Dataset) else None)
        assert len(names) == 7
        for name in names:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
        assert a["meta"].attrs["config"] == b["meta"].attrs["config"]


def test_resume_refuses_a_different_configuration(small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path) -> None:
    path = tmp_path / "a.h5"

    def stop_early(rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pyengine.capture(
            small_cnn, small_shapes, ["features.relu1"], path, batch_size=8, on_batch=stop_early, progress=False
        )
    assert (tmp_path / "a.h5.partial").exists()
    with pytest.raises(StoreError, match="interrupted capture with a different configuration"):
        pyengine.capture(small_cnn, small_shapes, ["features.relu2"], path, progress=False)
    done = pyengine.capture(small_cnn, small_shapes, ["features.relu1"], path, batch_size=8, progress=False)
    with pyengine.StoreReader(done) as reader:
        assert torch.equal(reader.index(), torch.arange(len(small_shapes)))


def test_capture_restores_training_mode_and_warns_on_float16_overflow(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].weight.data.fill_(1e5)
    model.train()
    with pytest.warns(RuntimeWarning, match="beyond the float16 range"):
        pyengine.capture(model, TensorDataset(torch.ones(4, 3)), ["0"], tmp_path / "a.h5", progress=False)
    assert model.training
    pyengine.capture(model, TensorDataset(torch.ones(4, 3)), ["0"], tmp_path / "b.h5", dtype="float32", progress=False)


def test_tensor_datasets_with_other_contents_are_other_captures(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    pyengine.capture(model, TensorDataset(torch.zeros(4, 3)), ["0"], tmp_path / "a.h5", progress=False)
    with pytest.raises(StoreError, match="different capture configuration"):
        pyengine.capture(model, TensorDataset(torch.ones(4, 3)), ["0"], tmp_path / "a.h5", progress=False)
