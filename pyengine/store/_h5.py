"""What every part of the store shares: format constants, opening, meta, write failures."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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


def pyengine_version() -> str:
    from pyengine import __version__

    return __version__


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# What h5py raises when HDF5 fails to read or write (RuntimeError: e.g. a failed flush).
H5_ERRORS = (OSError, RuntimeError)


def cause(error: BaseException) -> str:
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


def discard(file: h5py.File) -> None:
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


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_failure(what: str, path: Path, error: BaseException) -> StoreError:
    return StoreError(
        f"{what}: writing {path} failed: {cause(error)}; "
        f"removed {path.name}, which cannot be trusted after a failed write"
    )


@contextmanager
def writing(path: Path, mode: str, what: str) -> Iterator[h5py.File]:
    """Open ``path`` to write; flushed and closed on success, discarded and removed on any error.

    HDF5 and OS errors become one StoreError naming ``what``, the file and the cause.
    """
    try:
        file = h5py.File(path, mode, libver=LIBVER)
    except H5_ERRORS as error:
        remove_quietly(path)
        raise write_failure(what, path, error) from None
    try:
        yield file
        file.flush()
    except BaseException as error:
        discard(file)
        remove_quietly(path)
        if isinstance(error, H5_ERRORS):
            raise write_failure(what, path, error) from None
        raise
    try:
        file.close()  # after a flush that succeeded; if this fails, HDF5 may keep a broken handle
    except H5_ERRORS as error:
        remove_quietly(path)
        raise write_failure(what, path, error) from None


def open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except OSError as error:
        reason = str(error).split("(")[-1].rstrip(")") if "(" in str(error) else str(error)
        raise StoreError(f"{path}: not a readable HDF5 file ({reason}); expected a pyengine store") from None


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn h5py's errors on a damaged file (bad checksum, bad metadata) into one-line StoreErrors."""
    try:
        yield
    except PyengineError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        reason = " ".join(str(text).split()) or type(error).__name__
        raise StoreError(f"{path}: cannot read {what} ({reason}); the file is damaged") from None


def checksum_filter(shape: tuple[int, ...] = (1,)) -> dict[str, bool]:
    """fletcher32 for a new dataset of ``shape`` (it is chunked: needs a dimension and an element)."""
    return {"fletcher32": True} if CHECKSUMS and len(shape) > 0 and 0 not in shape else {}


def get_link(file: h5py.File, name: str) -> Any:
    """``file[name]``, None when there is no such link; unlike ``file.get``, a damaged object raises."""
    return file[name] if name in file else None


def check_meta(file: h5py.File, path: Path) -> dict[str, Any]:
    with reading(path, "/meta"):
        return parse_meta(file, path)


def parse_meta(file: h5py.File, path: Path) -> dict[str, Any]:
    meta = get_link(file, "meta")
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


def write_meta(file: h5py.File, meta: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    group = file.require_group("meta")
    group.attrs["format"] = FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["pyengine_version"] = pyengine_version()
    group.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in meta.items():
        group.attrs[key] = value
    group.attrs["config"] = json.dumps(config, sort_keys=True)


def chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk so that one chunk holds about 1 MiB."""
    row_bytes = max(1, math.prod(row_shape) * itemsize)
    return max(1, CHUNK_BYTES // row_bytes)
