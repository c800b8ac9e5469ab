"""What a technique gets: model, device, rows, layers, store, progress, rng.

Two policies live here, the same for every technique:

- **Rows** (``ctx.rows``): the given ``inputs`` when there are any, else the dataset
  ``data``; for stored activations (``ctx.activations``) a store that holds every
  requested layer comes before the dataset. ``start``/``stop`` pick rows of that source
  (``stop=0`` or past the end: to the end). What was read is kept in ``ctx.rows_read``
  and reported with the result.
- **Layers** (``ctx.record``): one forward-recording mechanism, see ``pyengine.layers``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pyengine import distributed
from pyengine import layers as layer_api
from pyengine import units as unit_api
from pyengine.errors import PyengineError
from pyengine.inputs import MASK_KEY, ModelInputs, OutputSelector, as_model_inputs, explained_scores, select_output
from pyengine.progress import Progress

if TYPE_CHECKING:
    from pyengine.data.base import Batch, Dataset
    from pyengine.store import StoreReader
    from pyengine.technique import Result


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; a clear error for typos and absent accelerators."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PyengineError(f"device={device!r} is invalid: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PyengineError(f"device={device!r} is not available: this torch sees no CUDA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PyengineError(f"device={device!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    return parsed


@dataclass(frozen=True)
class Rows:
    """A block of analysed rows and what is known about them."""

    index: torch.Tensor  # (B,) dataset rows, or positions in the given inputs
    inputs: torch.Tensor | None = None  # (B, ...) on the device; None for rows read from a store
    labels: torch.Tensor | None = None  # (B,) class labels (-1: unknown); None when there are none
    concepts: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) codes
    boxes: torch.Tensor | None = None  # (B, 4) x0, y0, x1, y1 of the labelled object, if known
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # other per-row model inputs (attention_mask)
    input_name: str | None = None  # the keyword of ``inputs`` when the model takes keywords
    mask: torch.Tensor | None = None  # (B, T) 1 = a real token: from the inputs' attention_mask or the store

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def require_inputs(self) -> torch.Tensor:
        if self.inputs is None:
            raise PyengineError("these rows come from a store and carry no inputs")
        return self.inputs

    def model_inputs(self) -> ModelInputs:
        """The rows as the model takes them: the inputs with their attention mask and other keywords."""
        return ModelInputs(self.require_inputs(), self.extra, self.input_name)


@dataclass(frozen=True)
class RowSource:
    """Rows ``start .. stop`` of one source, in blocks of ``batch_size``."""

    description: str  # e.g. "rows 0-7 of the 8 given inputs"
    count: int
    blocks: Callable[[], Iterator[Rows]]
    concept_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # concept -> category names
    offset: int = 0  # rows of the range before this part (``split``: the rows of lower ranks)
    total: int = -1  # rows of the whole range (``split``: of all ranks together); -1: ``count``

    def __iter__(self) -> Iterator[Rows]:
        return self.blocks()

    def all(self) -> Rows:
        """Every row in one block."""
        parts = list(self)
        if len(parts) == 1:
            return parts[0]

        def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            present = [v for v in values if v is not None]
            return torch.cat(present) if len(present) == len(values) else None

        concepts = {k: torch.cat([p.concepts[k] for p in parts]) for k in parts[0].concepts}
        return Rows(
            torch.cat([p.index for p in parts]),
            cat([p.inputs for p in parts]),
            cat([p.labels for p in parts]),
            concepts,
            cat([p.boxes for p in parts]),
            {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra},
            parts[0].input_name,
            cat([p.mask for p in parts]),
        )


@dataclass(frozen=True)
class ActivationSource:
    """Layer activations of rows ``start .. stop``, in blocks of (rows, {layer: values})."""

    description: str
    count: int
    blocks: Callable[[], Iterator[tuple[Rows, dict[str, torch.Tensor]]]]
    concept_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[Rows, dict[str, torch.Tensor]]]:
        return self.blocks()


def _stored_blocks(
    store: StoreReader, layers: tuple[str, ...], batch_size: int, start: int, end: int, device: torch.device
) -> Iterator[tuple[Rows, dict[str, torch.Tensor]]]:
    names = tuple(store.concepts)
    streams = [store.iter_layer(layer, rows=batch_size, device=device, start=start, stop=end) for layer in layers]
    first = start
    for blocks in zip(*streams):
        last = first + blocks[0].shape[0]
        tokens = store.tokens(first, last)
        rows = Rows(
            store.index(first, last),
            None,
            store.labels(first, last),
            {name: store.concept(name, first, last) for name in names},
            mask=tokens[1].to(device) if tokens is not None else None,
        )
        yield rows, dict(zip(layers, blocks))
        first = last


def _dataset_rows(batch: Batch, device: torch.device) -> Rows:
    extra = {key: value.to(device) for key, value in batch.extra.items()}
    inputs = finite(batch.inputs, batch.index).to(device)
    return Rows(
        batch.index, inputs, batch.labels, batch.concepts, batch.boxes, extra, batch.input_name, extra.get(MASK_KEY)
    )


def finite(inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The inputs, if every value is finite; else an error naming the first bad row."""
    if inputs.is_floating_point() or inputs.is_complex():
        bad = ~torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(1)
        if bool(bad.any()):
            row = int(index[int(bad.nonzero()[0, 0])])
            raise PyengineError(f"input row {row} contains NaN or Inf; expected finite inputs")
    return inputs


