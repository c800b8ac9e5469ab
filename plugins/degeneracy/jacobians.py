"""``jacobian-gram``: E[JᵀJ] for J = ∂(target)/∂(layer), its spectrum and effective rank.

Directions of a layer that never move the target (the next layer or the output) are
degenerate: they are the near-zero eigenvalues of the Jacobian Gram. Rows of J come from
batched vector-Jacobian products: one per output coordinate (exact), or from random ±1
sources when the target is wide (E[ssᵀ] = I, so E[(Jᵀs)(Jᵀs)ᵀ] = JᵀJ). The rows are
accumulated in float64 by ``pyengine.ops.gram_accumulate``.
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
from pyengine.units import as_unit_matrix


@dataclass(frozen=True)
class JacobianGramOptions(RowOptions):
    layers: tuple[str, ...] = option((), "layers analysed; default: every nonlinearity's output (ReLU, GELU, ...)")
    target_layer: str = option("", "layer whose output J differentiates; '': the model output")
    sources: str = option("auto", "'exact' (one VJP per target coordinate), 'random' (±1), or 'auto'")
    random_sources: int = option(64, "VJPs per input with random sources ('auto' uses them above this width)")
    units: str = option("auto", UNITS_OPTION_DOC + "; the Gram sums over positions")
    cutoffs: tuple[float, ...] = option((1e-3, 1e-6), "relative eigenvalue cut-offs: rank = #eigenvalues > t * largest")
    variance: tuple[float, ...] = option((0.9, 0.99), "rank = #components explaining this fraction")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        if not isinstance(self.target_layer, str):
            raise bad_option("target_layer", self.target_layer, "a layer reference, or '' for the model output")
        self._set("cutoffs", tuple(float(t) for t in self.cutoffs))
        self._set("variance", tuple(float(v) for v in self.variance))
        if self.sources not in ("auto", "exact", "random"):
            raise bad_option("sources", self.sources, "'auto', 'exact' or 'random'")
        check_units(self.units)
        if not all(0 < t < 1 for t in self.cutoffs):
            raise bad_option("cutoffs", self.cutoffs, "relative cut-offs in (0, 1)")
        if not all(0 < v <= 1 for v in self.variance):
            raise bad_option("variance", self.variance, "explained-variance fractions in (0, 1]")
        self.require_int("random_sources")


@dataclass(frozen=True, kw_only=True)
class JacobianGramResult(Result):
    gram: dict[str, torch.Tensor]  # E[JᵀJ] per layer (units x units), float64
    eigenvalues: dict[str, torch.Tensor]  # descending
    rank: dict[str, int]  # "<layer> rel<t" and "<layer> var<v>"
    units: dict[str, int]
    sources: str
    unit_axis: dict[str, str]  # where each layer's units are: 'channels', 'last', 'units', 'flatten', 'dim k'

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per layer: units, where they are, and the Jacobian Gram's effective rank at each cut-off."""
        return rank_table(self.units, self.rank, self.unit_axis)

    def lines(self) -> list[str]:
        return [
            f"layer {layer}: {width} units{axis_note(self.unit_axis.get(layer, 'units'))}, Jacobian Gram "
            f"{rank_text(self.rank, layer)} ({self.sources} sources)"
            for layer, width in self.units.items()
        ]

    def summary(self) -> str:
        return "; ".join(self.lines())


class JacobianGram(Technique):
    name = "jacobian-gram"
    summary = "E[JᵀJ] of each layer towards the output (or a target layer): directions that never matter"
    Options = JacobianGramOptions
    needs_data = True

    def run(self, ctx: Context, options: JacobianGramOptions) -> JacobianGramResult:
        layers = options.layers or ctx.default_layers(self.name, from_store=False)
        target = options.target_layer
        recorded = [*layers, target] if target else list(layers)
        axes = ctx.unit_axes(options.units, self.name, layers)
        source = ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name, split=True)
        batches = list(source)
        first_batch = source.offset // options.batch_size  # whole batches: this part's first batch's number
        grams: dict[str, torch.Tensor] = {}
        count = 0
        chosen = options.sources
        with ctx.record(recorded, grad=True) as seen, ctx.progress(len(batches), self.name) as bar:
            for number, batch in enumerate(batches, first_batch):
                # random sources drawn per batch, from the seed and the batch's number: the same
                # vectors however many processes split the batches
                generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + number)
                with torch.enable_grad():
                    output = ctx.forward(batch)
                    leaves = [seen[layer] for layer in layers]
                    axes.prepare({layer: tuple(leaf.shape) for layer, leaf in zip(layers, leaves)})
                    y = seen[target] if target else output
                    mask = batch.mask
                    if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
                        y = y * mask[..., None].to(y.device, y.dtype)  # a padded position is no output
                    y = y.flatten(1)
                    width = y.shape[1]
                    if chosen == "auto":
                        chosen = "random" if width > options.random_sources else "exact"
                    vectors = (
                        torch.eye(width, device=y.device).unsqueeze(1).expand(width, y.shape[0], width)
                        if chosen == "exact"
                        else (torch.randint(0, 2, (options.random_sources, *y.shape), generator=generator) * 2 - 1).to(
                            y.device, y.dtype
                        )
                    )
                    scale = 1.0 if chosen == "exact" else 1.0 / options.random_sources**0.5
                    for vector in vectors:
                        rows = torch.autograd.grad(y, leaves, grad_outputs=vector, retain_graph=True, allow_unused=True)
                        for layer, row in zip(layers, rows):
                            if row is None:
                                raise PyengineError(f"jacobian-gram: the target does not depend on layer {layer!r}")
                            x = as_unit_matrix(row.detach() * scale, axes.dims[layer], batch.mask)
                            if layer not in grams:
                                if x.shape[1] > MAX_UNITS:
                                    raise PyengineError(
                                        f"jacobian-gram: layer {layer!r} has {x.shape[1]} units (> {MAX_UNITS}) "
                                        f"on its {axes.names()[layer]} axis; choose other units or a narrower layer"
                                    )
                                grams[layer] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                            ops.gram_accumulate(grams[layer], x)
                count += len(batch)
                bar.update()
        note_units(ctx, axes)
        count = int(ctx.all_reduce(torch.tensor(count)))  # several processes: sums of their parts
        grams = {layer: ctx.all_reduce(gram) for layer, gram in grams.items()}
        eigenvalues, ranks, means = {}, {}, {}
        for layer in layers:
            means[layer] = (grams[layer] / count).cpu()
            values, _ = ops.gram_eigh(grams[layer], n=count)
            eigenvalues[layer] = values.cpu()
            ranks.update(effective_ranks(eigenvalues[layer], layer, options.cutoffs, options.variance))
        curves = {layer: (v.clamp(min=1e-300) / v.clamp(min=1e-300)[0]).tolist() for layer, v in eigenvalues.items()}
        figure = Figure(
            "Jacobian Gram eigenspectrum (relative to the largest)",
            lines=curves,
            log_y=True,
            xlabel="eigenvalue index",
            ylabel="λ / λ_max",
        )
        return JacobianGramResult(
            gram=means,
            eigenvalues=eigenvalues,
            rank=ranks,
            units={k: int(v.shape[0]) for k, v in means.items()},
            sources=chosen,
            unit_axis=axes.names(),
            figures=(figure,),
        )
