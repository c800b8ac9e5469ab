"""What every attribution technique shares: targets, input sources, memory-bounded batching,
the result type and its heatmap figure.

A technique supplies ``attribute(inputs, targets) -> maps`` for a chunk of inputs (N, *S)
with one target each; ``run_attribution`` does the rest: inputs or a dataset range, target
resolution (an index, per-input indices, several per input, ``"predicted"`` or ``"label"``),
a progress bar, and the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.technique import Figure, Options, Result, bad_option

Attribute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TARGET_FORMS = ("a class index, 'predicted', 'label', a list/tensor of one index per input, "
                "or a 2-D list/tensor (inputs or 1, targets)")
CPU_BUDGET_MB = 64.0  # larger passes only thrash the caches on a CPU (measured on the demo CNN)
MAX_FIGURE_INPUTS = 8


@dataclass(frozen=True)
class AttributionOptions(Options):
    """Options every attribution technique takes."""

    target: Any = "predicted"  # see TARGET_FORMS
    batch_size: int = 64  # dataset rows per step (dataset mode)
    start: int = 0  # dataset range [start, stop); used when no inputs are given
    stop: int = 0  # 0: to the end of the dataset
    memory_mb: float = 0.0  # budget for internal batches; 0: half the free GPU memory, or 64 MiB on CPU
    max_batch: int = 0  # at most this many samples per forward pass; 0: from the memory budget

    def validate(self) -> None:
        self._set("target", normalise_target(self.target))
        self.require_int("batch_size")
        self.require_int("start", "stop", "max_batch", minimum=0)
        self.require_number("memory_mb")
        if self.stop and self.stop <= self.start:
            raise bad_option("stop", self.stop, f"0 (the end) or an index > start={self.start}")


def normalise_target(target: Any) -> int | str | torch.Tensor:
    """An int, 'predicted', 'label', or a long tensor of shape (B,) or (B or 1, T)."""
    if isinstance(target, str):
        if target not in ("predicted", "label"):
            raise bad_option("target", target, TARGET_FORMS)
        return target
    if isinstance(target, bool):
        raise bad_option("target", target, TARGET_FORMS)
    if isinstance(target, int):
        if target < 0:
            raise bad_option("target", target, "a non-negative class index")
        return target
    try:
        tensor = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise bad_option("target", target, TARGET_FORMS) from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool or tensor.dim() not in (1, 2) \
            or tensor.numel() == 0 or int(tensor.min()) < 0:
        raise bad_option("target", target, TARGET_FORMS)
    return tensor.long().cpu()


def target_scores(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model output at each row's targets: output (N, K) or (N,), targets (N, T) -> (N, T)."""
    flat = output.reshape(output.shape[0], -1)
    if int(targets.max()) >= flat.shape[1]:
        raise PyengineError(f"target {int(targets.max())} is out of range: the model has {flat.shape[1]} outputs")
    return flat.gather(1, targets.to(flat.device))


def resolve_targets(spec: int | str | torch.Tensor, model: nn.Module, inputs: torch.Tensor,
                    labels: torch.Tensor | None, offset: int) -> torch.Tensor:
    """(B, T) target indices for rows ``offset .. offset + B`` of the whole run."""
    b = inputs.shape[0]
    if isinstance(spec, int):
        return torch.full((b, 1), spec, dtype=torch.long)
    if spec == "predicted":
        with torch.no_grad():
            output = model(inputs)
        return output.reshape(b, -1).argmax(1, keepdim=True).cpu()
    if spec == "label":
        if labels is None or int(labels.min()) < 0:
            raise PyengineError("target='label' needs labelled dataset rows: pass data=<dataset> without inputs "
                                "(start/stop select the rows), or class indices")
        return labels.long().reshape(b, 1).cpu()
    table = torch.as_tensor(spec)
    table = table.reshape(-1, 1) if table.dim() == 1 else table
    if table.shape[0] == 1:
        return table.expand(b, -1)
    return table[offset:offset + b]


