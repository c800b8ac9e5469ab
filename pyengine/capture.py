"""Capture layer activations over a dataset into the HDF5 store, crash-safe and resumable.

Run by several processes (``torchrun``; ``pyengine.distributed``), each writes the part file of
its contiguous rows and rank 0 joins them into one capture of virtual datasets
(``pyengine.store.shards``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyengine import distributed
from pyengine._lock import CaptureLock
from pyengine.context import resolve_device
from pyengine.data.base import Batch, Dataset, as_dataset
from pyengine.errors import PyengineError, StoreError
from pyengine.hashing import param_hash
from pyengine.inputs import MASK_KEY, ModelInputs
from pyengine.layers import LayerRef, record, resolve_module
from pyengine.progress import Progress
from pyengine.store import COMPRESSIONS, STORED_DTYPES, ActivationWriter, partial_path, shards
from pyengine.units import infer_unit_dims


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


FLOAT16_MAX = 65504.0


def _warn_on_float16_overflow(activations: dict[str, torch.Tensor]) -> None:
    for name, values in activations.items():
        if values.numel() and float(values.detach().abs().max()) > FLOAT16_MAX:
            warnings.warn(
                f"layer {name!r} has values beyond the float16 range (|x| > 65504), stored as inf; "
                "capture with dtype='float32'",
                RuntimeWarning,
                stacklevel=3,
            )


def _check_options(
    layers: Sequence[str], batch_size: int, dtype: str, compression: str, start: int, stop: int | None, size: int
) -> None:
    if isinstance(layers, str) or not layers:
        raise PyengineError(f"layers={layers!r} is invalid: expected a non-empty list of module paths")
    if len(set(layers)) != len(layers):
        raise PyengineError(f"layers={list(layers)!r} is invalid: a layer is named twice")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PyengineError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    if dtype not in STORED_DTYPES:
        raise PyengineError(f"dtype={dtype!r} is invalid: expected one of {', '.join(STORED_DTYPES)}")
    if compression not in COMPRESSIONS:
        raise PyengineError(f"compression={compression!r} is invalid: expected one of {', '.join(COMPRESSIONS)}")
    end = size if stop is None else stop
    if not (0 <= start < end <= size):
        raise PyengineError(f"range start={start}, stop={stop} is invalid: expected 0 <= start < stop <= {size}")


def capture(
    model: nn.Module,
    dataset: Any,
    layers: Sequence[str],
    path: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    dtype: str = "float16",
    compression: str = "gzip",
    device: str | torch.device | None = None,
    start: int = 0,
    stop: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Run ``dataset`` through ``model`` and store the outputs of ``layers`` at ``path``.

    Returns the path of the complete store. An interrupted capture with the same
    configuration is resumed; a complete one is returned as is. One capture writes a store
    at a time: a second one, while the first runs, is a StoreError naming the first's pid.
    ``batch_size`` defaults to a DataLoader's own batch size, else 64.

    With ``torch.distributed`` initialised, every process calls ``capture`` with the same
    arguments; each captures its contiguous part of the rows (on ``cuda:LOCAL_RANK`` when there
    are GPUs) and rank 0 joins the parts (``pyengine.store.shards``). Run again to resume.
    """
    data: Dataset = as_dataset(dataset)
    if batch_size is None:
        batch_size = data.batch_size_hint or 64
    path = Path(path)
    _check_options(layers, batch_size, dtype, compression, start, stop, len(data))
    for name in layers:
        resolve_module(model, LayerRef.parse(name).path)
    stop = len(data) if stop is None else stop
    ranks = distributed.current()
    chosen = resolve_device(device) if device is not None else distributed.default_device(ranks)
    device = chosen if chosen is not None else model_device(model)
    config = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_param_hash": param_hash(model),
        "dataset": data.describe(),
        "layers": list(layers),
        "dtype": dtype,
        "compression": compression,
        "start": start,
        "stop": stop,
    }
    settings: dict[str, Any] = {
        "batch_size": batch_size,
        "dtype": dtype,
        "compression": compression,
        "device": device,
        "overwrite": overwrite,
        "progress": progress,
        "on_batch": on_batch,
    }
    if ranks.active:
        return _capture_sharded(ranks, model, data, layers, path, config, **settings)
    with CaptureLock(path):  # before anything reads, removes or resumes the store's files
        return _capture_locked(model, data, layers, path, config, start=start, stop=stop, **settings)


