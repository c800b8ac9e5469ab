"""Writes that cannot lie: a failed write is one StoreError, never a finished-looking file, never a crash."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from conftest import assert_user_error, hooks_on, run_cli
from pyengine.data import Shapes
from pyengine.errors import StoreError
from pyengine.store import LIBVER, PendingResult, StoreReader, reserve_run_name, write_results
from pyengine.store._h5 import write_meta

NO_SPACE = "No space left on device"


def fail_on_call(monkeypatch: pytest.MonkeyPatch, cls: Any, method: str, call: int) -> None:
    """Make ``cls.method`` raise ENOSPC on its ``call``-th call (1-based), as a full disk does."""
    real = getattr(cls, method)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, method, failing)


# 96 rows in batches of 32: File.flush runs once for the new file, once per batch, once in finish.
@pytest.mark.parametrize(
    ("method", "call"),
    [("__setitem__", 7), ("flush", 3), ("flush", 5), ("flush", 1), ("create_dataset", 2), ("resize", 9)],
)
def test_injected_write_errors_in_capture(
    small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, call: int
) -> None:
    cls = h5py.File if method == "flush" else h5py.Group if method == "create_dataset" else h5py.Dataset
    fail_on_call(monkeypatch, cls, method, call)
    path = tmp_path / "acts.h5"
    small_cnn.train()
    with pytest.raises(StoreError) as raised:
        pyengine.capture(small_cnn, small_shapes, ["features.relu1"], path, batch_size=32, progress=False)
    message = str(raised.value)
    assert "\n" not in message and NO_SPACE in message and str(path) in message, message
    assert "removed acts.h5" in message, message
    assert list(tmp_path.iterdir()) == []  # no final file, and the untrusted partial is gone
    assert hooks_on(small_cnn) == [] and small_cnn.training
    monkeypatch.undo()
    done = pyengine.capture(small_cnn, small_shapes, ["features.relu1"], path, batch_size=32, progress=False)
    with pyengine.StoreReader(done) as reader:
        assert torch.equal(reader.index(), torch.arange(len(small_shapes)))


def test_a_partial_removed_underneath_is_not_renamed(
    small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path
) -> None:
    path = tmp_path / "acts.h5"

    def remove_it(rows: int) -> None:
        if rows == 32:
            (tmp_path / "acts.h5.partial").unlink()

    with pytest.raises(StoreError, match="does not re-open complete \\(No such file or directory\\)"):
        pyengine.capture(
            small_cnn, small_shapes, ["features.relu1"], path, batch_size=32, progress=False, on_batch=remove_it
        )
    assert list(tmp_path.iterdir()) == []


INJECTED_CLI = textwrap.dedent("""
    import errno, sys, h5py
    real = h5py.File.flush
    calls = [0]
    def flush(self):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)
    h5py.File.flush = flush
    from pyengine.cli import main
    sys.exit(main(sys.argv[2:]))
