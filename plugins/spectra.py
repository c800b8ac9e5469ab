"""``gram-spectrum``: per-layer activation Gram eigenspectra and effective rank.

Redundant units show up as (near-)zero eigenvalues: a layer of units [a, 2a, b, a+b] has
rank 2. The Gram matrix is accumulated in float64 by ``pyengine.ops.gram_accumulate``,
streaming from the store or from a fresh pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.hookspecs import hookimpl
from pyengine.technique import Figure, Options, Result, Technique, bad_option

MAX_UNITS = 8192


@dataclass(frozen=True)
class GramSpectrumOptions(Options):
    layers: tuple[str, ...] = ()  # default: the stored layers, else every ReLU module
    center: bool = True  # covariance (centred) rather than second moment
    thresholds: tuple[float, ...] = (1e-3, 1e-6)  # rank = #eigenvalues > t * largest
    variance: tuple[float, ...] = (0.9, 0.99)  # rank = #components explaining this fraction
    conv_units: str = "channels"  # conv maps: "channels" (positions are samples) or "flatten"
    batch_size: int = 256
    max_rows: int = 0  # 0: the whole dataset

    def validate(self) -> None:
        if isinstance(self.layers, str):
            self._set("layers", (self.layers,))
        self._set("layers", tuple(self.layers))
        self._set("thresholds", tuple(float(t) for t in self.thresholds))
        self._set("variance", tuple(float(v) for v in self.variance))
        if not all(0 < t < 1 for t in self.thresholds):
            raise bad_option("thresholds", self.thresholds, "relative cut-offs in (0, 1)")
        if not all(0 < v <= 1 for v in self.variance):
            raise bad_option("variance", self.variance, "explained-variance fractions in (0, 1]")
        if self.conv_units not in ("channels", "flatten"):
            raise bad_option("conv_units", self.conv_units, "'channels' or 'flatten'")
        self.require_int("batch_size")
        self.require_int("max_rows", minimum=0)


@dataclass(frozen=True, kw_only=True)
class GramSpectrumResult(Result):
    eigenvalues: dict[str, torch.Tensor]  # per layer, descending, float64
    units: dict[str, int]  # layer width (units)
    samples: dict[str, int]  # rows accumulated
    rank: dict[str, int]  # "<layer> rel<t" and "<layer> var<v>" -> effective rank

    def summary(self) -> str:
        return "; ".join(self.lines())

    def lines(self) -> list[str]:
        """The redundancy report, e.g. ``layer X: 512 units, rank 37 at 1e-06``."""
        return [f"layer {layer}: {width} units, {rank_text(self.rank, layer)}" for layer, width in self.units.items()]


def rank_text(rank: dict[str, int], layer: str) -> str:
    """``rank 37 at 0.001, rank 40 at 1e-06`` for one layer's relative cut-offs."""
    return ", ".join(f"rank {value} at {key.split(' rel<')[1]}" for key, value in rank.items()
                     if key.startswith(f"{layer} rel<"))


def as_rows(activation: torch.Tensor, conv_units: str) -> torch.Tensor:
    """(B, C, *spatial) -> (B * positions, C) for channels; otherwise (B, features)."""
    if activation.dim() > 2 and conv_units == "channels":
        return activation.movedim(1, -1).reshape(-1, activation.shape[1])
    return activation.reshape(activation.shape[0], -1)


def effective_ranks(values: torch.Tensor, layer: str, thresholds: tuple[float, ...],
                    variance: tuple[float, ...]) -> dict[str, int]:
    clipped = values.clamp(min=0)
    top = float(clipped[0]) if clipped.numel() else 0.0
    total = float(clipped.sum())
    cumulative = clipped.cumsum(0) / total if total > 0 else clipped
    ranks = {f"{layer} rel<{t:g}": int((clipped > t * top).sum()) if top > 0 else 0 for t in thresholds}
    for v in variance:
        ranks[f"{layer} var{v:g}"] = int((cumulative < v - 1e-12).sum()) + 1 if total > 0 else 0
    return ranks


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
        total = len(ctx.store) if ctx.store is not None else (len(ctx.data) if ctx.data is not None else None)
        with ctx.progress(total, "gram-spectrum") as bar:
            for block in ctx.activations(layers, batch_size=options.batch_size, max_rows=options.max_rows,
                                         technique=self.name):
                for layer, activation in block.items():
                    x = as_rows(activation, options.conv_units)
                    if layer not in grams:
                        if x.shape[1] > MAX_UNITS:
                            raise PyengineError(
                                f"gram-spectrum: layer {layer!r} has {x.shape[1]} units (> {MAX_UNITS}); "
                                "use conv_units='channels' or a narrower layer")
                        grams[layer] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                        sums[layer] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                        rows[layer] = 0
                    ops.gram_accumulate(grams[layer], x, sums[layer])
                    rows[layer] += x.shape[0]
                bar.update(next(iter(block.values())).shape[0])
        eigenvalues, ranks = {}, {}
        for layer in layers:
            if rows.get(layer, 0) == 0:
                raise PyengineError(f"gram-spectrum: no rows for layer {layer!r}")
            values, _ = ops.gram_eigh(grams[layer], n=rows[layer], center_sums=sums[layer] if options.center else None)
            eigenvalues[layer] = values.cpu()
            ranks.update(effective_ranks(eigenvalues[layer], layer, options.thresholds, options.variance))
        curves = {layer: (v.clamp(min=1e-300) / v.clamp(min=1e-300)[0]).tolist() for layer, v in eigenvalues.items()}
        figure = Figure("Gram eigenspectrum (relative to the largest)", lines=curves, log_y=True,
                        xlabel="eigenvalue index", ylabel="λ / λ_max")
        return GramSpectrumResult(eigenvalues=eigenvalues, units={k: int(v.shape[0]) for k, v in eigenvalues.items()},
                                  samples=rows, rank=ranks, figures=(figure,))


@hookimpl
def register_techniques(register: Any) -> None:
    register(GramSpectrum)