def _capture_sharded(
    ranks: distributed.Ranks,
    model: nn.Module,
    data: Dataset,
    layers: Sequence[str],
    path: Path,
    config: dict[str, Any],
    *,
    overwrite: bool,
    **settings: Any,
) -> Path:
    """``capture`` by one process of several: its part file, then rank 0 joins the parts."""
    start, stop, batch_size = int(config["start"]), int(config["stop"]), int(settings["batch_size"])
    if -(-(stop - start) // batch_size) < ranks.world:
        raise PyengineError(
            f"capture: {stop - start} rows in batches of {batch_size} cannot be split over {ranks.world} "
            "processes; expected at least one batch per process (lower batch_size or run fewer processes)"
        )

    def prepare() -> bool:  # rank 0: is the capture already complete? (else clear what cannot be used)
        with CaptureLock(path):
            if overwrite:
                path.unlink(missing_ok=True)
                partial_path(path).unlink(missing_ok=True)
                shards.remove_parts(path)
            finished = ActivationWriter.finished_config(path)
            if finished is not None and finished != config:
                raise StoreError(
                    f"{path} exists with a different capture configuration; choose another path or replace it "
                    "(overwrite=True; on the CLI: --overwrite)"
                )
            if finished is None:
                shards.parts_folder(path).mkdir(exist_ok=True)
                shards.remove_other_parts(path, ranks.world)
            return finished is not None

    if ranks.on_main(prepare):
        return path
    first, last = ranks.part(start, stop, batch_size)  # whole batches: the rows one process batches together
    part = shards.part_path(path, ranks.rank, ranks.world)
    part_config = {**config, "start": first, "stop": last, "part": ranks.rank, "parts": ranks.world}
    failure: BaseException | None = None
    try:
        with CaptureLock(part):
            _capture_locked(
                model,
                data,
                layers,
                part,
                part_config,
                start=first,
                stop=last,
                **{**settings, "overwrite": False, "progress": settings["progress"] and ranks.is_main},
            )
    except Exception as error:  # every rank learns of it below
        failure = error
    ranks.check_all(failure)

    def join() -> Path:
        with CaptureLock(path):
            parts = [shards.part_path(path, rank, ranks.world) for rank in range(ranks.world)]
            return shards.join_parts(path, parts, meta=_capture_meta(config, data), config=config)

    return ranks.on_main(join)


def _capture_meta(config: dict[str, Any], data: Dataset) -> dict[str, Any]:
    """What ``/meta`` records about a capture besides its configuration."""
    return {
        "model_class": config["model_class"],
        "model_param_hash": config["model_param_hash"],
        "dataset_name": data.name,
        "dataset_size": len(data),
    }


def _capture_locked(
    model: nn.Module,
    data: Dataset,
    layers: Sequence[str],
    path: Path,
    config: dict[str, Any],
    *,
    batch_size: int,
    dtype: str,
    compression: str,
    device: torch.device,
    start: int,
    stop: int,
    overwrite: bool,
    progress: bool,
    on_batch: Callable[[int], None] | None,
) -> Path:
    """The body of ``capture``, run while holding the store's lock."""
    if overwrite:
        path.unlink(missing_ok=True)
        partial_path(path).unlink(missing_ok=True)
    finished = ActivationWriter.finished_config(path)
    if finished is not None:
        if finished == config:
            return path
        raise StoreError(
            f"{path} exists with a different capture configuration; choose another path or replace it "
            "(overwrite=True; on the CLI: --overwrite)"
        )

    writer = ActivationWriter.resume(path, config)
    was_training = model.training
    model = model.to(device).eval()
    done = writer.rows_done if writer else 0
    unit_dims: dict[str, int] = {}
    try:
        if writer is None:  # which dim of each layer holds its units, kept with the store
            with torch.no_grad():
                first = data.batch([start])
                found = infer_unit_dims(
                    model, ModelInputs(first.inputs, first.extra, first.input_name).to(device), layers
                )
            unit_dims = {name: f.dim for name, f in found.items() if f.dim is not None and f.dim > 0}
        with (
            record(model, layers) as seen,
            torch.no_grad(),
            Progress(stop - start, f"capture {path.name}", enabled=progress) as bar,
        ):
            bar.update(done)
            for batch in data.batches(batch_size, start + done, stop):
                ModelInputs(batch.inputs, batch.extra, batch.input_name).to(device).call(model)
                tokens = _tokens(batch)
                row_concepts = {k: v for k, v in batch.concepts.items() if v.dim() == 1}  # token-level ones: not kept
                acts = {name: seen[name] for name in layers}
                if dtype == "float16":
                    _warn_on_float16_overflow(acts)
                if writer is None:
                    writer = ActivationWriter.create(
                        path,
                        meta=_capture_meta(config, data),
                        config=config,
                        layers={name: tuple(a.shape[1:]) for name, a in acts.items()},
                        dtype=dtype,
                        compression=compression,
                        concepts={name: tuple(data.concept_names.get(name, ())) for name in row_concepts},
                        unit_dims=unit_dims,
                        token_length=batch.inputs.shape[1] if tokens is not None else 0,
                    )
                writer.append(batch.index, batch.labels, row_concepts, acts, tokens)
                bar.update(int(batch.index.shape[0]))
                if on_batch is not None:
                    on_batch(writer.rows_done)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    finally:
        model.train(was_training)
    if writer is None:  # nothing to write: cannot happen with start < stop
        raise PyengineError("capture wrote no rows")
    return writer.finish()


def _tokens(batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids, attention mask) of a batch of token-id rows, kept with the activations."""
    mask = batch.extra.get(MASK_KEY)
    if mask is None or batch.inputs.dim() != 2 or batch.inputs.is_floating_point():
        return None
    return batch.inputs, mask