""")

CAPTURE_ARGS = [
    "capture",
    "--model",
    "demo-cnn",
    "--model-arg",
    "width=4",
    "--model-arg",
    "image_size=32",
    "--data",
    "shapes",
    "--data-arg",
    "size=32",
    "--layers",
    "features.relu1",
    "--dtype",
    "float32",
    "--compression",
    "none",
    "--batch-size",
    "32",
]


@pytest.mark.slow
@pytest.mark.parametrize("call", [3, 5])  # mid-capture, and the last flush before the rename
def test_injected_write_error_through_the_cli(tmp_path: Path, call: int) -> None:
    out = tmp_path / "acts.h5"
    result = subprocess.run(
        [
            sys.executable,
            "-P",
            "-c",
            INJECTED_CLI,
            str(call),
            "-q",
            *CAPTURE_ARGS,
            "--data-arg",
            "n=96",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)  # not -11: no crash at exit
    assert_user_error(result, NO_SPACE)
    assert str(out) in result.stderr and "wrote" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def results_of(size: int) -> list[PendingResult]:
    return [PendingResult("gram-spectrum", "run-002", {"values": torch.ones(size)}, {"options": "{}"})]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (its results folder too): relative path -> contents."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def inline_results(path: Path, runs: int, size: int = 3) -> None:
    """A results file as older pyengine wrote it: every run inline under /results."""
    with h5py.File(path, "w", libver=LIBVER) as file:
        write_meta(file, {"model_class": "old"}, {})
        for k in range(runs):
            group = file.create_group(f"results/gram-spectrum/run-{k + 1:03d}")
            group.create_dataset("values", data=np.arange(size, dtype=np.float32) + k, fletcher32=True)
            group.attrs["summary"] = f"run {k + 1}"


def stored(path: Path) -> dict[str, list[float]]:
    with StoreReader(path) as reader:
        return {f"{t}/{r}": reader.result(t, r)[0]["values"].tolist() for t, r in reader.results()}


# Linked: a file written by write_results (the run, then the index: 2 flushes, 2 renames). New: run,
# index, the file (3 each). Inline: the old run copied, the new run, index, the file (4 each).
WRITE_STEPS = {"linked": 2, "new": 3, "inline": 4}


def results_target(tmp_path: Path, kind: str) -> Path:
    target = tmp_path / "res.h5"
    if kind == "linked":
        write_results(target, [PendingResult("gram-spectrum", "run-001", {"values": torch.zeros(3)}, {})], meta={})
    elif kind == "inline":
        inline_results(target, 1)
    return target


def failing_close(real_close: Any, at: int) -> Any:
    """``h5py.File.close`` that fails (after closing) on the ``at``-th close of a writable file."""
    calls = [0]

    def close(self: h5py.File) -> None:
        writable = self.id.valid and self.mode == "r+"
        real_close(self)
        calls[0] += writable
        if writable and calls[0] == at:
            raise OSError(errno.ENOSPC, NO_SPACE)

    return close


@pytest.mark.parametrize("kind", list(WRITE_STEPS))
@pytest.mark.parametrize("method", ["create_dataset", "flush", "close", "replace"])
def test_injected_write_errors_in_write_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, method: str
) -> None:
    target = results_target(tmp_path, kind)
    before, results_before = tree(tmp_path), stored(target) if target.exists() else None
    for call in range(1, WRITE_STEPS[kind] + 1):
        if method == "close":  # a writable file's close fails after closing for real, so nothing is left open
            monkeypatch.setattr(h5py.File, "close", failing_close(h5py.File.close, call))
        elif method == "replace":
            fail_on_call(monkeypatch, os, "replace", call)
        else:
            fail_on_call(monkeypatch, h5py.Group if method == "create_dataset" else h5py.File, method, call)
        with pytest.raises(StoreError) as raised:
            write_results(target, results_of(10), meta={})
        monkeypatch.undo()
        message = str(raised.value)
        assert "\n" not in message and NO_SPACE in message and str(target) in message and "unchanged" in message
        assert tree(tmp_path) == before, (call, message)  # nothing changed, nothing left behind
        if results_before is not None:
            assert stored(target) == results_before
        if method == "create_dataset":
            break  # one array: one call
    write_results(target, results_of(10), meta={})
    assert stored(target) == {**(results_before or {}), "gram-spectrum/run-002": [1.0] * 10}


def test_copy_failure_in_write_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "res.h5"
    write_results(target, results_of(3), meta={})
    before = tree(tmp_path)

    def full(src: Any, dst: Any) -> None:
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(StoreError, match=f"index.h5.partial failed: {NO_SPACE}"):
        write_results(target, [PendingResult("x", "y", {}, {})], meta={})
    assert tree(tmp_path) == before


# A real full disk: a small tmpfs (needs root and a sandbox that lets it mount).


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and the mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, check=False)


@pytest.mark.slow
def test_capture_onto_a_full_disk(small_disk: Path) -> None:
    out = small_disk / "acts.h5"
    # 600 rows x 4x32x32 float32 = 9.4 MiB uncompressed, on a 4 MiB disk
    result = run_cli(*CAPTURE_ARGS, "--data-arg", "n=600", "--out", str(out))
    assert result.returncode == 2, (result.returncode, result.stderr)  # not -11: no crash at exit
    assert_user_error(result, NO_SPACE)
    assert str(out) in result.stderr and "wrote" not in result.stdout
    assert list(small_disk.iterdir()) == []  # no final file; the untrusted partial is removed
    small = run_cli(*CAPTURE_ARGS, "--data-arg", "n=40", "--out", str(out))  # the space is free again
    assert small.returncode == 0, small.stderr
    with pyengine.StoreReader(out) as reader:
        assert len(reader) == 40


WRITE_RESULTS = textwrap.dedent("""
    import sys, torch
    from pyengine.errors import StoreError
    from pyengine.store import PendingResult, write_results
    result = PendingResult("gram-spectrum", sys.argv[2], {"values": torch.ones(int(sys.argv[3]))}, {})
    try:
        write_results(sys.argv[1], [result], meta={})
    except StoreError as error:
        print(error)
        sys.exit(3)
    print("wrote")
