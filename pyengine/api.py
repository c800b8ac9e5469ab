"""The public entry point: ``pyengine.run``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyengine import distributed, host
from pyengine.capture import model_device, param_hash
from pyengine.context import Context, resolve_device
from pyengine.data.base import as_dataset
from pyengine.errors import PluginError, PyengineError
from pyengine.inputs import OutputSelector
from pyengine.store import PendingResult, StoreReader, reserve_run_name, write_results
from pyengine.technique import Options, Result, Technique


def resolve_model(model: nn.Module | str) -> nn.Module:
    """A model instance, or a registered model name (built with default arguments)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        return host.build_seeded(host.get_entry("model", model).factory)
    raise PyengineError(f"model={type(model).__name__} is invalid: expected an nn.Module or a registered model name")


def run(
    name: str,
    model: nn.Module | str,
    inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    data: Any = None,
    output: OutputSelector = None,
    store: StoreReader | str | os.PathLike[str] | None = None,
    save: str | os.PathLike[str] | None = None,
    run_name: str = "",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    accept_other_model: bool = False,
    **options: Any,
) -> Result:
    """Run technique ``name`` on ``model``; ``options`` are the technique's options.

    ``inputs`` is a tensor or a mapping of tensors (a tokenizer's ``input_ids`` with its
    ``attention_mask``: the model is called as ``model(**inputs)``); ``output`` picks the
    explained tensor from what the model returns (a key, an index or a callable; default: the
    tensor itself, a ``ModelOutput``'s logits, a tuple's first element).
    ``data`` is a dataset to analyse, ``store`` an activation store to read from, ``save``
    a results file to add the result to (under ``/results/<name>/<run_name>``).
    ``device`` moves the model there (default: where the model already is; ``cuda:LOCAL_RANK``
    for a process of a distributed run on a machine with GPUs). A store captured
    from other weights is an error unless ``accept_other_model``.

    When ``torch.distributed`` is initialised (``torchrun``), every process calls ``run`` with
    the same arguments: techniques split the rows and reduce over processes
    (``pyengine.distributed``); every process gets the result; only rank 0 writes ``save``.
    """
    technique_class = host.get_technique(name)
    parsed = technique_class.options(**options)
    model = resolve_model(model)
    ranks = distributed.current()
    chosen = resolve_device(device) if device is not None else distributed.default_device(ranks)
    target = chosen if chosen is not None else model_device(model)
    if chosen is not None:
        model = model.to(target)
    if technique_class.needs_inputs and inputs is None:
        raise PyengineError(f"{name} needs inputs: call pyengine.run({name!r}, model, inputs, ...)")
    if technique_class.needs_data and data is None and store is None and inputs is None:
        raise PyengineError(f"{name} needs data: pass data=<dataset> or store=<activations .h5>")

    if save is not None:
        check_output_path(save)
        run_name = ranks.on_main(lambda: reserve_run_name(save, name, run_name))
    reader = StoreReader(store) if isinstance(store, (str, os.PathLike)) else store
    try:
        if reader is not None and not accept_other_model:
            check_same_model(reader, model)
    except BaseException:
        if reader is not store and reader is not None:
            reader.close()
        raise
    ctx = Context(
        model=model,
        device=target,
        inputs=inputs,
        data=as_dataset(data) if data is not None else None,
        store=reader,
        seed=seed,
        show_progress=progress,
        output=output,
        ranks=ranks,
    )
    was_training = model.training
    model.eval()
    try:
        result = execute(technique_class, ctx, parsed)
    finally:
        model.train(was_training)
        if reader is not None and reader is not store:
            reader.close()
    if save is not None:
        pending = stored_result(name, run_name, parsed, result)
        ranks.on_main(lambda: write_results(save, [pending], meta=model_meta(model)))
    return result


def check_output_path(path: str | os.PathLike[str]) -> None:
    """A results file can be written at ``path``: checked before any work."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise PyengineError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PyengineError(f"cannot write {path}: the folder {folder} is not writable")


def check_same_model(reader: StoreReader, model: nn.Module) -> None:
    """The store was captured from these weights (SHA-256 of the state dict)."""
    stored = str(reader.meta.get("model_param_hash", ""))
    current = param_hash(model)
    if stored and stored != current:
        raise PyengineError(
            f"{reader.path.name} was captured from other weights (sha256 {stored[:12]}..., this model "
            f"{current[:12]}...); pass accept_other_model=True to use it anyway"
        )


def execute(technique_class: type[Technique], ctx: Context, options: Options) -> Result:
    """Run one technique on a context: the single entry behind ``pyengine.run`` and ``ctx.run``.
    The result says which rows were analysed and which defaults were chosen."""
    result = technique_class().run(ctx, options)
    if not isinstance(result, Result):
        raise PluginError(
            f"technique {technique_class.name!r} returned {type(result).__name__}; expected a pyengine.Result"
        )
    if ctx.rows_read and not result.rows:
        result = dataclasses.replace(result, rows=ctx.rows_read)
    if ctx.defaults_chosen and not result.defaults:
        chosen = "; ".join(f"{option}={value}" for option, value in ctx.defaults_chosen.items())
        result = dataclasses.replace(result, defaults=chosen)
    return result


def model_meta(model: nn.Module) -> dict[str, str]:
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_param_hash": param_hash(model),
    }


def stored_result(name: str, run_name: str, options: Options, result: Result) -> PendingResult:
    """What the host writes for a result: its arrays, scalars, options JSON and summary."""
    attrs: dict[str, Any] = dict(result.scalars())
    attrs.update(technique=name, options=json.dumps(options.to_dict(), sort_keys=True), summary=result.summary())
    return PendingResult(name, run_name, result.arrays(), attrs)
