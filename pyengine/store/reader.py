"""Reading a store: ``StoreReader`` streams layers in chunks and reads rows at random."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pyengine._lock import running_pid, writer_name
from pyengine.errors import StoreError
from pyengine.store._h5 import LIBVER, check_meta, get_link, open_h5, reading
from pyengine.store.shards import missing_sources

CHUNK_CACHE_BYTES = 128 << 20
"""Chunk cache a reader shares among a store's layers (each gets at least ``MIN_CACHED_CHUNKS``
chunks); HDF5's own default is 1 MiB per dataset (8 MiB from HDF5 2.0), which random-row reads
thrash: every row read decompresses its whole chunk again."""
MIN_CACHED_CHUNKS = 4


class StoreReader:
    """Read access to a store; layers are streamed in chunks, never loaded whole.

    A ``X.h5.partial`` is refused unless ``running_ok=True`` and a live capture is writing it:
    then it opens read-only (SWMR) with the rows written so far; ``writer_pid`` names the writer.
    Errors from a damaged file are one-line StoreErrors naming the file and the dataset.

    Each layer is read through a raw-data chunk cache of ``chunk_cache`` bytes split among the
    stored layers (at least ``MIN_CACHED_CHUNKS`` of its chunks); 0 keeps HDF5's default. The
    cache holds decompressed chunks for as long as the reader is open, so rows read at random
    (``take``) decompress each chunk once, not once per read.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, running_ok: bool = False, chunk_cache: int = CHUNK_CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        self.writer_pid: int | None = None
        self.chunk_cache = int(chunk_cache)
        self._datasets: dict[str, h5py.Dataset] = {}
        if self.path.name.endswith(".partial"):
            self.writer_pid = _running_writer(self.path, running_ok)
            self.file = open_h5(self.path, "r", libver=LIBVER, swmr=True)
        else:
            self.file = open_h5(self.path, "r")
        try:
            self.meta = check_meta(self.file, self.path)
            with reading(self.path, "the part files of a sharded capture"):
                problem = missing_sources(self.file, self.path.parent)
            if problem:
                raise StoreError(f"{self.path} {problem}")
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._datasets.clear()
        if self.file.id.valid:
            self.file.close()

    def __len__(self) -> int:
        with reading(self.path, "/inputs/index"):
            return int(self.file["inputs/index"].shape[0]) if "inputs/index" in self.file else 0

    @property
    def layers(self) -> list[str]:
        with reading(self.path, "/activations"):
            group = get_link(self.file, "activations")
            return list(group.keys()) if group is not None else []

    def unit_dims(self) -> dict[str, int]:
        """Layer -> the dim of its values that holds the units, for layers whose capture recorded it."""
        with reading(self.path, "/activations"):
            group = get_link(self.file, "activations")
            datasets = [(name, group[name]) for name in group] if group is not None else []
            return {name: int(ds.attrs["unit_dim"]) for name, ds in datasets if "unit_dim" in ds.attrs}

    def _layer(self, layer: str) -> h5py.Dataset:
        """The layer's dataset, opened once with its share of the chunk cache (see the class doc)."""
        dataset = self._datasets.get(layer)
        if dataset is None:
            layers = self.layers
            if layer not in layers:
                raise StoreError(
                    f"{self.path}: no activations for layer {layer!r}; stored layers: {', '.join(layers) or 'none'}"
                )
            with reading(self.path, f"/activations/{layer}"):
                dataset = _open_cached(self.file, f"activations/{layer}", self.chunk_cache // max(1, len(layers)))
            self._datasets[layer] = dataset
        elif self.writer_pid is not None:
            with reading(self.path, f"/activations/{layer}"):
                dataset.refresh()  # SWMR: see the rows the running capture wrote since
        return dataset

    def shape(self, layer: str) -> tuple[int, ...]:
        dataset = self._layer(layer)
        with reading(self.path, f"/activations/{layer}"):
            return tuple(dataset.shape)

    def iter_layer(
        self,
        layer: str,
        *,
        rows: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield ``layer`` in consecutive row blocks (default: the HDF5 chunk rows)."""
        dataset = self._layer(layer)
        with reading(self.path, f"/activations/{layer}"):
            stop = dataset.shape[0] if stop is None else min(stop, dataset.shape[0])
            step = rows or (dataset.chunks[0] if dataset.chunks else 1024)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            with reading(self.path, f"/activations/{layer} rows {first}-{last - 1}"):
                block = dataset[first:last]
            yield torch.from_numpy(block).to(device=device, dtype=dtype)

    def take(
        self,
        layer: str,
        rows: torch.Tensor | np.ndarray | list[int],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rows ``rows`` of ``layer`` (stored row numbers, any order, repeats allowed), in that order.

        Each chunk the rows fall in is read once per call, in increasing order, as one span of
        rows; through the chunk cache, a chunk read by an earlier call is not decompressed again.
        """
        dataset = self._layer(layer)
        wanted = np.asarray(torch.as_tensor(rows).reshape(-1).long().cpu())
        with reading(self.path, f"/activations/{layer}"):
            total = int(dataset.shape[0])
            step = int(dataset.chunks[0]) if dataset.chunks else 0
            out = np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
        outside = wanted[(wanted < 0) | (wanted >= total)]
        if outside.size:
            raise StoreError(
                f"{self.path}: row {int(outside[0])} of layer {layer!r} does not exist; expected rows 0..{total - 1}"
            )
        unique, order = np.unique(wanted, return_inverse=True)
        out = np.empty((len(unique), *out.shape[1:]), dtype=out.dtype)
        if not step:  # contiguous storage: HDF5 reads exactly the rows (increasing, as it needs)
            with reading(self.path, f"/activations/{layer} {len(unique)} rows"):
                out[:] = dataset[unique] if len(unique) else out
        else:
            for group in np.split(np.arange(len(unique)), np.flatnonzero(np.diff(unique // step)) + 1):
                if not len(group):
                    continue
                first, last = int(unique[group[0]]), int(unique[group[-1]])
                with reading(self.path, f"/activations/{layer} rows {first}-{last}"):
                    out[group] = dataset[first : last + 1][unique[group] - first]
        return torch.from_numpy(out[order]).to(device=device, dtype=dtype)

    def _vector(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        with reading(self.path, f"/{name}"):
            if name not in self.file or not isinstance(self.file[name], h5py.Dataset) or self.file[name].ndim != 1:
                raise StoreError(f"{self.path}: no 1-D array {name!r}")
            return torch.from_numpy(self.file[name][start:stop])

    def index(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(N,) the dataset row of each stored row."""
        return self._vector("inputs/index", start, stop)

    def labels(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(N,) class labels of the stored rows (-1: unknown)."""
        return self._vector("inputs/labels", start, stop)

    def tokens(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids (N, T), attention mask (N, T)) of the stored rows, for token-id inputs; else None."""
        with reading(self.path, "/inputs/token_ids"):
            if "inputs/token_ids" not in self.file or "inputs/mask" not in self.file:
                return None
            ids, mask = self.file["inputs/token_ids"][start:stop], self.file["inputs/mask"][start:stop]
        return torch.from_numpy(ids), torch.from_numpy(mask).long()

    def concept(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(N,) codes of one concept for the stored rows (categories: ``concepts[name]``)."""
        if name not in self.concepts:
            raise StoreError(f"{self.path}: no concept {name!r}; stored: {', '.join(self.concepts) or 'none'}")
        return self._vector(f"concepts/{name}", start, stop)

    @property
    def concepts(self) -> dict[str, list[str]]:
        """Concept name -> category names (empty for 0/1 or numeric concepts)."""
        with reading(self.path, "/concepts"):
            group = get_link(self.file, "concepts")
            names = list(group) if group is not None else []  # group[name]: a damaged one raises (.items() gives None)
            return {name: json.loads(group[name].attrs.get("categories", "[]")) for name in names}

    def results(self) -> list[tuple[str, str]]:
        with reading(self.path, "/results"):
            group = self._linked("results", "/results")
            if group is None:
                return []
            return [(technique, run) for technique in group for run in group[technique] if not run.endswith(".partial")]

    def result(self, technique: str, run: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Arrays and attributes of one stored result."""
        key = f"results/{technique}/{run}"
        with reading(self.path, f"/{key}"):
            if self._linked("results", "/results") is None or key not in self.file:
                raise StoreError(f"{self.path}: no result {technique}/{run}")
            group = self._linked(key, f"/{key}")
            names: list[str] = []
            group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in group.attrs.items()}
        arrays: dict[str, torch.Tensor] = {}
        for name in names:
            with reading(self.path, f"/{key}/{name}"):
                arrays[name] = torch.from_numpy(np.asarray(group[name][()]))
        return arrays, attrs

    def _linked(self, name: str, what: str) -> Any:
        """``file[name]`` (None when absent), following external links (results live in their own
        files, see ``pyengine.store.results``); a link whose file is missing is a StoreError."""
        if name not in self.file:
            return None
        found = self.file.get(name)
        if found is None:
            link = self.file.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise StoreError(
                    f"{self.path}: cannot read {what}: the file it links to, {link.filename}, is missing or "
                    "unreadable (the path is relative to the linking file); a results file's folder "
                    f"{self.path.name}.d must stay next to it"
                )
            return self.file[name]  # raises the reason (in ``reading``)
        return found

    def describe(self) -> dict[str, Any]:
        """What ``pyengine info`` prints."""
        layers = {}
        for name in self.layers:
            dataset = self._layer(name)
            with reading(self.path, f"/activations/{name}"):
                parts = sorted({s.file_name for s in dataset.virtual_sources()}) if dataset.is_virtual else []
                layers[name] = {
                    "shape": list(dataset.shape),
                    "dtype": str(dataset.dtype),
                    "chunks": list(dataset.chunks or ()),
                    "compression": dataset.compression,
                    "checksums": bool(dataset.fletcher32),
                    "parts": parts,  # a sharded capture: the part files behind the virtual dataset
                }
        meta = {k: v for k, v in self.meta.items()}
        return {
            "path": str(self.path),
            "running_pid": self.writer_pid,
            "rows": len(self),
            "meta": meta,
            "layers": layers,
            "concepts": self.concepts,
            "results": [f"{t}/{r}" for t, r in self.results()],
        }


def _open_cached(file: h5py.File, name: str, share: int) -> h5py.Dataset:
    """``file[name]`` with a chunk cache of ``share`` bytes, and at least ``MIN_CACHED_CHUNKS``
    chunks; ``share`` 0: HDF5's default cache.

    w0 = 1: chunks read whole (streaming) are evicted first, rows read at random stay. HDF5
    keeps the cache of a dataset's first open while any handle to it is open, so the handle
    that looked up the chunk shape is dropped before the dataset is opened with its cache.
    """
    dataset = file[name]
    if share <= 0 or dataset.chunks is None:
        return dataset
    chunk_bytes = max(1, math.prod(dataset.chunks) * dataset.dtype.itemsize)
    nbytes = max(share, MIN_CACHED_CHUNKS * chunk_bytes)
    slots = _prime_at_least(max(521, 16 * (nbytes // chunk_bytes)))  # HDF5: far more slots than chunks held
    del dataset
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(slots, nbytes, 1.0)
    return h5py.Dataset(h5py.h5d.open(file.id, name.encode(), dapl=access))


def _prime_at_least(n: int) -> int:
    while any(n % k == 0 for k in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _running_writer(partial: Path, running_ok: bool) -> int:
    """The pid of the live capture writing ``partial``; a StoreError when none is or it is not wanted."""
    pid = running_pid(partial.with_name(partial.name.removesuffix(".partial")))
    if pid is None:
        raise StoreError(f"{partial} is an unfinished capture; run the same capture again to resume it")
    if not running_ok:
        raise StoreError(
            f"{partial} is being written by a running capture ({writer_name(pid)}); "
            "read it when it is done, or open it with running_ok=True for the rows written so far"
        )
    return pid
