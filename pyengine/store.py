"""The HDF5 store: the only code in pyengine that opens .h5 files.

Layout (schema 1)::

    /meta                       attrs: format, schema_version, pyengine_version, model_class,
                                model_param_hash, dataset_name, dataset_size, created, config
    /inputs/index, /inputs/labels     (N,)
    /concepts/<name>            (N,) int codes; attr ``categories`` (JSON list)
    /activations/<module.path>  (N, ...) chunked ~1 MiB, lzf or gzip, float16 or float32
    /results/<technique>/<run>  datasets + attrs (``options`` as JSON)

Every dataset chunk carries a fletcher32 checksum (HDF5's built-in filter): a damaged chunk
fails its read, and every read error is a one-line StoreError naming the file and dataset.

Captures write ``X.h5.partial`` in SWMR mode, flushed after every batch, and rename it to
``X.h5`` when complete; a killed capture resumes from the last flushed batch. One capture
writes a store at a time (``pyengine._lock``); ``StoreReader(partial, running_ok=True)``
reads a running capture's rows so far.

Write errors (a full disk, EIO, a quota, a file removed underneath) are StoreErrors naming
the file and the cause. Nothing gets its final name unless every write and flush succeeded,
the file closed cleanly and it re-opens with the rows and layers it should hold; a file
whose write failed is removed, as it cannot be trusted (see ``_discard``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pyengine._h5clear import clear_consistency_flags
from pyengine._lock import running_pid, writer_name
from pyengine.errors import PyengineError, StoreError

FORMAT = "pyengine"
SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20
COMPRESSIONS = ("gzip", "lzf", "none")
LIBVER = ("v110", "v110")
"""HDF5 format bounds of the files written: the oldest that SWMR needs (v110), so HDF5 1.10, 1.12,
1.14 and 2.x all open them (``"latest"`` would use 2.0's formats that older libraries reject)."""
STORED_DTYPES = {"float16": np.float16, "float32": np.float32}
CHECKSUMS = True  # fletcher32 on every dataset written; False only to measure its cost


def _version() -> str:
    from pyengine import __version__

    return __version__


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# What h5py raises when HDF5 fails to read or write (RuntimeError: e.g. a failed flush).
H5_ERRORS = (OSError, RuntimeError)


def _cause(error: BaseException) -> str:
    """The reason in an OS or HDF5 error, e.g. 'No space left on device', not HDF5's stack."""
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    text = str(error)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    found = re.search(r"errno = (\d+)", text)
    if found and int(found.group(1)) > 0:
        return os.strerror(int(found.group(1)))
    return text.splitlines()[0] if text else type(error).__name__


def _discard(file: h5py.File) -> None:
    """Close a file that is being thrown away because a write to it failed.

    HDF5 retries the failed writes when the file closes; if that fails too, the library
    keeps a half-destroyed file handle and the process segfaults later (at the latest at
    exit). So the file's descriptor is first pointed at an anonymous in-memory file: the
    retried writes land there, the close succeeds and the handle is released. Errors are
    swallowed: the caller reports the first one and removes the file.
    """
    try:
        if not file.id.valid:
            return
        descriptor = file.id.get_vfd_handle()
    except H5_ERRORS:
        descriptor = None
    if isinstance(descriptor, int) and descriptor >= 0:
        try:
            sink = (
                os.memfd_create("pyengine-discard") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_RDWR)
            )
            try:
                os.dup2(sink, descriptor)
            finally:
                os.close(sink)
        except OSError:
            pass
    try:
        file.close()
    except H5_ERRORS:
        pass


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_failure(what: str, path: Path, error: BaseException) -> StoreError:
    return StoreError(
        f"{what}: writing {path} failed: {_cause(error)}; "
        f"removed {path.name}, which cannot be trusted after a failed write"
    )


@contextmanager
def _writing(path: Path, mode: str, what: str) -> Iterator[h5py.File]:
    """Open ``path`` to write; flushed and closed on success, discarded and removed on any error.

    HDF5 and OS errors become one StoreError naming ``what``, the file and the cause.
    """
    try:
        file = h5py.File(path, mode, libver=LIBVER)
    except H5_ERRORS as error:
        _remove(path)
        raise _write_failure(what, path, error) from None
    try:
        yield file
        file.flush()
    except BaseException as error:
        _discard(file)
        _remove(path)
        if isinstance(error, H5_ERRORS):
            raise _write_failure(what, path, error) from None
        raise
    try:
        file.close()  # after a flush that succeeded; if this fails, HDF5 may keep a broken handle
    except H5_ERRORS as error:
        _remove(path)
        raise _write_failure(what, path, error) from None