""")


@pytest.mark.slow
def test_write_results_onto_a_full_disk(small_disk: Path) -> None:
    target = small_disk / "res.h5"

    def write(run: str, values: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-P", "-c", WRITE_RESULTS, str(target), run, str(values)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = write("run-001", 1000)
    assert first.returncode == 0 and first.stdout.strip() == "wrote", first.stderr
    before = tree(small_disk)
    full = write("run-002", 2_000_000)  # 8 MB of float32 on a 4 MiB disk
    assert full.returncode == 3, (full.returncode, full.stdout, full.stderr)  # the API raised; no crash
    lines = full.stdout.strip().splitlines()
    assert len(lines) == 1 and NO_SPACE in lines[0] and str(target) in lines[0], full.stdout
    assert "Traceback" not in full.stderr, full.stderr
    assert tree(small_disk) == before and stored(target) == {"gram-spectrum/run-001": [1.0] * 1000}


# Results layout: a file per run, an index, relative external links.


def files_written(folder: Path, call: Any) -> int:
    """Bytes of the files ``call()`` created or changed under ``folder``."""

    def state() -> dict[Path, tuple[int, int, int]]:
        return {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}

    before = state()
    call()
    return sum(info[1] for path, info in state().items() if before.get(path) != info)


def test_adding_a_run_costs_the_run_not_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "res.h5"
    copied: list[int] = []
    real_copy = shutil.copyfile

    def counting_copy(src: Any, dst: Any) -> Any:
        copied.append(Path(src).stat().st_size)
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", counting_copy)
    big = 250_000  # 1 MB of float32 a run
    for k in range(12):
        write_results(target, [PendingResult("demo", f"big-{k}", {"values": torch.ones(big)}, {})], meta={})
    small = [PendingResult("demo", f"small-{k}", {"values": torch.ones(10)}, {}) for k in range(2)]
    written = [files_written(tmp_path, lambda p=p: write_results(target, [p], meta={})) for p in small]
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.h5")) > 12_000_000
    assert all(n < 64_000 for n in written), written  # the small run and the index, never the 12 MB
    assert max(copied) < 64_000 and copied[-1] - copied[0] < 20_000, copied  # only the index is copied
    assert (
        files_written(
            tmp_path, lambda: write_results(target, [PendingResult("demo", "b", {"v": torch.ones(big)}, {})], meta={})
        )
        < 1_100_000
    )
    with StoreReader(target) as reader:
        assert len(reader.results()) == 15 and reader.result("demo", "big-11")[0]["values"].shape == (big,)


def test_inline_results_files_open_and_move_to_run_files(tmp_path: Path) -> None:
    target = tmp_path / "old.h5"
    inline_results(target, 3, size=250_000)
    expected = stored(target)  # read inline, as before
    with StoreReader(target) as reader:
        assert reader.result("gram-spectrum", "run-002")[1] == {"summary": "run 2"}
    new = [PendingResult("gram-spectrum", "new", {"values": torch.ones(4)}, {})]
    first = files_written(tmp_path, lambda: write_results(target, new, meta={}))
    assert first > 3_000_000  # moving the inline runs out costs the file, once
    assert stored(target) == {**expected, "gram-spectrum/new": [1.0] * 4}
    with h5py.File(target, "r") as file:
        assert isinstance(file.get("results", getlink=True), h5py.ExternalLink)
        assert file["meta"].attrs["model_class"] == "old"
        assert target.stat().st_size < 10_000  # the inline runs are gone from the file
    second = files_written(
        tmp_path,
        lambda: write_results(target, [PendingResult("gram-spectrum", "x", {"v": torch.ones(4)}, {})], meta={}),
    )
    assert second < 64_000
    with StoreReader(target) as reader:
        names = sorted(reader.results())
        assert reader.result("gram-spectrum", "run-003")[1] == {"summary": "run 3"}
        assert torch.equal(reader.result("gram-spectrum", "run-003")[0]["values"], torch.arange(250_000.0) + 2)
    assert names == sorted(("gram-spectrum", r) for r in ("run-001", "run-002", "run-003", "new", "x"))


def test_results_into_a_capture_keep_the_capture(small_cnn: nn.Module, small_shapes: Shapes, tmp_path: Path) -> None:
    path = pyengine.capture(
        small_cnn, small_shapes, ["features.relu2", "features.relu1"], tmp_path / "acts.h5", progress=False
    )
    with StoreReader(path) as reader:
        before = reader.describe()
        values = {layer: torch.cat(list(reader.iter_layer(layer))) for layer in reader.layers}
    write_results(path, results_of(5), meta={})
    write_results(path, [PendingResult("demo", "run-001", {"v": torch.ones(2)}, {})], meta={})
    with StoreReader(path) as reader:
        after = reader.describe()
        assert reader.layers == ["features.relu2", "features.relu1"]  # capture order, not sorted
        for layer in reader.layers:
            assert torch.equal(torch.cat(list(reader.iter_layer(layer))), values[layer])
        assert reader.result("gram-spectrum", "run-002")[0]["values"].tolist() == [1.0] * 5
    assert {k: v for k, v in after.items() if k != "results"} == {k: v for k, v in before.items() if k != "results"}
    assert after["results"] == ["demo/run-001", "gram-spectrum/run-002"]


def test_links_resolve_from_the_file_not_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        write_results(
            tmp_path / name / "res.h5", [PendingResult("t", "r", {"v": torch.full((3,), value)}, {})], meta={}
        )
    monkeypatch.chdir(tmp_path / "b")  # holds a res.h5.d of its own, with other values
    with StoreReader(tmp_path / "a" / "res.h5") as reader:
        assert reader.result("t", "r")[0]["v"].tolist() == [1.0] * 3
    with StoreReader(Path("../a/res.h5")) as reader:
        assert reader.result("t", "r")[0]["v"].tolist() == [1.0] * 3
    shutil.move(tmp_path / "a", tmp_path / "moved")  # the file and its folder move together
    with StoreReader(tmp_path / "moved" / "res.h5") as reader:
        assert reader.result("t", "r")[0]["v"].tolist() == [1.0] * 3
    write_results(tmp_path / "moved" / "res.h5", [PendingResult("t", "s", {"v": torch.ones(1)}, {})], meta={})
    if shutil.which("h5dump"):  # the HDF5 C tools follow the links too
        dump = subprocess.run(
            ["h5dump", "-d", "/results/t/r/v", str(tmp_path / "moved" / "res.h5")],
            capture_output=True,
            text=True,
            cwd=tmp_path / "b",
        )
        assert dump.returncode == 0 and "1, 1, 1" in dump.stdout, dump.stdout + dump.stderr


def test_a_results_file_without_its_folder_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "res.h5"
    write_results(target, results_of(3), meta={})
    (tmp_path / "elsewhere").mkdir()
    shutil.move(target, tmp_path / "elsewhere" / "res.h5")
    alone = tmp_path / "elsewhere" / "res.h5"
    with StoreReader(alone) as reader, pytest.raises(StoreError) as error:
        reader.results()
    assert "\n" not in str(error.value) and "res.h5.d must stay next to it" in str(error.value)
    with pytest.raises(StoreError, match="res.h5.d must stay next to the file"):
        write_results(alone, results_of(3), meta={})
    (tmp_path / "res.h5.d" / "gram-spectrum" / "run-002.h5").unlink()  # a run's file lost
    shutil.move(alone, target)
    with StoreReader(target) as reader, pytest.raises(StoreError, match="gram-spectrum/run-002.h5, is missing"):
        reader.result("gram-spectrum", "run-002")


@pytest.mark.parametrize("run", ["a/b", "", "..", "x.partial"])
def test_run_names_that_cannot_name_a_result(tmp_path: Path, run: str) -> None:
    with pytest.raises(StoreError, match="cannot name a result"):
        write_results(tmp_path / "res.h5", [PendingResult("t", run, {}, {})], meta={})
    if run:
        with pytest.raises(StoreError, match="cannot name a result"):
            reserve_run_name(tmp_path / "res.h5", "t", run)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys, h5py, torch
    from pyengine.store import PendingResult, write_results
    hook, at, after = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "after"
    calls = [0]
    real = os.replace if hook == "replace" else h5py.File.flush
    def killing(*args):
        calls[0] += 1
        if calls[0] == at and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args)
        if calls[0] == at and after:
            os.kill(os.getpid(), signal.SIGKILL)
    if hook == "replace":
        os.replace = killing
    else:
        h5py.File.flush = killing
    write_results(sys.argv[1], [PendingResult("t", "new", {"values": torch.ones(5)}, {"summary": "new"})], meta={})
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linked", "inline"])
def test_a_kill_at_any_step_leaves_the_earlier_results(tmp_path: Path, kind: str) -> None:
    target = results_target(tmp_path, kind)
    earlier = stored(target)
    steps = [
        (hook, at, when)
        for hook in ("replace", "flush")
        for at in range(1, WRITE_STEPS[kind] + 1)
        for when in ("before", "after")
    ]
    for hook, at, when in steps:
        killed = subprocess.run(
            [sys.executable, "-P", "-c", KILLED_WRITE, str(target), hook, str(at), when],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -9, (hook, at, when, killed.stderr)
        found = stored(target)  # opens, and every result reads
        committed = hook == "replace" and at == WRITE_STEPS[kind] and when == "after"
        assert found == ({**earlier, "t/new": [1.0] * 5} if committed else earlier), (hook, at, when)
        if committed:
            break
    write_results(
        target, [PendingResult("t", "later", {"values": torch.ones(2)}, {})], meta={}
    )  # leftovers do not block
    assert stored(target)["t/later"] == [1.0, 1.0]
