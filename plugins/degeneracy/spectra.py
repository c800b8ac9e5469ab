"""``gram-spectrum``: per-layer activation Gram eigenspectra and effective rank.

Redundant units show up as (near-)zero eigenvalues: a layer of units [a, 2a, b, a+b] has
rank 2. The Gram matrix is accumulated in float64 by ``pyengine.ops.gram_accumulate``,
streaming from the store or from a fresh pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.degeneracy._ranks import (
    MAX_UNITS,
    UNITS_OPTION_DOC,
    axis_note,
    check_units,
    effective_ranks,
    note_units,
    rank_table,
    rank_text,
)
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, layer_tuple, option


@dataclass(frozen=True)
class GramSpectrumOptions(RowOptions):
    batch_size: int = option(256, "rows per step")
    layers: tuple[str, ...] = option(
        (), "layers analysed; default: the stored layers, else every nonlinearity's output (ReLU, GELU, ...)"
    )
    center: bool = option(True, "covariance (centred) rather than second moment")
    cutoffs: tuple[float, ...] = option((1e-3, 1e-6), "relative eigenvalue cut-offs: rank = #eigenvalues > t * largest")
    variance: tuple[float, ...] = option((0.9, 0.99), "rank = #components explaining this fraction of the variance")
    units: str = option("auto", UNITS_OPTION_DOC + "; positions are samples")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        self._set("cutoffs", tuple(float(t) for t in self.cutoffs))
        self._set("variance", tuple(float(v) for v in self.variance))
        if not all(0 < t < 1 for t in self.cutoffs):
            raise bad_option("cutoffs", self.cutoffs, "relative cut-offs in (0, 1)")
        if not all(0 < v <= 1 for v in self.variance):
            raise bad_option("variance", self.variance, "explained-variance fractions in (0, 1]")
        check_units(self.units)


@dataclass(frozen=True, kw_only=True)
class GramSpectrumResult(Result):
    eigenvalues: dict[str, torch.Tensor]  # per layer, descending, float64
    units: dict[str, int]  # layer width (units)
    samples: dict[str, int]  # rows accumulated
    rank: dict[str, int]  # "<layer> rel<t" and "<layer> var<v>" -> effective rank
    unit_axis: dict[str, str]  # where each layer's units are: 'channels', 'last', 'units', 'flatten', 'dim k'

    def summary(self) -> str:
        return "; ".join(self.lines())

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per layer: units, where they are, samples, and the effective rank at each cut-off."""
        return rank_table(self.units, self.rank, self.unit_axis, self.samples)

    def lines(self) -> list[str]:
        """The redundancy report, e.g. ``layer X: 512 units, rank 37 at 1e-06``."""
        return [
            f"layer {layer}: {width} units{axis_note(self.unit_axis.get(layer, 'units'))}, "
            f"{rank_text(self.rank, layer)}"
            for layer, width in self.units.items()
        ]


class GramSpectrum(Technique):
    name = "gram-spectrum"
    summary = "per-layer activation Gram eigenspectrum and effective rank (redundant directions)"
    Options = GramSpectrumOptions
    needs_data = True

    def run(self, ctx: Context, options: GramSpectrumOptions) -> GramSpectrumResult:
        layers = options.layers or ctx.default_layers(self.name)
        grams: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        axes = ctx.unit_axes(options.units, self.name, layers)
        source = ctx.activations(
            layers,
            batch_size=options.batch_size,
            start=options.start,
            stop=options.stop,
            technique=self.name,
            split=True,
        )
        with ctx.progress(source.count, "gram-spectrum") as bar:
            for block_rows, block in source:
                for layer, x in axes.matrices(block, block_rows.mask).items():
                    if layer not in grams:
                        if x.shape[1] > MAX_UNITS:
                            raise PyengineError(
                                f"gram-spectrum: layer {layer!r} has {x.shape[1]} units (> {MAX_UNITS}) on its "
                                f"{axes.names()[layer]} axis; choose other units or a narrower layer"
                            )
                        grams[layer] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                        sums[layer] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                        rows[layer] = 0
                    ops.gram_accumulate(grams[layer], x, sums[layer])
                    rows[layer] += x.shape[0]
                bar.update(len(block_rows))
        note_units(ctx, axes)
        for layer in grams:  # several processes: the sums of their parts, added in rank order
            grams[layer], sums[layer] = ctx.all_reduce(grams[layer]), ctx.all_reduce(sums[layer])
            rows[layer] = int(ctx.all_reduce(torch.tensor(rows[layer])))
        eigenvalues, ranks = {}, {}
        for layer in layers:
            if rows.get(layer, 0) == 0:
                raise PyengineError(f"gram-spectrum: no rows for layer {layer!r}")
            values, _ = ops.gram_eigh(grams[layer], n=rows[layer], center_sums=sums[layer] if options.center else None)
            eigenvalues[layer] = values.cpu()
            ranks.update(effective_ranks(eigenvalues[layer], layer, options.cutoffs, options.variance))
        curves = {layer: (v.clamp(min=1e-300) / v.clamp(min=1e-300)[0]).tolist() for layer, v in eigenvalues.items()}
        figure = Figure(
            "Gram eigenspectrum (relative to the largest)",
            lines=curves,
            log_y=True,
            xlabel="eigenvalue index",
            ylabel="λ / λ_max",
        )
        return GramSpectrumResult(
            eigenvalues=eigenvalues,
            units={k: int(v.shape[0]) for k, v in eigenvalues.items()},
            samples=rows,
            rank=ranks,
            unit_axis=axes.names(),
            figures=(figure,),
        )