def _row_range(start: int, stop: int, size: int, what: str, technique: str, at_most: int = 0) -> tuple[int, str]:
    """The end of rows ``start .. stop`` of a source of ``size`` rows and their description.
    ``stop`` 0 means the end, or ``start + at_most`` when the technique limits its default
    extent; a ``stop`` past the end is an error, never a silent clip."""
    if stop > size:
        raise PyengineError(
            f"{technique}: stop={stop} is past the end of the {size} rows of {what}; "
            f"expected stop <= {size} (or 0: to the end)"
        )
    limited = stop == 0 and at_most and start + at_most < size
    end = start + at_most if limited else (stop or size)
    if not 0 <= start < end:
        raise PyengineError(
            f"{technique}: rows start={start}, stop={stop} select nothing of the {size} rows of "
            f"{what}; expected 0 <= start < {size}"
        )
    note = f"; the first {at_most} by default, set stop to change it" if limited else ""
    return end, f"rows {start}-{end - 1} of {what} ({size} rows{note})"


def _rank_part(ranks: distributed.Ranks, start: int, end: int, batch_size: int, technique: str) -> tuple[int, int, str]:
    """This rank's contiguous rows of ``start .. end`` (whole batches) and how the description
    names them."""
    if not ranks.active:
        return start, end, ""
    if -(-(end - start) // batch_size) < ranks.world:
        raise PyengineError(
            f"{technique}: {end - start} rows in batches of {batch_size} cannot be split over {ranks.world} "
            "processes; expected at least one batch per process (lower batch_size or run fewer processes)"
        )
    first, last = ranks.part(start, end, batch_size)
    return first, last, f"; rank {ranks.rank} of {ranks.world} reads rows {first}-{last - 1}"


@dataclass
class Context:
    """Everything a technique may use. Built by ``pyengine.run``; techniques never open files."""

    model: nn.Module
    device: torch.device
    inputs: Any = None  # a tensor or a mapping of tensors (``input_ids``, ``attention_mask``); then ``main``
    data: Dataset | None = None
    store: StoreReader | None = None
    seed: int = 0
    show_progress: bool = True
    output: OutputSelector = None  # picks the explained tensor from the model's output (see pyengine.inputs)
    rng: torch.Generator = field(init=False)
    rows_read: str = field(init=False, default="")
    defaults_chosen: dict[str, str] = field(init=False, default_factory=dict)  # option -> what and why
    ranks: distributed.Ranks = field(default_factory=distributed.current)  # this process among a run's
    given: ModelInputs | None = field(init=False, default=None)  # the given inputs as the model takes them

    def __post_init__(self) -> None:
        self.rng = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.inputs is not None:
            self.given = as_model_inputs(self.inputs)
            self.inputs = self.given.main

    def forward(self, inputs: ModelInputs | Rows | torch.Tensor) -> torch.Tensor:
        """The model's output to explain for ``inputs`` (rows with their masks, or a tensor):
        ``output=`` applied, else a ``ModelOutput``'s logits or a tuple's first element."""
        if isinstance(inputs, Rows):
            inputs = inputs.model_inputs()
        elif isinstance(inputs, torch.Tensor):
            inputs = ModelInputs(inputs)
        return select_output(inputs.call(self.model), self.output, type(self.model).__name__)

    def scores(self, inputs: ModelInputs | Rows | torch.Tensor, position: int = -1) -> torch.Tensor:
        """(N, K) scores a target indexes: ``forward``'s output, read at ``position`` (-1: each
        row's last real token) for a sequence model's per-token output over token ids (a causal
        LM's next token)."""
        if isinstance(inputs, Rows):
            inputs = inputs.model_inputs()
        elif isinstance(inputs, torch.Tensor):
            inputs = ModelInputs(inputs)
        return explained_scores(self.forward(inputs), inputs, position)

    # --- layers ------------------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, nn.Module]:
        """Module path -> module, for every submodule of the model."""
        return {name: module for name, module in self.model.named_modules() if name}

    def module(self, name: str) -> nn.Module:
        return layer_api.resolve_module(self.model, layer_api.LayerRef.parse(name).path)

    def relu_layers(self) -> tuple[str, ...]:
        """Module paths of every ``nn.ReLU`` in the model."""
        return layer_api.relu_layers(self.model)

    def example(self, technique: str) -> torch.Tensor:
        """One input row (the first given input, else the data's first row), on the device."""
        if self.inputs is not None:
            return self.inputs[:1].to(self.device)
        if self.data is not None and len(self.data):
            return self.data.batch([0]).inputs.to(self.device)
        raise PyengineError(f"{technique}: no layers given and no inputs or data to find them from; pass layers=[...]")

    def example_inputs(self, technique: str) -> ModelInputs:
        """``example`` with its attention mask and other keywords, as the model takes it."""
        if self.given is not None:
            return self.given.take([0]).to(self.device)
        if self.data is not None and len(self.data):
            batch = self.data.batch([0])
            return ModelInputs(batch.inputs, batch.extra, batch.input_name).to(self.device)
        return ModelInputs(self.example(technique))

    def default_layers(self, technique: str, *, from_store: bool = True) -> tuple[str, ...]:
        """The stored layers (when ``from_store``), else every call of a nonlinearity module
        (ReLU, GELU, SiLU, ...) in a forward pass; an error if there is none."""
        if from_store and self.store is not None and self.store.layers:
            self.defaults_chosen["layers"] = f"the {len(self.store.layers)} layers of {self.store.path.name}"
            return tuple(self.store.layers)
        found = layer_api.nonlinearity_outputs(self.model, self.example_inputs(technique))
        if not found:
            kinds = ", ".join(kind.__name__ for kind in layer_api.NONLINEARITIES[:4])
            raise PyengineError(
                f"{technique}: no layers given and the model runs no nonlinearity module ({kinds}, ...); "
                "pass layers=[...]"
            )
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} in all)" if len(found) > 4 else "")
        self.defaults_chosen["layers"] = f"{shown} (every nonlinearity's output)"
        return found

    def bypassed(self, technique: str, layers: Sequence[str]) -> tuple[str, ...]:
        """Those of ``layers`` that some path from the input to the output goes around (a
        residual add, a concatenation, a gate): not cuts of the model."""
        return layer_api.bypassed(self.model, self.example_inputs(technique), layers)

    def block_cuts(self, technique: str) -> tuple[str, ...]:
        """The innermost blocks (modules with children) every path from the input to the output
        goes through, in forward order: where a chain of layers can be read on a residual net."""
        blocks = [c.reference for c in layer_api.module_cuts(self.model, self.example_inputs(technique)) if not c.leaf]
        return tuple(ref for ref in blocks if not any(other.startswith(ref + ".") for other in blocks))

    def spatial_layer(self, technique: str) -> str:
        """The default layer of spatial techniques (grad-cam, max-patches, ...): the last
        (N, C, H, W) output that every path to the output goes through."""
        layer = layer_api.last_spatial_cut(self.model, self.example_inputs(technique), technique)
        self.defaults_chosen["layers"] = f"{layer} (the last (N, C, H, W) output every path to the output goes through)"
        return layer

    def first_block(self, technique: str) -> str:
        """The first convolution's output after its normalisation and nonlinearity."""
        with torch.no_grad():
            layer = layer_api.first_block_output(self.model, self.example_inputs(technique), technique)
        self.defaults_chosen["layers"] = (
            f"{layer} (the first convolution's output after its normalisation/nonlinearity)"
        )
        return layer

    def unit_axes(self, choice: str, technique: str, layers: Sequence[str]) -> unit_api.UnitAxes:
        """Which dim of each layer's values holds its units (``pyengine.units``), for the option
        ``units``; 'auto' reads what the store recorded at capture, else follows one forward pass
        of the example row (run here, before any recording)."""
        stored = self.store.unit_dims() if self.store is not None else {}
        pending = [layer for layer in layers if layer not in stored] if choice == "auto" else []
        found: Mapping[str, unit_api.Found] = {}
        if pending and (self.inputs is not None or self.data is not None):
            with torch.no_grad():
                found = unit_api.infer_unit_dims(self.model, self.example_inputs(technique), pending)
        return unit_api.UnitAxes(choice, technique, found, stored)

    def record(
        self, layers: Sequence[str], *, grad: bool = False, edit: Mapping[str, layer_api.Edit] | None = None
    ) -> AbstractContextManager[layer_api.Recording]:
        """``with ctx.record(["features.relu2"]) as seen: ctx.model(x)`` then ``seen["features.relu2"]``."""
        return layer_api.record(self.model, layers, grad=grad, edit=edit)

    def hooks(self) -> layer_api.HookScope:
        """``with ctx.hooks() as scope: scope.forward(module, fn)`` — removed on exit. For what
        ``record`` and ``trace`` do not cover; prefer them."""
        return layer_api.HookScope()

    def trace(
        self, *, until: nn.Module | None = None, also: Sequence[nn.Module] = ()
    ) -> AbstractContextManager[layer_api.Trace]:
        """Every leaf module call of the passes run inside, in order (see ``pyengine.layers.trace``)."""
        return layer_api.trace(self.model, until=until, also=also)

    # --- rows --------------------------------------------------------------------------------

    def rows(
        self,
        batch_size: int,
        *,
        start: int = 0,
        stop: int = 0,
        at_most: int = 0,
        technique: str = "",
        split: bool = False,
    ) -> RowSource:
        """Rows to analyse: the given inputs, else the dataset (see the module doc). With
        ``stop`` 0, ``at_most`` (if set) limits how many rows from ``start`` are read. With
        ``split``, each process of a distributed run gets its contiguous part of those rows
        (``pyengine.distributed``): the technique then reduces or gathers what it computed."""
        technique = technique or "this technique"
        if self.given is not None:
            given = self.given
            end, description = _row_range(start, stop, len(given), "the given inputs", technique, at_most)
            first, last, part = _rank_part(
                self.ranks if split else distributed.Ranks(), start, end, batch_size, technique
            )

            def blocks() -> Iterator[Rows]:
                for index in torch.arange(first, last).split(batch_size):
                    taken = given.take(index).to(self.device)
                    yield Rows(
                        index, finite(taken.main, index), extra=taken.extra, input_name=taken.name, mask=taken.mask
                    )

            source = RowSource(description + part, last - first, blocks, offset=first - start, total=end - start)
        elif self.data is not None:
            data = self.data
            end, description = _row_range(start, stop, len(data), f"dataset {data.name!r}", technique, at_most)
            first, last, part = _rank_part(
                self.ranks if split else distributed.Ranks(), start, end, batch_size, technique
            )
            source = RowSource(
                description + part,
                last - first,
                lambda: (_dataset_rows(b, self.device) for b in data.batches(batch_size, first, last)),
                dict(data.concept_names),
                offset=first - start,
                total=end - start,
            )
        else:
            raise PyengineError(
                f"{technique} needs rows: pass inputs (pyengine.run(name, model, inputs)) or data=<dataset>"
            )
        self.rows_read = f"{end - start} {description}"
        return source

    def require_inputs(self, technique: str) -> torch.Tensor:
        """The given inputs on the device (for ``needs_inputs`` techniques)."""
        if self.inputs is None:
            raise PyengineError(f"{technique} needs inputs: pass a tensor as pyengine.run(..., inputs)")
        self.rows_read = f"{self.inputs.shape[0]} given inputs"
        return self.inputs.to(self.device)

    def activations(
        self,
        layers: Sequence[str],
        *,
        batch_size: int,
        start: int = 0,
        stop: int = 0,
        at_most: int = 0,
        technique: str = "",
        split: bool = False,
    ) -> ActivationSource:
        """Blocks of (rows, {layer: activations}): streamed from the store when it holds every
        layer (and no inputs are given), else from a recorded pass over ``ctx.rows``. ``split``
        as for ``rows``."""
        layers = tuple(layers)
        store = self.store
        if self.inputs is None and store is not None and all(layer in store.layers for layer in layers):
            what, technique = f"store {store.path.name}", technique or "this technique"
            end, description = _row_range(start, stop, len(store), what, technique, at_most)
            first, last, part = _rank_part(
                self.ranks if split else distributed.Ranks(), start, end, batch_size, technique
            )
            self.rows_read = f"{end - start} {description}"
            return ActivationSource(
                description + part,
                last - first,
                lambda: _stored_blocks(store, layers, batch_size, first, last, self.device),
                {k: tuple(v) for k, v in store.concepts.items()},
            )
        source = self.rows(batch_size, start=start, stop=stop, at_most=at_most, technique=technique, split=split)

        def recorded() -> Iterator[tuple[Rows, dict[str, torch.Tensor]]]:
            with self.record(layers) as seen, torch.no_grad():
                for rows in source:
                    rows.model_inputs().call(self.model)
                    yield rows, {layer: seen[layer] for layer in layers}

        return ActivationSource(source.description, source.count, recorded, source.concept_names)

    # --- running -----------------------------------------------------------------------------

    def progress(self, total: int | None, desc: str) -> Progress:
        """A progress bar; drawn by one process only (rank 0) in a distributed run."""
        return Progress(total, desc, enabled=self.show_progress and self.ranks.is_main)

    # --- several processes (see pyengine.distributed; no-ops in one process) ---------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes of the run, added in rank order."""
        return self.ranks.all_reduce(tensor)

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""
        return self.ranks.all_gather(value)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-row values of rows read with ``split=True``, for all rows, in row order."""
        return self.ranks.gather_rows(tensor)

    def run(
        self, name: str, inputs: torch.Tensor | ModelInputs, *, show_progress: bool = False, **options: Any
    ) -> Result:
        """Run another registered technique on ``inputs`` with this model, device and seed,
        through the same entry as ``pyengine.run`` (nothing saved; its progress bars shown only
        with ``show_progress`` when this context shows its own)."""
        from pyengine import host
        from pyengine.api import execute

        technique = host.get_technique(name)
        child = Context(
            model=self.model,
            device=self.device,
            inputs=inputs,
            seed=self.seed,
            show_progress=show_progress and self.show_progress,
            output=self.output,
            ranks=distributed.Ranks(),  # the inputs this process was given, all of them
        )
        child.rng = self.rng
        return execute(technique, child, technique.options(**options))
