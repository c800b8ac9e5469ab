"""``unit-ablation``: how much the explained output drops when one unit of a layer is zeroed.

A third-party technique written only against pyengine's host API, so it behaves like a
built-in: layers are read and edited through ``ctx.record`` (a mistyped layer is the same
one-line error), the units of a layer are found by ``ctx.unit_axes``, targets are resolved by
``pyengine.attribution``, rows come from ``ctx.rows`` (split over processes, gathered back)
under ``ctx.progress``, the units are drawn with ``ctx.rng`` and the figure is built with
``pyengine.figures``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

import pyengine
from pyengine.attribution import TargetOptions, resolve_targets, target_scores
from pyengine.figures import heatmap, upscale
from pyengine.technique import layer_tuple


@dataclass(frozen=True)
class AblationOptions(TargetOptions):
    """Rows, ``target`` and ``position`` as every attribution technique spells them."""

    layers: tuple[str, ...] = pyengine.option(
        (), "layers whose units are ablated; default: every nonlinearity's output"
    )
    units: int = pyengine.option(8, "units ablated per layer, drawn at random (seeded) from larger layers; 0: all")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        self.require_int("units", minimum=0)
        if isinstance(self.target, torch.Tensor) and self.target.dim() == 2:
            raise pyengine.bad_option("target", self.target.tolist(), "one target per input (an index or a list)")


@dataclass(frozen=True, kw_only=True)
class AblationResult(pyengine.Result):
    units: dict[str, torch.Tensor]  # layer -> (U,) the ablated units
    drops: dict[str, torch.Tensor]  # layer -> (N, U): target score minus the score with that unit zeroed
    targets: torch.Tensor  # (N,) the explained output of each row
    index: torch.Tensor  # (N,) dataset rows, or positions in the given inputs
    unit_axis: dict[str, str]  # layer -> where its units are ('channels', 'last', ...)
    largest: str  # the unit whose ablation lowers the target most, on average

    def summary(self) -> str:
        return f"largest mean drop: {self.largest}"

    def table(self) -> tuple[tuple[object, ...], ...]:
        rows: list[tuple[object, ...]] = [("layer", "unit", "mean drop", "rows lowered")]
        for layer, drops in self.drops.items():
            for unit, column in zip(self.units[layer].tolist(), drops.T):
                rows.append((layer, unit, round(float(column.mean()), 6), f"{float((column > 0).double().mean()):.0%}"))
        return tuple(rows)


def zero_unit(dim: int, unit: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit`` for ``ctx.record``: the layer's value with ``unit`` along ``dim`` set to 0."""
    return lambda value: value.index_fill(dim, torch.tensor([unit], device=value.device), 0.0)


class UnitAblation(pyengine.Technique):
    name = "unit-ablation"
    summary = "the drop of the target score when one unit of a layer is set to zero, per input and unit"
    Options = AblationOptions
    needs_data: ClassVar[bool] = True  # reads rows: the inputs, else the dataset
    explains_inputs: ClassVar[bool] = True  # one result per input: the demo gives it a few

    def run(self, ctx: pyengine.Context, options: AblationOptions) -> AblationResult:
        layers = options.layers or ctx.default_layers(self.name, from_store=False)
        example = ctx.example_inputs(self.name)
        with torch.no_grad(), ctx.record(layers) as seen:  # a mistyped layer fails here, as in any built-in
            ctx.forward(example)
            shapes = {layer: tuple(seen[layer].shape) for layer in layers}
        axes = ctx.unit_axes("auto", self.name, layers)
        chosen: dict[str, torch.Tensor] = {}
        for layer in layers:  # the same draws on every process: the rng is seeded by the run's seed
            count = shapes[layer][axes.dim(layer, shapes[layer])]
            picked = torch.randperm(count, generator=ctx.rng) if options.units and count > options.units else None
            chosen[layer] = picked[: options.units].sort().values if picked is not None else torch.arange(count)

        source = ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name, split=True)
        drops: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        targets, index, offset = [], [], source.offset
        with ctx.progress(source.count, self.name) as bar, torch.no_grad():
            for rows in source:
                inputs = rows.model_inputs()
                wanted = resolve_targets(options.target, ctx, inputs, rows.labels, offset, options.position)
                base = target_scores(ctx.forward(inputs), wanted, inputs, options.position)[:, 0]
                for layer in layers:
                    dim, per_unit = axes.dim(layer, shapes[layer]), []
                    for unit in chosen[layer].tolist():
                        with ctx.record([layer], edit={layer: zero_unit(dim, unit)}):
                            ablated = target_scores(ctx.forward(inputs), wanted, inputs, options.position)[:, 0]
                        per_unit.append((base - ablated).float().cpu())
                    drops[layer].append(torch.stack(per_unit, 1))
                targets.append(wanted[:, 0])
                index.append(rows.index)
                offset += len(rows)
                bar.update(len(rows))
        gathered = {layer: ctx.gather_rows(torch.cat(parts)) for layer, parts in drops.items()}
        means = {layer: values.mean(0) for layer, values in gathered.items()}
        top_layer = max(layers, key=lambda layer: float(means[layer].max()))
        top = int(means[top_layer].argmax())
        return AblationResult(
            units=chosen,
            drops=gathered,
            targets=ctx.gather_rows(torch.cat(targets)),
            index=ctx.gather_rows(torch.cat(index)),
            unit_axis=axes.names(),
            largest=f"{top_layer} unit {int(chosen[top_layer][top])}: {float(means[top_layer][top]):.4g}",
            figures=(drop_figure(layers, means),),
        )


def drop_figure(layers: tuple[str, ...], means: dict[str, torch.Tensor]) -> pyengine.Figure:
    """Mean drops as a heatmap: a row per layer, its ablated units by drop, largest first."""
    width = max(values.numel() for values in means.values())
    table = torch.zeros(len(layers), width)
    for row, layer in enumerate(layers):
        ordered = means[layer].sort(descending=True).values
        table[row, : ordered.numel()] = ordered
    image = upscale(heatmap(table)[None], pixels=16 * max(table.shape))[0]
    return pyengine.Figure(
        "unit-ablation: mean drop of the target score",
        image=image,
        caption=f"rows: {', '.join(layers)}; columns: ablated units, largest drop first; "
        "red: zeroing the unit lowers the target score, blue: raises it",
    )
