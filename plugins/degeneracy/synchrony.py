"""``relu-sync``: units that fire on the same inputs (a source of degeneracy).

A unit fires when its activation exceeds ``fires_above`` (0): for a ReLU, when it is active;
for GELU, SiLU, ELU, Tanh, ... when its output is positive (a GELU's negative dip counts as
not firing). Units are found by ``pyengine.units``: a conv map's channels (its positions are
inputs too), a transformer's features (its tokens are inputs too).

Firing patterns (h > 0) over the whole dataset are packed into bitsets (64 inputs per
word, 32x smaller than float32) by ``pyengine.ops.pack_firing``; pairwise agreement comes
from XOR popcounts (``pyengine.ops.firing_disagreements``), never from a float matrix.
Units whose patterns agree on at least ``agreement`` of the inputs are linked, and the
linked components are the synchronized groups. Dead and always-on units are set apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.degeneracy._ranks import UNITS_OPTION_DOC, check_units, note_units
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, layer_tuple, option


@dataclass(frozen=True)
class ReluSyncOptions(RowOptions):
    batch_size: int = option(256, "rows per step")
    layers: tuple[str, ...] = option(
        (), "layers analysed; default: the stored layers, else every nonlinearity's output (ReLU, GELU, ...)"
    )
    agreement: float = option(1.0, "minimum fraction of inputs on which two linked units agree (1.0: identical)")
    fires_above: float = option(0.0, "a unit fires when its activation exceeds this (GELU/SiLU/...: output > 0)")
    units: str = option("auto", UNITS_OPTION_DOC + "; positions count as inputs")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        if (
            isinstance(self.agreement, bool)
            or not isinstance(self.agreement, (int, float))
            or not 0 < self.agreement <= 1
        ):
            raise bad_option("agreement", self.agreement, "an agreement fraction in (0, 1]")
        check_units(self.units)
        if isinstance(self.fires_above, bool) or not isinstance(self.fires_above, (int, float)):
            raise bad_option("fires_above", self.fires_above, "a number")


@dataclass(frozen=True, kw_only=True)
class ReluSyncResult(Result):
    agreement: dict[str, torch.Tensor]  # (units, units) fraction of inputs where both agree
    firing_rate: dict[str, torch.Tensor]  # (units,) fraction of inputs where the unit fires
    group: dict[str, torch.Tensor]  # (units,) group id, -1 outside any group
    groups: dict[str, int]  # number of synchronized groups per layer
    dead: dict[str, int]
    always_on: dict[str, int]
    samples: dict[str, int]
    unit_axis: dict[str, str]  # where each layer's units are: 'channels', 'last', 'units', 'flatten', 'dim k'

    def lines(self) -> list[str]:
        out = []
        for layer, labels in self.group.items():
            sizes = sorted(torch.bincount(labels[labels >= 0]).tolist(), reverse=True) if self.groups[layer] else []
            detail = f" (sizes {', '.join(map(str, sizes))})" if sizes else ""
            out.append(
                f"layer {layer}: {labels.numel()} units, {self.groups[layer]} synchronized groups{detail}, "
                f"{self.dead[layer]} dead, {self.always_on[layer]} always on, over {self.samples[layer]} inputs"
            )
        return out

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per layer: units, groups (largest first), dead and always-on units, mean firing rate."""
        rows: list[tuple[object, ...]] = [
            ("layer", "units", "synchronized groups", "group sizes", "dead", "always on", "mean firing rate", "inputs")
        ]
        for layer, labels in self.group.items():
            sizes = sorted(torch.bincount(labels[labels >= 0]).tolist(), reverse=True) if self.groups[layer] else []
            rate = float(self.firing_rate[layer].float().mean()) if self.firing_rate[layer].numel() else 0.0
            rows.append(
                (
                    layer,
                    labels.numel(),
                    self.groups[layer],
                    ", ".join(map(str, sizes)) or "-",
                    self.dead[layer],
                    self.always_on[layer],
                    f"{rate:.1%}",
                    self.samples[layer],
                )
            )
        return tuple(rows)

    def summary(self) -> str:
        return "; ".join(self.lines())


