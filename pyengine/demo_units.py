"""The demo's unit pages: every channel of each conv layer in one place (its top dataset patches
with their guided-backprop maps, its activation-maximization image, its firing rate, its
synchronized partners, the concepts probes find in it), and per layer a table linking to them.

Results of other techniques are read by their field names (``firing_rate``, ``agreement``,
``group`` of relu-sync; ``auc``, ``ranking`` of probe-neurons): the host imports no family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyengine import host
from pyengine.api import run
from pyengine.data.base import Dataset
from pyengine.errors import PyengineError
from pyengine.layers import after_relu, conv_layers
from pyengine.progress import Progress
from pyengine.report import Page, Section, anchor_of
from pyengine.technique import Figure, Result, UnitRef

UNITS_PAGE = "units.html"
CONCEPT_AUC = 0.8  # a unit "detects" a concept when its one-neuron probe's test AUC reaches this
AM_WIDTH = 256  # pixels an activation-maximization image is shown wide
FEATURE_TECHNIQUES = ("filters", "activations", "max-patches", "activation-maximization")


@dataclass
class UnitPages:
    overview: list[Section] = field(default_factory=list)  # per layer, for the main page
    page: Page = field(default_factory=lambda: Page(UNITS_PAGE, "Units: one section per channel"))
    links: dict[str, str] = field(default_factory=dict)  # "layer#k" -> "units.html#anchor"


def unit_anchor(layer: str, unit: int) -> str:
    return f"unit-{anchor_of(layer)}-{unit}"


def unit_pages(
    model: nn.Module,
    data: Dataset,
    store: Path,
    inputs: torch.Tensor,
    results: Mapping[str, Result],
    *,
    am_steps: int = 64,
    progress: bool = True,
) -> UnitPages:
    """Unit pages for every channel of every conv layer (read after its ReLU)."""
    pages = UnitPages()
    if any(name not in host.techniques() for name in FEATURE_TECHNIQUES):
        return pages  # a plugin set without the feature-visualization family
    convs = conv_layers(model, "demo")
    with Progress(len(convs), "unit pages", enabled=progress) as bar:
        for k, conv in enumerate(convs):
            layer = after_relu(model, conv)
            try:
                sections, overview = _layer_units(
                    model, data, store, inputs, results, conv, layer, k == 0, am_steps, progress
                )
            except PyengineError as error:
                pages.overview.append(Section(f"Units of {layer}", error=str(error)))
                bar.update()
                continue
            pages.overview.append(overview)
            for section in sections:
                pages.links[section.title] = f"{UNITS_PAGE}#{section.anchor}"
            pages.page.sections.extend(sections)
            bar.update()
    return pages


def _layer_units(
    model: nn.Module,
    data: Dataset,
    store: Path,
    inputs: torch.Tensor,
    results: Mapping[str, Result],
    conv: str,
    layer: str,
    first: bool,
    am_steps: int,
    progress: bool,
) -> tuple[list[Section], Section]:
    channels = int(getattr(model.get_submodule(conv), "out_channels", 0))
    figures: list[Figure] = []
    if first:
        figures += run("filters", model, layers=conv, progress=False).figures
    figures += run("activations", model, inputs[:1], layers=layer, progress=False).figures
    # read by field name (the host imports no family's result type)
    patches: Any = run(
        "max-patches",
        model,
        data=data,
        store=store,
        layers=layer,
        guided=True,
        figure_channels=channels,
        progress=False,
    )
    optimised: Any = run(
        "activation-maximization",
        model,
        data=data,
        layers=conv,
        channels=list(range(channels)),
        steps=am_steps,
        progress=progress,
    )
    patch_figures = {int(c): f for c, f in zip(patches.channels.tolist(), patches.figures)}
    sync, probes = results.get("relu-sync"), results.get("probe-neurons")
    header = ("unit", "fires on", "top activation", "activation max. objective", "best dataset input", "detects")
    table: list[tuple[object, ...]] = [header]
    sections = []
    for row, channel in enumerate(patches.channels.tolist()):
        unit = UnitRef(layer, int(channel))
        rate = _firing_rate(sync, layer, channel)
        concepts = _concepts(probes, layer, channel)
        detected = [f"{name} ({auc:.2f})" for name, auc, _ in concepts if auc >= CONCEPT_AUC]
        objective, best = float(optimised.objective[channel]), float(optimised.dataset_best[channel])
        table.append(
            (
                unit,
                "n/a" if rate is None else f"{rate:.1%}",
                round(float(patches.values[row, 0]), 3),
                round(objective, 3),
                round(best, 3),
                ", ".join(detected) or "-",
            )
        )
        lines = [
            f"Fires (relu-sync: > 0 somewhere in the map) on {rate:.1%} of the inputs."
            if rate is not None
            else "Firing rate: relu-sync did not run.",
            _partners(sync, layer, channel),
            "Concepts (probe-neurons: test AUC, rank among the layer's units): "
            + (
                ", ".join(f"{name} {auc:.2f} (#{rank})" for name, auc, rank in concepts[:6])
                or "probe-neurons did not run"
            )
            + ".",
            f"Activation maximization of {conv} channel {channel}: objective {objective:.3g} "
            f"(the best of the dataset inputs compared: {best:.3g}).",
        ]
        shown = [patch_figures[channel]] if channel in patch_figures else []
        image = optimised.images[channel : channel + 1]
        title = f"Activation maximization of {conv} channel {channel}"
        shown.append(Figure(title, image=image[0], width=AM_WIDTH))
        sections.append(Section(str(unit), lines=lines, figures=shown, anchor=unit_anchor(layer, channel)))
    overview = Section(
        f"Units of {layer}",
        lines=[
            f"{patches.summary()}.",
            f"Each unit's page ({UNITS_PAGE}) shows its top {patches.values.shape[1]} dataset patches with their "
            "guided-backprop maps, its activation-maximization image, partners and concepts; click a unit.",
        ],
        table=table,
        figures=figures,
    )
    return sections, overview


def _firing_rate(sync: Result | None, layer: str, channel: int) -> float | None:
    rates: Mapping[str, Any] = getattr(sync, "firing_rate", {}) or {}
    return float(rates[layer][channel]) if layer in rates and channel < len(rates[layer]) else None


def _partners(sync: Result | None, layer: str, channel: int) -> str:
    agreement: Mapping[str, Any] = getattr(sync, "agreement", {}) or {}
    groups: Mapping[str, Any] = getattr(sync, "group", {}) or {}
    if layer not in agreement:
        return "Synchronized partners: relu-sync did not run on this layer."
    row = agreement[layer][channel].clone().float()
    row[channel] = -1.0
    closest = row.argsort(descending=True)[:3].tolist()
    nearest = ", ".join(f"{UnitRef(layer, int(u))} {float(row[u]):.0%}" for u in closest if row[u] >= 0)
    group = int(groups[layer][channel]) if layer in groups else -1
    members = (
        [int(u) for u in (groups[layer] == group).nonzero().flatten().tolist() if u != channel] if group >= 0 else []
    )
    same = (
        f"in synchronized group {group} with " + ", ".join(str(UnitRef(layer, u)) for u in members)
        if members
        else "in no synchronized group"
    )
    return f"Synchronized partners (relu-sync: share of inputs where both fire or both do not): {nearest}; {same}."


def _concepts(probes: Result | None, layer: str, channel: int) -> list[tuple[str, float, int]]:
    """(concept, test AUC, rank among the layer's units) for this unit, best AUC first."""
    aucs: Mapping[str, Any] = getattr(probes, "auc", {}) or {}
    rankings: Mapping[str, Any] = getattr(probes, "ranking", {}) or {}
    found = []
    for key, values in aucs.items():
        name, _, concept = key.rpartition("|")
        if name != layer or channel >= len(values):
            continue
        order = rankings[key].tolist() if key in rankings else []
        rank = order.index(channel) + 1 if channel in order else 0
        found.append((concept, float(values[channel]), rank))
    return sorted(found, key=lambda item: -item[1])
