"""The units option and effective ranks of eigenvalue spectra (the degeneracy family's helpers)."""

from __future__ import annotations

import torch

from pyengine.context import Context
from pyengine.technique import bad_option
from pyengine.units import FLATTEN_DOC, UNIT_CHOICES, UNITS_DOC, UnitAxes

MAX_UNITS = 8192


def rank_text(rank: dict[str, int], layer: str) -> str:
    """``rank 37 at 0.001, rank 40 at 1e-06`` for one layer's relative cut-offs."""
    return ", ".join(
        f"rank {value} at {key.split(' rel<')[1]}" for key, value in rank.items() if key.startswith(f"{layer} rel<")
    )


def rank_table(
    units: dict[str, int], rank: dict[str, int], unit_axis: dict[str, str], samples: dict[str, int] | None = None
) -> tuple[tuple[object, ...], ...]:
    """Per layer: units, where they are, (samples,) and the effective rank at each cut-off."""
    first = next(iter(units), "")
    cuts = [key.removeprefix(f"{first} ") for key in rank if key.startswith(f"{first} ")]
    header = (
        "layer",
        "units",
        "unit axis",
        *(("samples",) if samples is not None else ()),
        *(f"rank {c}" for c in cuts),
    )
    rows: list[tuple[object, ...]] = [header]
    for layer, width in units.items():
        counted = (samples.get(layer, 0),) if samples is not None else ()
        rows.append(
            (layer, width, unit_axis.get(layer, "units"), *counted, *(rank.get(f"{layer} {c}", "") for c in cuts))
        )
    return tuple(rows)


UNITS_OPTION_DOC = UNITS_DOC + FLATTEN_DOC


def check_units(value: str) -> None:
    """The ``units`` option: one of ``pyengine.units.UNIT_CHOICES``."""
    if value not in UNIT_CHOICES:
        raise bad_option("units", value, "one of " + ", ".join(repr(c) for c in UNIT_CHOICES))


def axis_note(axis: str) -> str:
    """`` (channels)`` / `` (last dim)`` after a unit count; nothing for rows of units."""
    return "" if axis == "units" else " (last dim)" if axis == "last" else f" ({axis})"


def note_units(ctx: Context, axes: UnitAxes) -> None:
    """Report how ``units='auto'`` placed the units of layers with positions (printed with the result)."""
    if axes.choice == "auto" and any(axes.names()[layer] != "units" for layer in axes.dims):
        ctx.defaults_chosen["units"] = axes.summary()


def effective_ranks(
    values: torch.Tensor, layer: str, thresholds: tuple[float, ...], variance: tuple[float, ...]
) -> dict[str, int]:
    clipped = values.clamp(min=0)
    top = float(clipped[0]) if clipped.numel() else 0.0
    total = float(clipped.sum())
    cumulative = clipped.cumsum(0) / total if total > 0 else clipped
    ranks = {f"{layer} rel<{t:g}": int((clipped > t * top).sum()) if top > 0 else 0 for t in thresholds}
    for v in variance:
        ranks[f"{layer} var{v:g}"] = int((cumulative < v - 1e-12).sum()) + 1 if total > 0 else 0
    return ranks