class FiringPacker:
    """Packs row blocks of any size into one bitset: full 64-row words at once, the
    remainder (< 64 rows) carried to the next block."""

    def __init__(self, fires_above: float) -> None:
        self.fires_above = fires_above
        self.words: list[torch.Tensor] = []
        self.carry: torch.Tensor | None = None
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.rows += rows.shape[0]
        if self.carry is not None:
            rows = torch.cat([self.carry, rows])
        full = rows.shape[0] // 64 * 64
        if full:
            self.words.append(ops.pack_firing(rows[:full], self.fires_above))
        self.carry = rows[full:] if full < rows.shape[0] else None

    def finish(self) -> torch.Tensor:
        if self.carry is not None:
            self.words.append(ops.pack_firing(self.carry, self.fires_above))
            self.carry = None
        if not self.words:
            raise PyengineError("relu-sync: no rows to analyse")
        return torch.cat(self.words, dim=1).contiguous()


def synchronized_groups(disagreements: torch.Tensor, rows: int, threshold: float, live: torch.Tensor) -> torch.Tensor:
    """Group id per unit: connected components of live units agreeing on >= threshold."""
    units = disagreements.shape[0]
    allowed = int((1 - threshold) * rows + 1e-9)  # most disagreements a linked pair may have
    linked = (disagreements <= allowed) & live.unsqueeze(0) & live.unsqueeze(1)
    linked.fill_diagonal_(False)
    parent = list(range(units))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(linked, diagonal=1)).tolist():
        parent[root(i)] = root(j)
    roots = torch.tensor([root(i) for i in range(units)])
    sizes = torch.bincount(roots, minlength=units)
    in_group = sizes[roots] > 1
    group = torch.full((units,), -1, dtype=torch.long)
    if bool(in_group.any()):
        group[in_group] = torch.unique(roots[in_group], return_inverse=True)[1]
    return group


class ReluSync(Technique):
    name = "relu-sync"
    summary = "groups of units (ReLU, GELU, ...: output > 0) that fire on the same inputs, from bitset patterns"
    Options = ReluSyncOptions
    needs_data = True

    def run(self, ctx: Context, options: ReluSyncOptions) -> ReluSyncResult:
        layers = options.layers or ctx.default_layers(self.name)
        packers = {layer: FiringPacker(options.fires_above) for layer in layers}
        axes = ctx.unit_axes(options.units, self.name, layers)
        for block_rows, block in ctx.activations(
            layers,
            batch_size=options.batch_size,
            start=options.start,
            stop=options.stop,
            technique=self.name,
            split=True,
        ):
            for layer, samples in axes.matrices(block, block_rows.mask).items():
                packers[layer].add(samples)
        note_units(ctx, axes)
        fields: dict[str, Any] = {
            k: {} for k in ("agreement", "firing_rate", "group", "groups", "dead", "always_on", "samples")
        }
        figures = []
        for layer, packer in packers.items():
            bits = packer.finish()
            # One extra all-zero unit: its disagreement with unit i is how often i fires.
            padded = torch.cat([bits, torch.zeros_like(bits[:1])])
            # Counts over rows add up: several processes sum those of their parts (exact).
            disagreements = ctx.all_reduce(ops.firing_disagreements(padded).cpu())
            rows = int(ctx.all_reduce(torch.tensor(packer.rows)))
            fires = disagreements[-1, :-1]
            disagreements = disagreements[:-1, :-1]
            live = (fires > 0) & (fires < rows)
            group = synchronized_groups(disagreements, rows, options.agreement, live)
            agreement = (1 - disagreements.double() / rows).float()
            fields["agreement"][layer] = agreement
            fields["firing_rate"][layer] = (fires.double() / rows).float()
            fields["group"][layer] = group
            fields["groups"][layer] = int(group.max()) + 1
            fields["dead"][layer] = int((fires == 0).sum())
            fields["always_on"][layer] = int((fires == rows).sum())
            fields["samples"][layer] = rows
            figures.append(Figure(f"{layer}: pairwise firing agreement (white = identical)", image=agreement))
        return ReluSyncResult(**fields, unit_axis=axes.names(), figures=tuple(figures))
