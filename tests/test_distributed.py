"""Runs over several processes (``torchrun --nproc-per-node 2``, gloo on the CPU) equal one process.

Per-row results, counts and top-k lists are bit-identical; float sums (Gram matrices) agree to
1e-12 relative. Captures are split into part files joined by virtual datasets, and a rank killed
mid-capture is resumed by running the same command again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist

import pyengine
from conftest import REPO
from pyengine import ops
from pyengine.distributed import part_of
from pyengine.errors import StoreError
from pyengine.models import DemoCNN

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")

WORKER = REPO / "tests" / "distributed_worker.py"
FLOAT_SUMS = {"gram-spectrum", "jacobian-gram", "interaction-basis"}  # reduced sums of floats: equal to rounding


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


def one_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-P", *args], cwd=cwd, env=single_thread_env(), capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise AssertionError(f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize(("start", "stop", "block"), [(0, 90, 16), (7, 50, 1), (3, 100, 8), (0, 5, 1)])
def test_parts_are_contiguous_whole_blocks_in_rank_order(start: int, stop: int, block: int, world: int) -> None:
    blocks = -(-(stop - start) // block)
    if blocks < world:
        pytest.skip("fewer blocks than processes: refused by the callers")
    parts = [part_of(start, stop, rank, world, block) for rank in range(world)]
    assert parts[0][0] == start and parts[-1][1] == stop
    for (a, b), (c, _) in zip(parts, parts[1:]):
        assert b == c and a < b
    for a, _ in parts:
        assert (a - start) % block == 0  # each part starts at a batch one process would start
    sizes = [-(-(b - a) // block) for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def test_topk_merge_equals_one_pass_whatever_the_split() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (50, 7), generator=generator).double()  # many ties
    payload = torch.randint(0, 100, (50, 7), generator=generator)
    ids = torch.arange(50)
    whole = ops.topk_empty(7, 5)
    ops.topk_update(values, ids, payload, *whole)
    for cuts in ([0, 50], [0, 17, 50], [0, 3, 4, 30, 50]):
        lists = []
        for a, b in zip(cuts, cuts[1:]):
            top = ops.topk_empty(7, 5)
            ops.topk_update(values[a:b], ids[a:b], payload[a:b], *top)
            lists.append(top)
        merged = ops.topk_merge(lists[::-1], 5)  # the order of the lists does not matter either
        for got, expected in zip(merged, whole):
            assert torch.equal(got, expected)


def _compare(one: dict[str, Any], two: dict[str, Any]) -> None:
    assert one.keys() == two.keys()
    for name in one:
        assert one[name]["rows"] == two[name]["rows"], name
        assert one[name]["scalars"] == two[name]["scalars"] or name in FLOAT_SUMS, name
        arrays, others = one[name]["arrays"], two[name]["arrays"]
        assert arrays.keys() == others.keys(), name
        for key, value in arrays.items():
            other = others[key]
            if name in FLOAT_SUMS:
                scale = float(value.double().abs().max())
                assert float((value.double() - other.double()).abs().max()) <= 1e-12 * scale, (name, key)
            else:
                assert torch.equal(value, other), (name, key)  # per-row, counts, top-k, probes: bit for bit


def test_techniques_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    one_process(str(WORKER), "one.pt", "techniques", cwd=tmp_path)
    torchrun(str(WORKER), "two.pt", "techniques", cwd=tmp_path)
    _compare(torch.load(tmp_path / "one.pt", weights_only=False), torch.load(tmp_path / "two.pt", weights_only=False))


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        found: dict[str, np.ndarray] = {}
        file.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
        config = file["meta"].attrs["config"]
    return {**found, "config": np.array(config)}


def _same_store(a: Path, b: Path) -> None:
    first, second = _datasets(a), _datasets(b)
    assert first.keys() == second.keys()
    for name, values in first.items():
        assert np.array_equal(values, second[name]), name


CAPTURE = [
    "capture",
    "--model",
    "demo-cnn",
    "--model-arg",
    "width=4",
    "--model-arg",
    "image_size=16",
    "--data",
    "shapes",
    "--data-arg",
    "n=70",
    "--data-arg",
    "size=16",
    "--layers",
    "features.relu1,features.relu2",
    "--batch-size",
    "8",
]


def test_sharded_capture_and_run_under_torchrun(tmp_path: Path) -> None:
    one_process("-m", "pyengine", "-q", *CAPTURE, "--out", "one.h5", cwd=tmp_path)
    done = torchrun("-m", "pyengine", "-q", *CAPTURE, "--out", "two.h5", cwd=tmp_path)
    assert done.stdout.count("wrote") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two.h5.parts").iterdir()) == [
        "part-00000-of-00002.h5",
        "part-00001-of-00002.h5",
    ]
    with h5py.File(tmp_path / "two.h5", "r") as file:
        assert file["activations/features.relu2"].is_virtual
    info = one_process("-m", "pyengine", "info", "two.h5", cwd=tmp_path).stdout
    assert "/activations/features.relu2  (70, 8, 8, 8) float16 virtual over 2 parts" in info
    _same_store(tmp_path / "one.h5", tmp_path / "two.h5")

    moved = tmp_path / "moved"  # the folder moves as a whole: the parts are named relative to it
    moved.mkdir()
    shutil.move(tmp_path / "two.h5", moved / "two.h5")
    shutil.move(tmp_path / "two.h5.parts", moved / "two.h5.parts")
    _same_store(tmp_path / "one.h5", moved / "two.h5")
    model = DemoCNN(width=4, image_size=16)
    torch.manual_seed(0)
    stored = {
        path: pyengine.run("gram-spectrum", model, store=path, progress=False, accept_other_model=True)
        for path in (tmp_path / "one.h5", moved / "two.h5")
    }
    first, second = stored.values()
    for layer, values in first.eigenvalues.items():
        assert torch.equal(values, second.eigenvalues[layer])

    (moved / "two.h5.parts" / "part-00001-of-00002.h5").unlink()  # HDF5 would read zeros: refused
    with pytest.raises(StoreError, match="part-00001-of-00002.h5"):
        pyengine.StoreReader(moved / "two.h5")

    config = tmp_path / "run.toml"
    config.write_text(
        'out = "results.h5"\n[model]\nname = "demo-cnn"\nargs = { width = 4, image_size = 16 }\n'
        '[data]\nname = "shapes"\nargs = { n = 40, size = 16 }\n'
        '[[technique]]\nname = "relu-sync"\noptions = { layers = ["features.relu1"], batch_size = 8 }\n'
    )
    done = torchrun("-m", "pyengine", "-q", "run", str(config), cwd=tmp_path)
    assert done.stdout.count("wrote") == 1
    with pyengine.StoreReader(tmp_path / "results.h5") as reader:
        assert reader.results() == [("relu-sync", "run-001")]
        two, _ = reader.result("relu-sync", "run-001")
    (tmp_path / "results.h5").unlink()
    one_process("-m", "pyengine", "-q", "run", str(config), cwd=tmp_path)
    with pyengine.StoreReader(tmp_path / "results.h5") as reader:
        one, _ = reader.result("relu-sync", "run-001")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_killed_rank_is_resumed_bit_for_bit(tmp_path: Path) -> None:
    one_process(str(WORKER), "one.h5", "capture", cwd=tmp_path)
    killed = torchrun(str(WORKER), "two.h5", "capture", "16", cwd=tmp_path, check=False)
    assert killed.returncode != 0 and not (tmp_path / "two.h5").exists()
    left = sorted(p.name for p in (tmp_path / "two.h5.parts").iterdir())
    assert "part-00001-of-00002.h5.partial" in left  # rank 1's rows so far, flushed
    with h5py.File(tmp_path / "two.h5.parts" / "part-00001-of-00002.h5.partial", "r", swmr=True) as file:
        assert file["inputs/index"].shape[0] >= 16
    torchrun(str(WORKER), "two.h5", "capture", cwd=tmp_path)
    _same_store(tmp_path / "one.h5", tmp_path / "two.h5")
