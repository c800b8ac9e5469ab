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
import pytest
import torch
from torch import nn

import pyengine
from conftest import assert_user_error, hooks_on, run_cli
from pyengine.data import Shapes
from pyengine.errors import StoreError
from pyengine.store import PendingResult, write_results

NO_SPACE = "No space left on device"


def fail_on_call(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, call: int) -> None:
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


@pytest.mark.parametrize(("method", "call"), [("create_dataset", 1), ("flush", 1), ("close", 1)])
def test_injected_write_errors_in_write_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, call: int
) -> None:
    target = tmp_path / "res.h5"
    write_results(target, [PendingResult("gram-spectrum", "run-001", {"v": torch.zeros(3)}, {})], meta={})
    before = target.read_bytes()
    cls = h5py.Group if method == "create_dataset" else h5py.File
    if method == "close":  # a writable file's close fails after closing for real, so nothing is left open
        real_close = h5py.File.close

        def failing_close(self: h5py.File) -> None:
            writable = self.id.valid and self.mode == "r+"
            real_close(self)
            if writable:
                raise OSError(errno.ENOSPC, NO_SPACE)

        monkeypatch.setattr(h5py.File, "close", failing_close)
    else:
        fail_on_call(monkeypatch, cls, method, call)
    with pytest.raises(StoreError) as raised:
        write_results(target, results_of(10), meta={})
    message = str(raised.value)
    assert "\n" not in message and NO_SPACE in message and str(target) in message and "unchanged" in message
    monkeypatch.undo()
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(StoreError, match=NO_SPACE):  # a new file: nothing is left behind
        fail_on_call(monkeypatch, h5py.Group, "create_dataset", 1)
        write_results(tmp_path / "new.h5", results_of(10), meta={})
    assert sorted(tmp_path.iterdir()) == [target]


def test_copy_failure_in_write_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "res.h5"
    write_results(target, results_of(3), meta={})
    before = target.read_bytes()

    def full(src: Any, dst: Any) -> None:
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(StoreError, match=f"res.h5.partial failed: {NO_SPACE}"):
        write_results(target, [PendingResult("x", "y", {}, {})], meta={})
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == [target]


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
    before = target.read_bytes()
    full = write("run-002", 2_000_000)  # 8 MB of float32 on a 4 MiB disk
    assert full.returncode == 3, (full.returncode, full.stdout, full.stderr)  # the API raised; no crash
    lines = full.stdout.strip().splitlines()
    assert len(lines) == 1 and NO_SPACE in lines[0] and str(target) in lines[0], full.stdout
    assert "Traceback" not in full.stderr, full.stderr
    assert target.read_bytes() == before and sorted(small_disk.iterdir()) == [target]
