"""Sharded captures: one part file per process, joined by a capture file of virtual datasets.

A capture run by N processes writes ``X.h5.parts/part-RRRRR-of-NNNNN.h5`` (each a complete
capture of that process's contiguous rows, written and resumed like any capture), then rank 0
writes ``X.h5``: the capture's ``/meta`` and, for every dataset of the parts, one HDF5 virtual
dataset (VDS) that concatenates the parts' rows in rank order. The parts are named by paths
relative to ``X.h5``'s folder, so the folder can be moved as a whole. Readers see ordinary
datasets; a missing or incomplete part is an error when the file is opened, never zeros.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py

from pyengine.errors import StoreError
from pyengine.store._h5 import (
    H5_ERRORS,
    cause,
    open_h5,
    partial_path,
    remove_quietly,
    write_failure,
    write_meta,
    writing,
)

GROUPS = ("activations", "inputs", "concepts")


def parts_folder(path: Path) -> Path:
    """``X.h5.parts`` beside ``X.h5``."""
    return path.with_name(path.name + ".parts")


def part_path(path: Path, rank: int, world: int) -> Path:
    """The part file rank ``rank`` of ``world`` writes."""
    return parts_folder(path) / f"part-{rank:05d}-of-{world:05d}.h5"


def remove_other_parts(path: Path, world: int) -> list[Path]:
    """Remove part files (finished or not) of a run with another number of processes: they
    cannot be resumed by this one. Returns what was removed."""
    folder = parts_folder(path)
    removed = []
    for found in sorted(folder.glob("part-*-of-*.h5*")) if folder.is_dir() else []:
        if not found.name.split(".h5")[0].endswith(f"-of-{world:05d}"):
            remove_quietly(found)
            removed.append(found)
    return removed


def remove_parts(path: Path) -> None:
    """Remove ``X.h5.parts`` and everything in it."""
    folder = parts_folder(path)
    for found in folder.glob("*") if folder.is_dir() else []:
        remove_quietly(found)
    try:
        folder.rmdir()
    except OSError:
        pass


def _datasets(file: h5py.File) -> Iterator[tuple[str, h5py.Dataset]]:
    for group in GROUPS:
        if group in file:
            for name, dataset in file[group].items():
                if isinstance(dataset, h5py.Dataset):  # a damaged object: reported where it is read
                    yield f"{group}/{name}", dataset


def join_parts(path: Path, parts: Sequence[Path], *, meta: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``path`` as the virtual concatenation of the complete captures ``parts`` (in row
    order): written to ``X.h5.partial``, checked by reading every part's last rows through it,
    then renamed. Returns ``path``."""
    if not parts:
        raise StoreError(f"capture to {path}: no part files to join")
    shapes: dict[str, tuple[tuple[int, ...], Any, dict[str, Any]]] = {}
    rows: list[int] = []
    for number, part in enumerate(parts):
        with open_h5(part, "r") as file:
            rows.append(int(file["inputs/index"].shape[0]))
            found = {name: (d.shape[1:], d.dtype, dict(d.attrs)) for name, d in _datasets(file)}
        if number == 0:
            shapes = found
        elif {k: v[:2] for k, v in found.items()} != {k: v[:2] for k, v in shapes.items()}:
            raise StoreError(f"capture to {path}: {part.name} holds other datasets or shapes than {parts[0].name}")
    staging = partial_path(path)
    what = f"capture to {path}"
    with writing(staging, "w", what) as file:
        write_meta(file, meta, config)
        file.create_group("activations", track_order=True)
        for group in GROUPS[1:]:
            file.require_group(group)
        for name, (row_shape, dtype, attrs) in shapes.items():
            layout = h5py.VirtualLayout(shape=(sum(rows), *row_shape), dtype=dtype)
            first = 0
            for part, count in zip(parts, rows):
                relative = os.path.relpath(part, path.parent)
                layout[first : first + count] = h5py.VirtualSource(relative, name, shape=(count, *row_shape))
                first += count
            dataset = file.create_virtual_dataset(name, layout)
            for key, value in attrs.items():
                dataset.attrs[key] = value
    problem = _check_joined(staging, path.parent, sum(rows), list(shapes))
    if problem:
        remove_quietly(staging)
        raise StoreError(f"{what}: {staging} {problem}; removed it; run the capture again")
    try:
        os.replace(staging, path)
    except OSError as error:
        remove_quietly(staging)
        raise write_failure(what, staging, error) from None
    return path


def _check_joined(path: Path, folder: Path, rows: int, names: Sequence[str]) -> str | None:
    """Why the joined file does not read back complete, or None."""
    try:
        with h5py.File(path, "r") as file:
            problem = missing_sources(file, folder)
            if problem:
                return problem
            for name in names:
                dataset = file[name]
                if dataset.shape[0] != rows:
                    return f"holds {dataset.shape[0]} rows of /{name} where {rows} were captured"
                _ = dataset[max(0, rows - 1) : rows]
    except (*H5_ERRORS, KeyError, ValueError) as error:
        return f"does not re-open complete ({cause(error)})"
    return None


def missing_sources(file: h5py.File, folder: Path) -> str | None:
    """What is wrong with the part files behind ``file``'s virtual datasets (a part missing,
    or with fewer rows than the capture file maps), or None. HDF5 would read zeros instead."""
    checked: dict[str, int] = {}
    for name, dataset in _datasets(file):
        if not dataset.is_virtual:
            continue
        for source in dataset.virtual_sources():
            part = folder / source.file_name
            low, high = source.vspace.get_select_bounds()  # the rows it maps: all of the part's, from 0
            needed = high[0] - low[0] + 1
            if part.name not in checked:
                if not part.is_file():
                    return f"lacks its part file {source.file_name} (a sharded capture's parts stay beside it)"
                try:
                    with h5py.File(part, "r") as source_file:
                        checked[part.name] = int(source_file["inputs/index"].shape[0])
                except (*H5_ERRORS, KeyError) as error:
                    return f"cannot read its part file {source.file_name} ({cause(error)})"
            if checked[part.name] < needed:
                return f"maps {needed} rows of {source.file_name} for /{name}, which holds {checked[part.name]}"
    return None