def _open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except OSError as error:
        reason = str(error).split("(")[-1].rstrip(")") if "(" in str(error) else str(error)
        raise StoreError(f"{path}: not a readable HDF5 file ({reason}); expected a pyengine store") from None


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn h5py's errors on a damaged file (bad checksum, bad metadata) into one-line StoreErrors."""
    try:
        yield
    except PyengineError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        reason = " ".join(str(text).split()) or type(error).__name__
        raise StoreError(f"{path}: cannot read {what} ({reason}); the file is damaged") from None


def _checksum(shape: tuple[int, ...] = (1,)) -> dict[str, bool]:
    """fletcher32 for a new dataset of ``shape`` (it is chunked: needs a dimension and an element)."""
    return {"fletcher32": True} if CHECKSUMS and len(shape) > 0 and 0 not in shape else {}


def _get(file: h5py.File, name: str) -> Any:
    """``file[name]``, None when there is no such link; unlike ``file.get``, a damaged object raises."""
    return file[name] if name in file else None


def _check_meta(file: h5py.File, path: Path) -> dict[str, Any]:
    with _reading(path, "/meta"):
        return _parse_meta(file, path)


def _parse_meta(file: h5py.File, path: Path) -> dict[str, Any]:
    meta = _get(file, "meta")
    if meta is None or meta.attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a pyengine store (no /meta with format='pyengine'); written by another tool?")
    version = int(meta.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written with store schema {version}, newer than this pyengine's {SCHEMA_VERSION}; "
            "upgrade pyengine"
        )
    if version < 1:
        raise StoreError(f"{path}: invalid schema_version {version}; expected 1..{SCHEMA_VERSION}")
    out = {key: (value.item() if hasattr(value, "item") else value) for key, value in meta.attrs.items()}
    out["config"] = json.loads(out.get("config", "{}"))
    return out


