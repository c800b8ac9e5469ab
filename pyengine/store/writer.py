"""Writing a capture: ``X.h5.partial`` in SWMR mode, renamed to ``X.h5`` when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pyengine._h5clear import clear_consistency_flags
from pyengine.errors import StoreError
from pyengine.store._h5 import (
    H5_ERRORS,
    LIBVER,
    STORED_DTYPES,
    cause,
    check_meta,
    checksum_filter,
    chunk_rows,
    discard,
    open_h5,
    partial_path,
    reading,
    remove_quietly,
    write_failure,
    write_meta,
    writing,
)


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
        return f"does not re-open complete ({cause(error)})"
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
        with open_h5(path, "r") as file:
            return check_meta(file, path)["config"]

    @classmethod
    def resume(cls, path: Path, config: Mapping[str, Any]) -> ActivationWriter | None:
        """Reopen an interrupted capture of the same config; None when there is none."""
        partial = partial_path(path)
        if not partial.exists():
            return None
        with reading(partial, "the superblock"):
            clear_consistency_flags(partial)
        file = open_h5(partial, "r+", libver=LIBVER)
        try:
            found = check_meta(file, partial)["config"]
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
        filters.update(checksum_filter())
        stored = STORED_DTYPES[dtype]
        with writing(staging, "w", f"capture to {path}") as file:
            write_meta(file, meta, config)
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
                    f"inputs/{name}", shape=(0,), maxshape=(None,), chunks=(65536,), dtype=np.int64, **checksum_filter()
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
                    **checksum_filter(),
                )
                dataset.attrs["categories"] = json.dumps(list(categories))
        try:
            os.replace(staging, partial)
        except OSError as error:
            remove_quietly(staging)
            raise write_failure(f"capture to {path}", partial, error) from None
        file = open_h5(partial, "r+", libver=LIBVER)
        try:
            file.swmr_mode = True
        except H5_ERRORS as error:
            discard(file)
            remove_quietly(partial)
            raise write_failure(f"capture to {path}", partial, error) from None
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
        discard(self.file)
        partial = partial_path(self.path)
        remove_quietly(partial)
        return write_failure(f"capture to {self.path} stopped after {self.rows_done} rows", partial, error)

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
            remove_quietly(partial)
            raise write_failure(f"capture to {self.path}", partial, error) from None
        problem = _check_capture(partial, self.rows_done)
        if problem:
            remove_quietly(partial)
            raise StoreError(
                f"capture to {self.path}: {partial} {problem}; removed it, as it cannot be trusted; capture again"
            )
        try:
            os.replace(partial, self.path)
        except OSError as error:
            raise StoreError(
                f"capture to {self.path}: renaming {partial.name} to {self.path.name} failed: {cause(error)}; "
                f"the complete capture stays in {partial}: run the same capture again to finish it"
            ) from None
        return self.path

    def close(self) -> None:
        """Stop without finishing: the partial file stays, ready to resume."""
        if not self._released and self.file.id.valid:
            self._released = True
            self.file.close()
