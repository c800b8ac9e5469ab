"""What does a unit respond to? ``filters`` (first-layer weights), ``activations`` (feature maps
of given inputs) and ``max-patches`` (the dataset inputs and positions that drive each channel
most, cropped to the unit's exact receptive field, streamed through the ``topk_update`` op).

Units are found by ``pyengine.units`` (option ``units``): a conv map's channels, a
transformer's features; max-patches needs a 2-D grid of positions, so it takes (B, C, H, W)
maps (channels-last (B, H, W, C) ones too) and (B, units) layers, and refuses token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pyengine import ops
from pyengine.attribution import GuidedReLUs
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.figures import image_grid, normalise_each, upscale
from pyengine.layers import conv_layers
from pyengine.plugins.features._receptive import LayerField, receptive_field
from pyengine.technique import Figure, Options, Result, RowOptions, Technique, UnitRef, bad_option, layer_tuple, option
from pyengine.units import UNITS_DOC, UnitAxes, as_unit_matrix

# --- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiltersOptions(Options):
    layers: tuple[str, ...] = option((), "one Conv2d; default: the first one")

    def validate(self) -> None:
        self._set("layers", layer_tuple(self.layers, single=True))


@dataclass(frozen=True, kw_only=True)
class FiltersResult(Result):
    layer: str
    weights: torch.Tensor  # (out, in, kh, kw) as in the model
    images: torch.Tensor  # per filter normalised to [0, 1]: (out, 3, kh, kw) for RGB, else (out * in, 1, kh, kw)

    def summary(self) -> str:
        out, cin, kh, kw = self.weights.shape
        return f"{self.layer}: {out} filters of {cin} x {kh} x {kw}"


class Filters(Technique):
    name = "filters"
    summary = "the first conv layer's weights as images, each filter normalised (RGB in colour)"
    Options = FiltersOptions

    def run(self, ctx: Context, options: FiltersOptions) -> FiltersResult:
        layer = options.layers[0] if options.layers else conv_layers(ctx.model, self.name)[0]
        module = ctx.module(layer)
        if not isinstance(module, nn.Conv2d):
            raise PyengineError(f"{self.name}: layer {layer!r} is a {type(module).__name__}; expected an nn.Conv2d")
        weights = module.weight.detach().float().cpu()
        images = normalise_each(weights)
        if weights.shape[1] != 3:  # one grey tile per (filter, input channel), a row per filter
            images = normalise_each(weights.reshape(-1, 1, *weights.shape[2:]))
        columns = 8 if weights.shape[1] == 3 else weights.shape[1]
        caption = (
            "each filter scaled to its own range; RGB filters in colour"
            if weights.shape[1] == 3
            else f"a row per filter, a tile per input channel ({weights.shape[1]}), each filter scaled to its range"
        )
        figure = Figure(f"{layer}: filters", image=image_grid(upscale(images, 24), columns=columns), caption=caption)
        return FiltersResult(layer=layer, weights=weights, images=images, figures=(figure,))


# --- activations ------------------------------------------------------------------------------


ROWS_SHOWN = 4  # rows shown when stop is 0


@dataclass(frozen=True)
class ActivationsOptions(RowOptions):
    stop: int = option(0, f"end of the rows shown (exclusive); 0: the first {ROWS_SHOWN} (or all, if fewer)")
    layers: tuple[str, ...] = option(
        (), "one layer; default: the first conv's output after its normalisation and nonlinearity"
    )
    max_channels: int = option(32, "channels shown per input")
    units: str = option("auto", UNITS_DOC)

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        self.require_int("max_channels")
        _check_units(self.units)


@dataclass(frozen=True, kw_only=True)
class ActivationsResult(Result):
    layer: str
    maps: torch.Tensor  # the layer's values as recorded: (inputs, C, H, W), (inputs, T, D), (inputs, F), ...
    zero_fraction: float  # share of exact zeros (dead after ReLU)
    channel_zero_fraction: torch.Tensor  # (units,): per unit (channel, feature), over inputs and positions
    channel_max: torch.Tensor  # (units,)
    scale: float  # the shared figure scale: white = this value
    unit_axis: str  # where the units are: 'channels' (dim 1), 'last', 'units' (rows of units), 'dim k'

    def summary(self) -> str:
        kind = "channels" if self.unit_axis == "channels" else "units"
        where = "" if self.unit_axis in ("channels", "units") else f" ({self.unit_axis} dim)"
        return (
            f"{self.layer}: {self.channel_max.numel()} {kind}{where}, {self.zero_fraction:.1%} zeros, "
            f"max {float(self.channel_max.max()):.3g}"
        )


class Activations(Technique):
    name = "activations"
    summary = "a layer's feature maps for given inputs on one shared scale, with zero fractions and maxima"
    Options = ActivationsOptions
    needs_data: ClassVar[bool] = True
    explains_inputs: ClassVar[bool] = True

    def run(self, ctx: Context, options: ActivationsOptions) -> ActivationsResult:
        layer = options.layers[0] if options.layers else ctx.first_block(self.name)
        blocks = ctx.activations(
            (layer,),
            batch_size=options.batch_size,
            start=options.start,
            stop=options.stop,
            at_most=ROWS_SHOWN,
            technique=self.name,
        )
        axes = ctx.unit_axes(options.units, self.name, (layer,))
        read = [(rows.mask, values[layer].float().cpu()) for rows, values in blocks]
        maps = torch.cat([value for _, value in read])
        masks = [mask for mask, _ in read]
        mask = torch.cat([m.cpu() for m in masks]) if all(m is not None for m in masks) else None  # type: ignore[union-attr]
        dim = axes.dim(layer, tuple(maps.shape))
        per_channel = as_unit_matrix(maps, dim, mask).T  # a token sequence's padding dropped
        scale = float(per_channel.abs().max().clamp(min=1e-12))
        figures = []
        if maps.dim() == 4 and dim in (1, 3):  # channel maps (channels-last ones moved first)
            shown = maps.movedim(dim, 1)[:, : options.max_channels]
            low = 0.0 if float(maps.min()) >= 0 else -scale
            for k in range(shown.shape[0]):
                tiles = ((shown[k] - low) / (scale - low)).unsqueeze(1)
                figures.append(
                    Figure(
                        f"{layer}: feature maps of input {k}",
                        image=image_grid(upscale(tiles, 32), columns=8),
                        caption=f"shared scale: black = {low:.3g}, white = {scale:.3g}",
                    )
                )
        return ActivationsResult(
            layer=layer,
            maps=maps,
            zero_fraction=float((per_channel == 0).double().mean()),
            channel_zero_fraction=(per_channel == 0).double().mean(1),
            channel_max=per_channel.amax(1),
            scale=scale,
            unit_axis=axes.names()[layer],
            figures=tuple(figures),
        )


# --- maximally activating patches -------------------------------------------------------------


@dataclass(frozen=True)
class MaxPatchesOptions(RowOptions):
    batch_size: int = option(256, "rows per step")
    layers: tuple[str, ...] = option(
        (), "one layer; default: the last (N, C, H, W) output every path to the output goes through"
    )
    channels: tuple[int, ...] = option((), "channels (units, for dense layers) to rank inputs for; default: all")
    k: int = option(9, "top inputs kept per channel")
    guided: bool = option(False, "pair each patch with its guided-backprop map toward the unit")
    figure_channels: int = option(8, "channels shown in the figures")
    units: str = option("auto", UNITS_DOC)
    context: int = option(4, "token models: tokens shown on each side of a text's top token")

    def validate(self) -> None:
        super().validate()
        _check_units(self.units)
        self.require_int("context", minimum=0)
        self._set("layers", layer_tuple(self.layers, single=True))
        self._set("channels", tuple(self.channels) if not isinstance(self.channels, int) else (self.channels,))
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.channels):
            raise bad_option("channels", self.channels, "channel indices >= 0")
        self.require_int("k", "figure_channels")


@dataclass(frozen=True, kw_only=True)
class MaxPatchesResult(Result):
    layer: str
    channels: torch.Tensor  # (C',)
    values: torch.Tensor  # (C', k) activation, descending
    index: torch.Tensor  # (C', k) dataset indices (ties: lower index first)
    position: torch.Tensor  # (C', k, 2) y, x of the unit in the layer (0, 0 for dense layers; token, 0 for texts)
    patches: torch.Tensor  # (C', k, in_channels, field_h, field_w): the unit's field, zero outside it
    guided: torch.Tensor  # same shape: guided-backprop maps toward each unit (empty without guided)
    boxes: torch.Tensor  # (C', k, 4) y0, y1, x0, x1: each unit's exact field in its input (end exclusive)
    field_size: str
    field_jump: str
    also_global: str  # ops through which the units also depend on the whole input ("" if none)
    scanned: int  # rows scanned
    unit_axis: str  # where the layer's units are: 'channels' (dim 1), 'last' (a channels-last map), 'units'
    texts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # token models: (C', k, 2 * context + 1) the ids around each top token (-1 past the text's ends)

    def summary(self) -> str:
        if self.texts.numel():
            return (
                f"{self.layer}: top {self.values.shape[1]} of {self.scanned} texts for {self.values.shape[0]} features "
                f"({self.texts.shape[2]} tokens shown around each top token)"
            )
        text = (
            f"{self.layer}: top {self.values.shape[1]} of {self.scanned} inputs for {self.values.shape[0]} channels, "
            f"receptive field {self.field_size} (jump {self.field_jump})"
        )
        if not self.also_global:
            return text
        gates = self.also_global.split("; ")
        more = f" and {len(gates) - 1} more" if len(gates) > 1 else ""
        return f"{text}; also the whole input through {gates[0]}{more}"

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per channel: the unit, its top activation, the mean of its top k, the dataset rows of its top 3."""
        rows: list[tuple[object, ...]] = [("unit", "top activation", f"mean of top {self.values.shape[1]}", "top rows")]
        for row, channel in enumerate(self.channels.tolist()):
            top = ", ".join(str(int(i)) for i in self.index[row, :3].tolist())
            values = self.values[row].float()
            rows.append(
                (UnitRef(self.layer, int(channel)), f"{float(values[0]):.4g}", f"{float(values.mean()):.4g}", top)
            )
        return tuple(rows)