def _write_meta(file: h5py.File, meta: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    group = file.require_group("meta")
    group.attrs["format"] = FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["pyengine_version"] = _version()
    group.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in meta.items():
        group.attrs[key] = value
    group.attrs["config"] = json.dumps(config, sort_keys=True)


def chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk so that one chunk holds about 1 MiB."""
    row_bytes = max(1, math.prod(row_shape) * itemsize)
    return max(1, CHUNK_BYTES // row_bytes)


def _check_capture(path: Path, rows: int) -> str | None:
    """Why the closed capture at ``path`` is not complete, or None: re-open and check it.

    Checks the rows written (and the configured range when the config has one), that every
    configured layer and every array is there with that many rows, and reads the last rows
    of each array back (HDF5 reports chunks that never landed when it reads them).
    """
    try:
        with h5py.File(path, "r") as file:
            config = json.loads(file["meta"].attrs.get("config", "{}"))
            found = int(file["inputs/index"].shape[0])
            if found != rows:
                return f"holds {found} rows where {rows} were written"
            start, stop = config.get("start"), config.get("stop")
            if isinstance(start, int) and isinstance(stop, int) and stop - start != rows:
                return f"holds {rows} rows where the capture range has {stop - start}"
            layers = list(file["activations"])
            if "layers" in config and layers != list(config["layers"]):
                return f"holds layers {layers} where {config['layers']} were captured"
            for group in ("activations", "concepts", "inputs"):
                for name, dataset in file[group].items():
                    if dataset.shape[0] != rows:
                        return f"holds {dataset.shape[0]} rows of /{group}/{name} where {rows} were written"
                    step = dataset.chunks[0] if dataset.chunks else 1
                    _ = dataset[max(0, rows - step) : rows]
    except (*H5_ERRORS, KeyError, ValueError) as error:
        return f"does not re-open complete ({_cause(error)})"
    return None


class ActivationWriter:
    """Appends captured batches to ``X.h5.partial``; ``finish()`` renames it to ``X.h5``."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.rows_done = int(file["inputs/index"].shape[0])
        self._released = False  # closed, or given up after an error: never touch the handle again

    @staticmethod
    def finished_config(path: Path) -> dict[str, Any] | None:
        """The config of a complete store at ``path``, or None when there is none."""
        if not path.exists():
            return None
        with _open_h5(path, "r") as file:
            return _check_meta(file, path)["config"]

    @classmethod
    def resume(cls, path: Path, config: Mapping[str, Any]) -> ActivationWriter | None:
        """Reopen an interrupted capture of the same config; None when there is none."""
        partial = partial_path(path)
        if not partial.exists():
            return None
        with _reading(partial, "the superblock"):
            clear_consistency_flags(partial)
        file = _open_h5(partial, "r+", libver=LIBVER)
        try:
            found = _check_meta(file, partial)["config"]
            if found != json.loads(json.dumps(config, sort_keys=True)):
                raise StoreError(
                    f"{partial} holds an interrupted capture with a different configuration; "
                    "delete it or replace it (overwrite=True; on the CLI: --overwrite)"
                )
            writer = cls(path, file)
            for group in ("activations", "concepts", "inputs"):
                for dataset in file[group].values():
                    dataset.resize(writer.rows_done, axis=0)
            file.swmr_mode = True
            return writer
        except BaseException:
            file.close()
            raise

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        meta: Mapping[str, Any],
        config: Mapping[str, Any],
        layers: Mapping[str, tuple[int, ...]],
        dtype: str,
        compression: str,
        concepts: Mapping[str, tuple[str, ...]],
        unit_dims: Mapping[str, int] | None = None,
        token_length: int = 0,
    ) -> ActivationWriter:
        """Create ``X.h5.partial`` (atomically) with empty resizable datasets; ``unit_dims``: the
        dim of each layer's values that holds its units (``pyengine.units``), kept as an attribute;
        ``token_length`` > 0: token-id inputs, kept as /inputs/token_ids (int64) and /inputs/mask
        (uint8, 1 = a real token) of that many columns."""
        partial = partial_path(path)
        staging = path.with_name(path.name + ".partial.tmp")
        filters: dict[str, Any] = {}
        if compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        elif compression == "lzf":
            filters = {"compression": "lzf"}
        filters.update(_checksum())
        stored = STORED_DTYPES[dtype]
        with _writing(staging, "w", f"capture to {path}") as file:
            _write_meta(file, meta, config)
            file.create_group("activations", track_order=True)
            for name, row_shape in layers.items():
                rows = chunk_rows(row_shape, np.dtype(stored).itemsize)
                dataset = file.create_dataset(
                    f"activations/{name}",
                    shape=(0, *row_shape),
                    maxshape=(None, *row_shape),
                    chunks=(rows, *row_shape),
                    dtype=stored,
                    **filters,
                )
                if unit_dims and name in unit_dims:
                    dataset.attrs["unit_dim"] = int(unit_dims[name])
            for name in ("index", "labels"):
                file.create_dataset(
                    f"inputs/{name}", shape=(0,), maxshape=(None,), chunks=(65536,), dtype=np.int64, **_checksum()
                )
            for name, token_dtype in (("token_ids", np.int64), ("mask", np.uint8)) if token_length else ():
                file.create_dataset(
                    f"inputs/{name}",
                    shape=(0, token_length),
                    maxshape=(None, token_length),
                    chunks=(chunk_rows((token_length,), 8), token_length),
                    dtype=token_dtype,
                    **filters,
                )
            file.require_group("concepts")
            for name, categories in concepts.items():
                dataset = file.create_dataset(
                    f"concepts/{name}",
                    shape=(0,),
                    maxshape=(None,),
                    chunks=(65536,),
                    dtype=np.int64,
                    **_checksum(),
                )
                dataset.attrs["categories"] = json.dumps(list(categories))
        try:
            os.replace(staging, partial)
        except OSError as error:
            _remove(staging)
            raise _write_failure(f"capture to {path}", partial, error) from None
        file = _open_h5(partial, "r+", libver=LIBVER)
        try:
            file.swmr_mode = True
        except H5_ERRORS as error:
            _discard(file)
            _remove(partial)
            raise _write_failure(f"capture to {path}", partial, error) from None
        return cls(path, file)

    def append(
        self,
        index: torch.Tensor,
        labels: torch.Tensor,
        concepts: Mapping[str, torch.Tensor],
        activations: Mapping[str, torch.Tensor],
        tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Write one batch; /inputs/index grows last, so its length is the rows done. ``tokens``:
        (token ids, attention mask) of the rows, for stores created with ``token_length``.

        A write or flush error removes the partial file (see ``_fail``) and raises StoreError.
        """
        n = self.rows_done
        rows = int(index.shape[0])
        blocks = [(f"activations/{name}", values) for name, values in activations.items()]
        blocks += [(f"concepts/{name}", values) for name, values in concepts.items()]
        blocks += list(zip(("inputs/token_ids", "inputs/mask"), tokens)) if tokens is not None else []
        blocks += [("inputs/labels", labels), ("inputs/index", index)]
        try:  # the datasets stay open until the flush, which reports their write errors (see write_results)
            datasets = [self.file[name] for name, _ in blocks]
        except H5_ERRORS as error:
            raise self._fail(error) from None
        arrays: list[np.ndarray] = []
        for dataset, (_, values) in zip(datasets, blocks):
            stored = torch.from_numpy(np.empty(0, dtype=dataset.dtype)).dtype  # cast in torch: no numpy warnings
            arrays.append(values.detach().to("cpu", stored).numpy())
        try:
            for dataset, array in zip(datasets, arrays):
                dataset.resize(n + rows, axis=0)
                dataset[n : n + rows] = array
            self.file.flush()
        except H5_ERRORS as error:
            raise self._fail(error) from None
        self.rows_done = n + rows

    def _fail(self, error: BaseException) -> StoreError:
        """After a failed write: release the file and remove it.

        HDF5 updates its chunk index in place while new chunks go to the end of the file, so a
        failed write can leave rows written before it pointing at data that never landed: the
        partial file cannot be trusted, and resuming from it could store wrong values.
        """
        self._released = True
        _discard(self.file)
        partial = partial_path(self.path)
        _remove(partial)
        return _write_failure(f"capture to {self.path} stopped after {self.rows_done} rows", partial, error)

    def finish(self) -> Path:
        """Flush, close, check the file re-opens complete, then rename it to its final name."""
        partial = partial_path(self.path)
        try:
            self.file.flush()
        except H5_ERRORS as error:
            raise self._fail(error) from None
        self._released = True
        try:
            self.file.close()
        except H5_ERRORS as error:
            _remove(partial)
            raise _write_failure(f"capture to {self.path}", partial, error) from None
        problem = _check_capture(partial, self.rows_done)
        if problem:
            _remove(partial)
            raise StoreError(
                f"capture to {self.path}: {partial} {problem}; removed it, as it cannot be trusted; capture again"
            )
        try:
            os.replace(partial, self.path)
        except OSError as error:
            raise StoreError(
                f"capture to {self.path}: renaming {partial.name} to {self.path.name} failed: {_cause(error)}; "
                f"the complete capture stays in {partial}: run the same capture again to finish it"
            ) from None
        return self.path

    def close(self) -> None:
        """Stop without finishing: the partial file stays, ready to resume."""
        if not self._released and self.file.id.valid:
            self._released = True
            self.file.close()


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
            self.file = _open_h5(self.path, "r", libver=LIBVER, swmr=True)
        else:
            self.file = _open_h5(self.path, "r")
        try:
            self.meta = _check_meta(self.file, self.path)
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
        with _reading(self.path, "/inputs/index"):
            return int(self.file["inputs/index"].shape[0]) if "inputs/index" in self.file else 0

    @property
    def layers(self) -> list[str]:
        with _reading(self.path, "/activations"):
            group = _get(self.file, "activations")
            return list(group.keys()) if group is not None else []

    def unit_dims(self) -> dict[str, int]:
        """Layer -> the dim of its values that holds the units, for layers whose capture recorded it."""
        with _reading(self.path, "/activations"):
            group = _get(self.file, "activations")
            items = group.items() if group is not None else ()
            return {name: int(ds.attrs["unit_dim"]) for name, ds in items if "unit_dim" in ds.attrs}

    def _layer(self, layer: str) -> h5py.Dataset:
        if layer not in self.layers:
            raise StoreError(
                f"{self.path}: no activations for layer {layer!r}; stored layers: {', '.join(self.layers) or 'none'}"
            )
        with _reading(self.path, f"/activations/{layer}"):
            return self.file[f"activations/{layer}"]

    def shape(self, layer: str) -> tuple[int, ...]:
        dataset = self._layer(layer)
        with _reading(self.path, f"/activations/{layer}"):
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
        with _reading(self.path, f"/activations/{layer}"):
            stop = dataset.shape[0] if stop is None else min(stop, dataset.shape[0])
            step = rows or (dataset.chunks[0] if dataset.chunks else 1024)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            with _reading(self.path, f"/activations/{layer} rows {first}-{last - 1}"):
                block = dataset[first:last]
            yield torch.from_numpy(block).to(device=device, dtype=dtype)

    def _vector(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        with _reading(self.path, f"/{name}"):
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
        with _reading(self.path, "/inputs/token_ids"):
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
        with _reading(self.path, "/concepts"):
            group = _get(self.file, "concepts")
            return {name: json.loads(ds.attrs.get("categories", "[]")) for name, ds in (group or {}).items()}

    def results(self) -> list[tuple[str, str]]:
        with _reading(self.path, "/results"):
            group = _get(self.file, "results")
            if group is None:
                return []
            return [(technique, run) for technique in group for run in group[technique] if not run.endswith(".partial")]

    def result(self, technique: str, run: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Arrays and attributes of one stored result."""
        key = f"results/{technique}/{run}"
        with _reading(self.path, f"/{key}"):
            if key not in self.file:
                raise StoreError(f"{self.path}: no result {technique}/{run}")
            names: list[str] = []
            self.file[key].visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in self.file[key].attrs.items()}
        arrays: dict[str, torch.Tensor] = {}
        for name in names:
            with _reading(self.path, f"/{key}/{name}"):
                arrays[name] = torch.from_numpy(np.asarray(self.file[f"{key}/{name}"][()]))
        return arrays, attrs

    def describe(self) -> dict[str, Any]:
        """What ``pyengine info`` prints."""
        layers = {}
        for name in self.layers:
            dataset = self._layer(name)
            with _reading(self.path, f"/activations/{name}"):
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


