"""Reading a store: ``StoreReader`` streams layers in chunks."""

from __future__ import annotations

import json
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


class StoreReader:
    """Read access to a store; layers are streamed in chunks, never loaded whole.

    A ``X.h5.partial`` is refused unless ``running_ok=True`` and a live capture is writing it:
    then it opens read-only (SWMR) with the rows written so far; ``writer_pid`` names the writer.
    Errors from a damaged file are one-line StoreErrors naming the file and the dataset.
    """

    def __init__(self, path: str | os.PathLike[str], *, running_ok: bool = False) -> None:
        self.path = Path(path)
        self.writer_pid: int | None = None
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
            items = group.items() if group is not None else ()
            return {name: int(ds.attrs["unit_dim"]) for name, ds in items if "unit_dim" in ds.attrs}

    def _layer(self, layer: str) -> h5py.Dataset:
        if layer not in self.layers:
            raise StoreError(
                f"{self.path}: no activations for layer {layer!r}; stored layers: {', '.join(self.layers) or 'none'}"
            )
        with reading(self.path, f"/activations/{layer}"):
            return self.file[f"activations/{layer}"]

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
            return {name: json.loads(ds.attrs.get("categories", "[]")) for name, ds in (group or {}).items()}

    def results(self) -> list[tuple[str, str]]:
        with reading(self.path, "/results"):
            group = get_link(self.file, "results")
            if group is None:
                return []
            return [(technique, run) for technique in group for run in group[technique] if not run.endswith(".partial")]

    def result(self, technique: str, run: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Arrays and attributes of one stored result."""
        key = f"results/{technique}/{run}"
        with reading(self.path, f"/{key}"):
            if key not in self.file:
                raise StoreError(f"{self.path}: no result {technique}/{run}")
            names: list[str] = []
            self.file[key].visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in self.file[key].attrs.items()}
        arrays: dict[str, torch.Tensor] = {}
        for name in names:
            with reading(self.path, f"/{key}/{name}"):
                arrays[name] = torch.from_numpy(np.asarray(self.file[f"{key}/{name}"][()]))
        return arrays, attrs

    def describe(self) -> dict[str, Any]:
        """What ``pyengine info`` prints."""
        layers = {}
        for name in self.layers:
            dataset = self._layer(name)
            with reading(self.path, f"/activations/{name}"):
                layers[name] = {
                    "shape": list(dataset.shape),
                    "dtype": str(dataset.dtype),
                    "chunks": list(dataset.chunks or ()),
                    "compression": dataset.compression,
                    "checksums": bool(dataset.fletcher32),
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