def _merged(ctx: Context, top: tuple[torch.Tensor, ...], scanned: int, k: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """Several processes: their top-k lists merged by the same rule (equal to one process's), and
    the rows they scanned added up."""
    if not ctx.ranks.active:
        return top, scanned
    values, ids, payload = ops.topk_merge([(v, i, p) for v, i, p in ctx.all_gather(tuple(top))], k)
    device = top[0].device
    return (values.to(device), ids.to(device), payload.to(device)), int(ctx.all_reduce(torch.tensor(scanned)))


class MaxPatches(Technique):
    name = "max-patches"
    summary = "per channel, the top-k dataset inputs and positions, cropped to the unit's exact receptive field"
    Options = MaxPatchesOptions
    needs_data: ClassVar[bool] = True

    def run(self, ctx: Context, options: MaxPatchesOptions) -> MaxPatchesResult:
        if ctx.data is None and ctx.inputs is None:
            raise PyengineError(f"{self.name} needs the inputs (to crop patches): pass data=<dataset> or inputs")
        layer = options.layers[0] if options.layers else ctx.spatial_layer(self.name)
        ctx.module(layer)
        axes = ctx.unit_axes(options.units, self.name, (layer,))
        example = ctx.example(self.name)  # None below: dense units
        if not example.is_floating_point() and example.dim() == 2:
            return self._texts(ctx, layer, options, axes)
        field = receptive_field(ctx, layer, example, self.name, axes.dim(layer, _shape_of(ctx, layer, example)))
        top, channels, spatial, scanned = self._stream(ctx, layer, options, axes)
        if options.k > scanned:
            raise PyengineError(
                f"{self.name}: k={options.k} is larger than the {scanned} rows scanned; expected k <= {scanned}"
            )
        if field is not None and spatial != field.layer_size:
            raise PyengineError(
                f"{self.name}: {layer!r} maps are {spatial} in the rows scanned but {field.layer_size} for the "
                "first input; expected inputs of one size"
            )
        values, ids, where = top
        position = (
            torch.stack([where // max(spatial[1], 1), where % max(spatial[1], 1)], -1)
            if field is not None
            else torch.zeros(*where.shape, 2, dtype=torch.long)
        )
        patches, guided, boxes = self._crop(
            ctx, layer, axes.dims[layer], channels, ids, position, field, options.guided
        )
        figures = _patch_figures(layer, channels, patches, guided, values, options.figure_channels)
        return MaxPatchesResult(
            layer=layer,
            channels=channels,
            values=values.float(),
            index=ids,
            position=position,
            patches=patches,
            guided=guided,
            boxes=boxes,
            field_size=field.describe() if field else "whole input",
            field_jump=f"{field.jump[0]}x{field.jump[1]}" if field else "-",
            also_global="; ".join(field.also_global) if field else "",
            scanned=scanned,
            unit_axis=axes.names()[layer],
            figures=figures,
        )

    def _texts(self, ctx: Context, layer: str, options: MaxPatchesOptions, axes: UnitAxes) -> MaxPatchesResult:
        """Token models: per feature of a (B, T, D) layer, the k texts and real tokens where it is
        largest, with the ids around each (padding never ranks)."""
        top: tuple[torch.Tensor, ...] = ()
        channels = torch.tensor(options.channels, dtype=torch.long)
        scanned = 0
        blocks = ctx.activations(
            (layer,),
            batch_size=options.batch_size,
            start=options.start,
            stop=options.stop,
            technique=self.name,
            split=True,
        )
        with ctx.progress(blocks.count, self.name) as bar:
            for rows, block in blocks:
                value = block[layer]
                dim = axes.dim(layer, tuple(value.shape))
                if value.dim() != 3 or dim != 2:
                    raise PyengineError(
                        f"{self.name}: on token inputs the layer needs (B, T, D) values with the features last; "
                        f"{layer!r} gives {tuple(value.shape)} with its units on dim {dim}"
                    )
                a = value.float()
                if rows.mask is not None:
                    a = a.masked_fill(rows.mask.to(a.device)[..., None] == 0, float("-inf"))
                a = a.transpose(1, 2)  # (B, D, T)
                if not top:
                    width = a.shape[1]
                    if options.channels and max(options.channels) >= width:
                        raise PyengineError(
                            f"{self.name}: channel {max(options.channels)} is out of range: {layer!r} has {width} units"
                        )
                    channels = channels if options.channels else torch.arange(width)
                    top = ops.topk_empty(len(channels), options.k, a.device)
                best, where = a[:, channels.to(a.device)].max(-1)
                ops.topk_update(best, rows.index.to(a.device), where.contiguous(), *top)
                scanned += len(rows)
                bar.update(len(rows))
        top, scanned = _merged(ctx, top, scanned, options.k)
        if options.k > scanned:
            raise PyengineError(
                f"{self.name}: k={options.k} is larger than the {scanned} rows scanned; expected k <= {scanned}"
            )
        values, ids, where = (t.cpu() for t in top)
        texts, first, end = self._spans(ctx, ids, where, options.context)
        c, k = ids.shape
        return MaxPatchesResult(
            layer=layer,
            channels=channels,
            values=values.float(),
            index=ids,
            position=torch.stack([where, torch.zeros_like(where)], -1),
            patches=torch.zeros(0),
            guided=torch.zeros(0),
            boxes=torch.stack([first, end, torch.zeros_like(first), torch.ones_like(first)], -1).reshape(c, k, 4),
            field_size=f"{2 * options.context + 1} tokens",
            field_jump="-",
            also_global="",
            scanned=scanned,
            unit_axis=axes.names()[layer],
            texts=texts.reshape(c, k, -1),
        )

    def _spans(
        self, ctx: Context, ids: torch.Tensor, where: torch.Tensor, context: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C' * k, 2 * context + 1) token ids around each top position (-1 outside the real
        text), and the first and end (exclusive) token positions shown."""
        rows = ids.flatten().tolist()
        if ctx.given is not None:
            part = ctx.given.take(rows)
            tokens, mask = part.main.cpu(), part.mask
        elif ctx.data is not None:
            batch = ctx.data.batch(rows)
            tokens, mask = batch.inputs.cpu(), batch.extra.get("attention_mask")
        else:
            raise PyengineError(f"{self.name} needs the inputs (to show texts): pass data=<dataset> or inputs")
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.cpu() != 0
        offsets = torch.arange(-context, context + 1)
        at = where.flatten()[:, None] + offsets  # (n, window)
        inside = (at >= 0) & (at < tokens.shape[1])
        clipped = at.clamp(0, tokens.shape[1] - 1)
        picked = tokens.gather(1, clipped)
        keep = inside & real.gather(1, clipped)
        shown = torch.where(keep, at, torch.full_like(at, -1))
        first = torch.where(keep, at, torch.full_like(at, tokens.shape[1])).amin(1)
        return torch.where(keep, picked, torch.full_like(picked, -1)), first, shown.amax(1) + 1

    @staticmethod
    def _inputs(ctx: Context, ids: torch.Tensor) -> torch.Tensor:
        """The inputs at rows ``ids`` of the source the activations came from (CPU)."""
        if ctx.inputs is not None:
            return ctx.inputs[ids.flatten()].cpu()
        if ctx.data is None:
            raise PyengineError("max-patches needs the inputs (to crop patches): pass data=<dataset> or inputs")
        return ctx.data.batch(ids.flatten().tolist()).inputs

    def _stream(
        self, ctx: Context, layer: str, options: MaxPatchesOptions, axes: UnitAxes
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple[int, ...], int]:
        top: tuple[torch.Tensor, ...] = ()
        channels = torch.tensor(options.channels, dtype=torch.long)
        spatial: tuple[int, ...] = ()
        scanned = 0
        blocks = ctx.activations(
            (layer,),
            batch_size=options.batch_size,
            start=options.start,
            stop=options.stop,
            technique=self.name,
            split=True,
        )
        with ctx.progress(blocks.count, self.name) as bar:
            for rows, values in blocks:
                a = _channels_first(values[layer], layer, axes, self.name)
                if not top:
                    width = a.shape[1]
                    if options.channels and max(options.channels) >= width:
                        raise PyengineError(
                            f"{self.name}: channel {max(options.channels)} is out of range: {layer!r} "
                            f"has {width} channels"
                        )
                    channels = channels if options.channels else torch.arange(width)
                    spatial = tuple(a.shape[2:])
                    top = ops.topk_empty(len(channels), options.k, a.device)
                a = a[:, channels.to(a.device)]
                if a.dim() > 2:
                    best, where = a.flatten(2).max(-1)
                else:
                    best, where = a, torch.zeros_like(a, dtype=torch.long)
                ops.topk_update(best, rows.index.to(a.device), where.contiguous(), *top)
                scanned += len(rows)
                bar.update(len(rows))
        top, scanned = _merged(ctx, top, scanned, options.k)
        return tuple(t.cpu() for t in top), channels, spatial, scanned

    def _crop(
        self,
        ctx: Context,
        layer: str,
        dim: int,
        channels: torch.Tensor,
        ids: torch.Tensor,
        position: torch.Tensor,
        field: LayerField | None,
        guided: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each unit's exact field cut from its input, in the frame of the fields' hull (so units of
        channels with smaller fields, after a concatenation, sit where they are in that frame)."""
        inputs = self._inputs(ctx, ids)
        c, k = ids.shape
        height, width = inputs.shape[-2:]
        if field is not None and (height, width) != field.image:
            raise PyengineError(
                f"{self.name}: the inputs are {height} x {width} but the receptive field was found for "
                f"{field.image[0]} x {field.image[1]}; expected inputs of one size"
            )
        size = field.size if field else (height, width)
        patches = torch.zeros(c * k, inputs.shape[1], *size)
        units = channels.repeat_interleave(k).tolist()
        maps = (
            guided_maps(ctx, layer, inputs, channels.repeat_interleave(k), position.reshape(-1, 2), dim)
            if guided
            else None
        )
        guided_patches = torch.zeros_like(patches) if guided else torch.zeros(0)
        boxes = torch.zeros(c * k, 4, dtype=torch.long)
        for n in range(c * k):
            y, x = (int(v) for v in position.reshape(-1, 2)[n])
            y0, y1, x0, x1 = field.field(units[n]).box(y, x) if field else (0, height, 0, width)
            oy, ox = field.hull.origin(y, x) if field else (0, 0)
            patches[n, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = inputs[n, :, y0:y1, x0:x1]
            if maps is not None:
                guided_patches[n, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = maps[n, :, y0:y1, x0:x1]
            boxes[n] = torch.tensor([y0, y1, x0, x1])
        shape = (c, k, *patches.shape[1:])
        return (
            patches.reshape(shape),
            guided_patches.reshape(shape) if guided else guided_patches,
            boxes.reshape(c, k, 4),
        )


def _shape_of(ctx: Context, layer: str, example: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``layer``'s values for one example row."""
    with torch.no_grad(), ctx.record([layer]) as seen:
        ctx.model(example[:1].to(ctx.device))
    return tuple(seen[layer].shape)


def guided_maps(
    ctx: Context, layer: str, inputs: torch.Tensor, channels: torch.Tensor, position: torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """Guided backprop of unit (channel, y, x) of ``layer`` (its channels on ``dim``: 1, or 3 for a
    channels-last map) toward each input: (N, C, H, W)."""
    x = inputs.to(ctx.device).detach().requires_grad_(True)
    with ctx.record([layer], grad=True) as seen, torch.enable_grad():
        with GuidedReLUs():
            ctx.model(x)
        out = seen[layer]
        if out.dim() == 4 and dim == 3:
            out = out.movedim(3, 1)
        rows = torch.arange(len(x), device=out.device)
        if out.dim() == 4:
            units = out[rows, channels.to(out.device), position[:, 0].to(out.device), position[:, 1].to(out.device)]
        else:
            units = out[rows, channels.to(out.device)]
        grads = torch.autograd.grad(units.sum(), x)[0]
    return grads.detach().cpu()


def _check_units(value: str) -> None:
    if value not in ("auto", "channels", "last"):
        raise bad_option("units", value, "'auto', 'channels' or 'last'")


def _channels_first(values: torch.Tensor, layer: str, axes: UnitAxes, technique: str) -> torch.Tensor:
    """A layer's values as (B, C, H, W) channel maps or (B, units); an error for other layouts."""
    dim = axes.dim(layer, tuple(values.shape))
    if values.dim() == 2 or (values.dim() == 4 and dim == 1):
        return values
    if values.dim() == 4 and dim == 3:
        return values.movedim(3, 1)
    shape = "(" + ", ".join(["B", *map(str, values.shape[1:])]) + ")"
    raise PyengineError(
        f"{technique}: layer {layer!r} has values {shape} with its {values.shape[dim]} units on dim {dim}: its "
        "positions are no 2-D grid over the image (a token sequence?), so there is no patch to crop; "
        "pick a (B, C, H, W) conv layer or a (B, units) layer"
    )


def _patch_figures(
    layer: str, channels: torch.Tensor, patches: torch.Tensor, guided: torch.Tensor, values: torch.Tensor, shown: int
) -> tuple[Figure, ...]:
    if patches.dim() != 5 or patches.shape[2] not in (1, 3):
        return ()
    figures = []
    for row, channel in enumerate(channels[:shown].tolist()):
        tiles = [patches[row]]
        if guided.numel():
            tiles.append(normalise_each(guided[row]))
        grid = image_grid(upscale(torch.cat(tiles)), columns=patches.shape[1])
        best = ", ".join(f"{v:.3g}" for v in values[row].tolist())
        if not bool((values[row] > 0).any()):
            best += " — the unit never fires on these inputs (dead): the patches are arbitrary"
        figures.append(
            Figure(
                f"{layer} channel {channel}: top {patches.shape[1]} patches"
                + (" (row 2: guided backprop)" if guided.numel() else ""),
                image=grid,
                caption=f"activations {best}",
            )
        )
    return tuple(figures)
