"""Store integrity: checksummed chunks, one-line errors on damaged files, one writer per store."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import torch

import pyengine
from conftest import assert_user_error, run_cli
from pyengine.data import Shapes
from pyengine.errors import StoreError
from pyengine.models import DemoCNN
from pyengine.store import PendingResult, StoreReader, write_results

LAYER = "features.relu1"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = DemoCNN(width=4, image_size=16).eval()
    path = tmp_path_factory.mktemp("integrity") / "acts.h5"
    pyengine.capture(model, Shapes(96, seed=3, size=16), [LAYER, "classifier.relu4"], path, progress=False)
    write_results(
        path,
        [PendingResult("demo", "run-001", {"values": torch.arange(50.0)}, {"summary": "x"})],
        meta={},
    )
    return path


def chunk_span(path: Path, name: str) -> tuple[int, int]:
    """(byte offset, size) of the first stored chunk of dataset ``name``."""
    with h5py.File(path, "r") as file:
        info = file[name].id.get_chunk_info(0)
    return int(info.byte_offset), int(info.size)


def flipped(source: Path, target: Path, offset: int, mask: int = 1) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= mask
    target.write_bytes(bytes(data))
    return target


def one_line(error: pytest.ExceptionInfo[StoreError]) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_every_dataset_is_checksummed(store: Path) -> None:
    with h5py.File(store, "r") as file:
        names: list[str] = []
        file.visit(lambda name: names.append(name) if isinstance(file[name], h5py.Dataset) else None)
        names.append("results/demo/run-001/values")  # in the run's own file: visit does not follow links
        assert {"activations/features.relu1", "inputs/index"} <= set(names)
        assert all(file[name].fletcher32 for name in names), [n for n in names if not file[n].fletcher32]
        assert file[f"activations/{LAYER}"].compression == "gzip"  # the default every libhdf5 reads
    with StoreReader(store) as reader:
        assert reader.describe()["layers"][LAYER]["checksums"] is True


def test_single_bit_flips_in_chunk_data_fail_the_read(store: Path, tmp_path: Path) -> None:
    offset, size = chunk_span(store, f"activations/{LAYER}")
    rng = random.Random(0)
    for k in range(8):
        where = offset + rng.randrange(size)
        damaged = flipped(store, tmp_path / f"bit{k}.h5", where, 1 << rng.randrange(8))
        with StoreReader(damaged) as reader:
            assert reader.layers == [LAYER, "classifier.relu4"]  # metadata is intact
            with pytest.raises(StoreError) as error:
                list(reader.iter_layer(LAYER))
            text = one_line(error)
            assert text.startswith(f"{damaged}: cannot read /activations/{LAYER} rows 0-"), text
            assert text.endswith("the file is damaged"), text
            assert len(list(reader.iter_layer("classifier.relu4"))) > 0  # other layers still read


def test_flips_in_small_arrays_and_results_fail_the_read(store: Path, tmp_path: Path) -> None:
    offset, size = chunk_span(store, "inputs/index")
    damaged = flipped(store, tmp_path / "index.h5", offset + size // 2)
    with StoreReader(damaged) as reader, pytest.raises(StoreError, match="cannot read /inputs/index") as error:
        reader.index()
    one_line(error)

    damaged = tmp_path / "result.h5"  # a copy of the store with its results folder, one run damaged
    shutil.copyfile(store, damaged)
    shutil.copytree(store.with_name("acts.h5.d"), tmp_path / "acts.h5.d")
    run_file = tmp_path / "acts.h5.d" / "demo" / "run-001.h5"
    offset, size = chunk_span(run_file, "result/values")
    flipped(run_file, run_file, offset + 3)
    with StoreReader(damaged) as reader, pytest.raises(StoreError) as error:
        reader.result("demo", "run-001")
    assert "cannot read /results/demo/run-001/values" in one_line(error)


def test_damaged_superblock_is_one_line_everywhere(store: Path, tmp_path: Path) -> None:
    for where in (0, 20, 40):  # signature, an address, the end-of-file address: all checksummed
        damaged = flipped(store, tmp_path / f"super{where}.h5", where)
        with pytest.raises(StoreError) as error:
            StoreReader(damaged)
        assert one_line(error).startswith(f"{damaged}: ")
        assert_user_error(run_cli("info", str(damaged)), str(damaged))


def test_damaged_metadata_blocks_are_one_line_store_errors(store: Path, tmp_path: Path) -> None:
    """Flip bytes across the file's metadata (everything outside the chunks): never a traceback."""
    with h5py.File(store, "r") as file:
        spans: list[tuple[int, int]] = []
        file.visit(
            lambda name: (
                spans.append(chunk_span(store, name))
                if isinstance(file[name], h5py.Dataset) and file[name].id.get_num_chunks()
                else None
            )
        )
    shutil.copytree(store.with_name("acts.h5.d"), tmp_path / "acts.h5.d")  # the damaged copies' results
    size = store.stat().st_size
    metadata = [i for i in range(48, size) if not any(a <= i < a + n for a, n in spans)]
    failures = 0
    for k, where in enumerate(metadata[:: max(1, len(metadata) // 60)]):
        damaged = flipped(store, tmp_path / f"meta{k}.h5", where, 0xFF)
        try:
            with StoreReader(damaged) as reader:
                reader.describe()
                for layer in reader.layers:
                    list(reader.iter_layer(layer))
                reader.index()
                reader.labels()
                for technique, run in reader.results():
                    reader.result(technique, run)
        except StoreError as error:
            assert "\n" not in str(error) and str(error).startswith(f"{damaged}: "), str(error)
            failures += 1
    assert failures > 0


def test_cli_info_on_a_damaged_metadata_block(store: Path, tmp_path: Path) -> None:
    with h5py.File(store, "r") as file:
        address = h5py.h5o.get_info(file["activations"].id).addr  # the group's object header
    damaged = flipped(store, tmp_path / "header.h5", address + 6, 0xFF)
    assert_user_error(run_cli("info", str(damaged)), f"{damaged}: cannot read")
    shutil.copyfile(store, tmp_path / "intact.h5")
    shutil.copytree(store.with_name("acts.h5.d"), tmp_path / "acts.h5.d")  # a results file moves with its folder
    assert run_cli("info", str(tmp_path / "intact.h5")).returncode == 0


SLOW_CAPTURE = textwrap.dedent("""
    import sys, time, torch, pyengine
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN
    torch.manual_seed(0)
    model = DemoCNN(width=4, image_size=32)
    pause = float(sys.argv[2])
    def on_batch(rows):
        print(rows, flush=True)
        time.sleep(pause)
    pyengine.capture(model, Shapes(600, seed=5, size=32), ["features.relu1", "classifier.relu4"], sys.argv[1],
                     batch_size=16, progress=False, on_batch=on_batch)
    print("done", flush=True)
""")


def start_capture(script: Path, path: Path, pause: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), str(path), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_one_writer_per_store_and_resume_after_a_kill(tmp_path: Path) -> None:
    script = tmp_path / "capture.py"
    script.write_text(SLOW_CAPTURE)
    path = tmp_path / "a.h5"
    partial, lock = tmp_path / "a.h5.partial", tmp_path / "a.h5.lock"
    with start_capture(script, path, 2.0) as first:  # 38 batches: it outlives the checks below
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "16"
        assert lock.read_text().strip() == str(first.pid)

        second = start_capture(script, path, 0.0)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode != 0
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("pyengine.errors.StoreError: ") and f"pid {first.pid}" in last, stderr
        assert str(path) in last
        refused = run_cli(
            *("capture", "--model", "demo-cnn", "--model-arg", "image_size=16", "--data", "shapes"),
            *("--data-arg", "n=8", "--data-arg", "size=16", "--layers", "features.relu1", "--out", str(path)),
        )
        assert_user_error(refused, f"another capture (pid {first.pid}) is writing it")

        info = run_cli("info", str(partial))
        assert info.returncode == 0, info.stderr
        head = info.stdout.splitlines()[0]
        assert f"capture in progress (pid {first.pid}): " in head and "of 600 rows written so far" in head, head
        assert "resume" not in info.stdout
        with pytest.raises(StoreError, match=f"being written by a running capture \\(pid {first.pid}\\)"):
            StoreReader(partial)
        with StoreReader(partial, running_ok=True) as reader:
            assert reader.writer_pid == first.pid
            rows = len(reader)
            assert rows >= 16 and rows % 16 == 0
            assert sum(len(block) for block in reader.iter_layer("classifier.relu4", stop=rows)) == rows

        first.send_signal(signal.SIGKILL)
        first.wait()

    assert partial.exists() and lock.exists()  # the kernel released the lock; the file stays
    assert_user_error(run_cli("info", str(partial)), "run the same capture again to resume it")
    with start_capture(script, path, 0.0) as resumed:
        output, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert int(output.split()[0]) > 16 and output.strip().endswith("done")  # resumed, not restarted
    assert path.exists() and not partial.exists() and not lock.exists()
    with StoreReader(path) as reader:
        assert len(reader) == 600
