"""Random-row reads: ``StoreReader.take`` and the chunk cache that keeps them from re-reading chunks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from pyengine.errors import StoreError
from pyengine.store import ActivationWriter, StoreReader
from pyengine.store.reader import CHUNK_CACHE_BYTES, MIN_CACHED_CHUNKS

SHAPES = {"wide": (128, 4, 4), "narrow": (16,)}  # float16: 4 KiB rows (256 a chunk), 32 B rows
ROWS = 6000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("reads") / "acts.h5"
    writer = ActivationWriter.create(
        path,
        meta={"model_class": "test"},
        config={"test": "reads"},
        layers=SHAPES,
        dtype="float16",
        compression="gzip",
        concepts={},
    )
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal((ROWS, *shape)).astype(np.float16) for name, shape in SHAPES.items()}
    for first in range(0, ROWS, 1000):
        block = {name: torch.from_numpy(v[first : first + 1000]) for name, v in values.items()}
        writer.append(torch.arange(first, first + 1000), torch.zeros(1000, dtype=torch.long), {}, block)
    writer.finish()
    return path, values


def test_take_returns_rows_in_the_order_asked(store: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, values = store
    rng = np.random.default_rng(1)
    asked = np.concatenate([rng.integers(0, ROWS, 500), [ROWS - 1, 0, 7, 7, 3000]])  # unsorted, repeats
    with StoreReader(path) as reader:
        for layer in SHAPES:
            got = reader.take(layer, torch.from_numpy(asked))
            assert got.dtype == torch.float32 and got.shape == (len(asked), *SHAPES[layer])
            assert torch.equal(got, torch.from_numpy(values[layer][asked].astype(np.float32)))
            assert torch.equal(reader.take(layer, [5], dtype=torch.float16)[0], torch.from_numpy(values[layer][5]))
            assert reader.take(layer, []).shape == (0, *SHAPES[layer])


def test_take_refuses_rows_outside_the_store(store: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = store
    with StoreReader(path) as reader:
        for bad in (ROWS, -1):
            with pytest.raises(
                StoreError, match=f"row {bad} of layer 'wide' does not exist; expected rows 0..{ROWS - 1}"
            ):
                reader.take("wide", [0, bad])
        with pytest.raises(StoreError, match="no activations for layer 'nope'"):
            reader.take("nope", [0])


def test_each_layer_gets_its_share_of_the_cache(store: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = store
    with StoreReader(path) as reader:
        for layer in SHAPES:
            reader.take(layer, [0])
        caches = {layer: reader._layer(layer).id.get_access_plist().get_chunk_cache() for layer in SHAPES}
    for slots, nbytes, w0 in caches.values():
        assert nbytes == CHUNK_CACHE_BYTES // len(SHAPES) and w0 == 1.0 and slots > nbytes // (1 << 20)
    with StoreReader(path, chunk_cache=1 << 20) as reader:  # too small: still a few chunks a layer
        (_, nbytes, _) = reader._layer("wide").id.get_access_plist().get_chunk_cache()
        assert nbytes == MIN_CACHED_CHUNKS * 256 * 4096


class CountingFile(io.FileIO):
    """A file that counts the bytes HDF5 reads from it."""

    read_bytes = 0

    def readinto(self, buffer: Any) -> int:
        count = super().readinto(buffer) or 0
        CountingFile.read_bytes += count
        return count


def bytes_read_by_random_rows(path: Path, monkeypatch: pytest.MonkeyPatch, chunk_cache: int) -> int:
    """Bytes read from disk while reading 400 random rows of 'wide' one at a time."""
    real, opened = h5py.File, []

    def counted(name: Any, mode: str = "r", **kwargs: Any) -> h5py.File:
        opened.append(CountingFile(name, "r"))
        return real(opened[-1], mode, **kwargs)

    monkeypatch.setattr(h5py, "File", counted)
    rows = np.random.default_rng(2).integers(0, ROWS, 400)
    with StoreReader(path, chunk_cache=chunk_cache) as reader:
        reader.take("wide", [0])
        CountingFile.read_bytes = 0
        for row in rows:
            reader.take("wide", [int(row)])
        count = CountingFile.read_bytes
    monkeypatch.undo()
    for file in opened:
        file.close()
    return count


def test_random_rows_read_each_chunk_from_disk_once(
    store: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """'wide' is 24 MiB in 1 MiB chunks: HDF5's own cache (1 or 8 MiB) reads most of the 400 rows'
    chunks again; the reader's cache holds the layer, so it reads at most the layer once."""
    path, _ = store
    with h5py.File(path, "r") as file:
        dataset = file["activations/wide"]
        stored = sum(dataset.id.get_chunk_info(k).size for k in range(dataset.id.get_num_chunks()))
    sized = bytes_read_by_random_rows(path, monkeypatch, CHUNK_CACHE_BYTES)
    default = bytes_read_by_random_rows(path, monkeypatch, 0)
    assert sized <= stored * 1.05, (sized, stored)
    assert default > 5 * stored, (default, stored)
