"""Results files: ``/results/<technique>/<run>`` added atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import torch

from pyengine.errors import StoreError
from pyengine.store._h5 import (
    H5_ERRORS,
    cause,
    check_meta,
    checksum_filter,
    open_h5,
    partial_path,
    remove_quietly,
    write_failure,
    write_meta,
    writing,
)
from pyengine.store.reader import StoreReader


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
        with open_h5(target, "r") as file:
            check_meta(file, target)
        try:
            shutil.copyfile(target, staging)
        except OSError as error:
            remove_quietly(staging)
            raise write_failure(what, staging, error) from None
    try:
        # Datasets stay open until the flush: a dataset closed earlier writes its cached data
        # while h5py drops it, where a write error is only printed ("Exception ignored").
        kept: list[h5py.Dataset] = []
        with writing(staging, "a", what) as file:
            if "meta" not in file:
                write_meta(file, meta, {})
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
                    kept.append(group.create_dataset(name, data=array, **checksum_filter(array.shape)))
                for name, value in pending.attrs.items():
                    group.attrs[name] = value
        problem = _check_results(staging, [(pending.technique, pending.run) for pending in results])
        if problem:
            raise StoreError(f"{what}: {staging} {problem}; removed it, as it cannot be trusted")
        try:
            os.replace(staging, target)
        except OSError as error:
            raise write_failure(what, staging, error) from None
    except BaseException:
        remove_quietly(staging)
        raise


def _check_results(path: Path, names: Sequence[tuple[str, str]]) -> str | None:
    """Why the closed results file at ``path`` lacks a result, or None: re-open and check it."""
    try:
        with h5py.File(path, "r") as file:
            check_meta(file, path)
            for technique, run in names:
                if f"results/{technique}/{run}" not in file:
                    return f"lacks result {technique}/{run}"
    except (*H5_ERRORS, KeyError, ValueError, StoreError) as error:
        return f"does not re-open complete ({cause(error)})"
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