@dataclass(frozen=True)
class PendingResult:
    """One result to store at ``/results/<technique>/<run>``."""

    technique: str
    run: str
    arrays: Mapping[str, torch.Tensor]
    attrs: Mapping[str, Any]


def write_results(path: str | os.PathLike[str], results: Sequence[PendingResult], *, meta: Mapping[str, Any]) -> None:
    """Add results to a results file atomically: copy to ``.partial``, write, rename.

    Either every result lands or none does; an existing file must be a pyengine store. A
    write error leaves ``path`` as it was, removes the copy and raises one StoreError.
    """
    target = Path(path)
    staging = partial_path(target)
    what = f"results not written to {target} (it is unchanged)"
    if target.exists():
        with _open_h5(target, "r") as file:
            _check_meta(file, target)
        try:
            shutil.copyfile(target, staging)
        except OSError as error:
            _remove(staging)
            raise _write_failure(what, staging, error) from None
    try:
        # Datasets stay open until the flush: a dataset closed earlier writes its cached data
        # while h5py drops it, where a write error is only printed ("Exception ignored").
        kept: list[h5py.Dataset] = []
        with _writing(staging, "a", what) as file:
            if "meta" not in file:
                _write_meta(file, meta, {})
            for pending in results:
                group_name = f"results/{pending.technique}/{pending.run}"
                if group_name in file:
                    raise StoreError(
                        f"{target}: result {pending.technique}/{pending.run} exists; choose another run name"
                    )
                group = file.create_group(group_name)
                for name, value in pending.arrays.items():
                    data = value.detach().cpu()
                    array = (data.float() if data.dtype == torch.bfloat16 else data).numpy()
                    kept.append(group.create_dataset(name, data=array, **_checksum(array.shape)))
                for name, value in pending.attrs.items():
                    group.attrs[name] = value
        problem = _check_results(staging, [(pending.technique, pending.run) for pending in results])
        if problem:
            raise StoreError(f"{what}: {staging} {problem}; removed it, as it cannot be trusted")
        try:
            os.replace(staging, target)
        except OSError as error:
            raise _write_failure(what, staging, error) from None
    except BaseException:
        _remove(staging)
        raise


def _check_results(path: Path, names: Sequence[tuple[str, str]]) -> str | None:
    """Why the closed results file at ``path`` lacks a result, or None: re-open and check it."""
    try:
        with h5py.File(path, "r") as file:
            _check_meta(file, path)
            for technique, run in names:
                if f"results/{technique}/{run}" not in file:
                    return f"lacks result {technique}/{run}"
    except (*H5_ERRORS, KeyError, ValueError, StoreError) as error:
        return f"does not re-open complete ({_cause(error)})"
    return None


def reserve_run_name(path: str | os.PathLike[str], technique: str, run: str = "", taken: Set[str] = frozenset()) -> str:
    """Check a results target before any work: ``run`` if free, else the next ``run-NNN``.

    Raises StoreError if ``path`` is not a pyengine store or ``run`` is already used there
    or in ``taken`` (names about to be written with it).
    """
    existing = set(taken)
    target = Path(path)
    if target.exists():
        with StoreReader(target) as reader:
            existing |= {name for t, name in reader.results() if t == technique}
    if run:
        if run in existing:
            raise StoreError(f"{target}: result {technique}/{run} exists; choose another run name")
        return run
    k = 1
    while f"run-{k:03d}" in existing:
        k += 1
    return f"run-{k:03d}"