@dataclass(frozen=True)
class Chunk:
    """Rows of the run: inputs on the device, their dataset labels (if known) and indices."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor


def input_chunks(ctx: Context, options: AttributionOptions, technique: str) -> tuple[int, Iterator[Chunk]]:
    """The rows to explain: ``ctx.inputs`` if given, else the dataset range, in chunks."""
    if ctx.inputs is not None:
        inputs = ctx.inputs.to(ctx.device)
        index = torch.arange(inputs.shape[0])
        rows = inputs.shape[0]
        chunks = (Chunk(x, None, i) for x, i in zip(inputs.split(options.batch_size), index.split(options.batch_size)))
        return rows, chunks
    if ctx.data is None:
        raise PyengineError(f"{technique} needs inputs or data: pyengine.run({technique!r}, model, inputs) or data=...")
    stop = options.stop or len(ctx.data)
    if stop > len(ctx.data) or options.start >= stop:
        raise PyengineError(f"{technique}: rows [{options.start}, {stop}) are outside the dataset of {len(ctx.data)} rows")
    data = ctx.data
    batches = data.batches(options.batch_size, options.start, stop)
    return stop - options.start, (Chunk(b.inputs.to(ctx.device), b.labels, b.index) for b in batches)


def memory_budget_bytes(device: torch.device, memory_mb: float) -> float:
    if memory_mb:
        return memory_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2
    return CPU_BUDGET_MB * 2**20


def samples_per_pass(ctx: Context, example: torch.Tensor, options: AttributionOptions, *, backward: bool,
                     extra_bytes: int = 0) -> int:
    """How many samples one forward (and backward) pass may take within the memory budget.

    Measured on one sample: the outputs of every leaf module. Without gradients the peak is
    about the input plus the two largest consecutive outputs; with gradients every output is
    kept and gets a gradient of its own.
    """
    sizes: list[int] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    with ctx.hooks() as scope, torch.no_grad():
        for module in ctx.model.modules():
            if not any(True for _ in module.children()):
                scope.forward(module, record)
        ctx.model(example[:1])
    input_bytes = example[:1].numel() * example.element_size()
    largest = sorted(sizes, reverse=True)[:2]
    per_sample = 2 * (input_bytes + sum(sizes)) if backward else input_bytes + sum(largest)
    per_sample += extra_bytes
    budget = memory_budget_bytes(ctx.device, options.memory_mb)
    samples = max(1, int(budget // max(per_sample, 1)))
    return min(samples, options.max_batch) if options.max_batch else samples


@dataclass(frozen=True, kw_only=True)
class AttributionResult(Result):
    """Attribution maps shaped like the inputs ((B, T, *S) with several targets per input)."""

    technique: str
    attributions: torch.Tensor
    targets: torch.Tensor  # (B,) or (B, T) class indices explained
    index: torch.Tensor  # (B,) dataset rows (or positions in the given inputs)

    def summary(self) -> str:
        shape = "x".join(str(s) for s in self.attributions.shape)
        values = self.attributions.float()
        return (f"{self.technique}: {shape} attributions, mean |a| {values.abs().mean():.3g}, "
                f"max |a| {values.abs().max():.3g}")


def run_attribution(ctx: Context, options: AttributionOptions, technique: str, attribute: Attribute, *,
                    multi_target: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explain every row: returns (attributions, targets, index, first inputs).

    ``attribute(x, t)`` maps N inputs with one target each (t: (N,)) to N maps; with several
    targets per input the rows are repeated. A ``multi_target`` attribute takes all targets
    at once, t: (N, T), and returns (N, T, *S).
    """
    rows, chunks = input_chunks(ctx, options, technique)
    if isinstance(options.target, torch.Tensor) and options.target.shape[0] not in (1, rows):
        raise PyengineError(f"{technique}: target has {options.target.shape[0]} rows but there are {rows} inputs; "
                            "expected one row per input or a single row")
    maps: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    shown: list[torch.Tensor] = []
    offset = 0
    with ctx.progress(rows, technique) as bar:
        for chunk in chunks:
            targets = resolve_targets(options.target, ctx.model, chunk.inputs, chunk.labels, offset)
            if multi_target:
                out = attribute(chunk.inputs, targets)
            else:
                n, t = targets.shape
                repeated = chunk.inputs.repeat_interleave(t, 0) if t > 1 else chunk.inputs
                out = attribute(repeated, targets.reshape(-1)).reshape(n, t, *chunk.inputs.shape[1:])
            maps.append((out[:, 0] if targets.shape[1] == 1 else out).detach().to(chunk.inputs.dtype).cpu())
            all_targets.append(targets[:, 0] if targets.shape[1] == 1 else targets)
            indices.append(chunk.index)
            if sum(s.shape[0] for s in shown) < MAX_FIGURE_INPUTS:
                shown.append(chunk.inputs[:MAX_FIGURE_INPUTS].detach().cpu())
            offset += chunk.inputs.shape[0]
            bar.update(chunk.inputs.shape[0])
    return torch.cat(maps), torch.cat(all_targets), torch.cat(indices), torch.cat(shown)[:MAX_FIGURE_INPUTS]


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """(H, W) attribution -> (3, H, W) colours: red positive, blue negative, white zero."""
    scale = values.abs().max().clamp(min=1e-12)
    v = (values / scale).clamp(-1, 1)
    positive, negative = v.clamp(min=0), (-v).clamp(min=0)
    return torch.stack([1 - negative, 1 - positive - negative, 1 - positive]).clamp(0, 1)


def overlay(image: torch.Tensor, values: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """The input (C, H, W) in grey with the heatmap of ``values`` (H, W) over it."""
    grey = image.float().mean(0) if image.dim() == 3 else image.float()
    low, high = grey.min(), grey.max()
    grey = (grey - low) / (high - low).clamp(min=1e-12)
    return (1 - alpha) * grey.expand(3, -1, -1) + alpha * heatmap(values.float())


def spatial_map(attribution: torch.Tensor) -> torch.Tensor:
    """One value per pixel: (C, H, W) summed over channels; (H, W) as is."""
    return attribution.float().sum(0) if attribution.dim() == 3 else attribution.float()


def overlay_figure(technique: str, inputs: torch.Tensor, attributions: torch.Tensor,
                   targets: torch.Tensor) -> tuple[Figure, ...]:
    """Inputs with their heatmaps (first target), when the inputs are images."""
    from pyengine.report import image_grid

    if inputs.dim() not in (3, 4) or attributions.dim() < inputs.dim():
        return ()
    first = attributions if attributions.shape[1:] == inputs.shape[1:] else attributions[:, 0]
    n = inputs.shape[0]
    tiles = [overlay(inputs[k], spatial_map(first[k])) for k in range(n)]
    wanted = targets if targets.dim() == 1 else targets[:, 0]
    caption = ("targets " + ", ".join(str(int(t)) for t in wanted[:n]) +
               "; red: raises the target score, blue: lowers it (channels summed, per-image scale)")
    grid = image_grid(torch.stack(tiles), columns=min(n, MAX_FIGURE_INPUTS))
    return (Figure(f"{technique}: attributions over the inputs", image=grid, caption=caption),)


def make_result(technique: str, attributions: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                shown: torch.Tensor, result_type: type[AttributionResult] = AttributionResult,
                **extra: Any) -> AttributionResult:
    figures = overlay_figure(technique, shown, attributions[:shown.shape[0]], targets)
    return result_type(technique=technique, attributions=attributions, targets=targets, index=index,
                       figures=figures, **extra)

