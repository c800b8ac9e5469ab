"""Every technique's result as a table: a header, rows as wide as it, and cells equal to the result's fields."""

from __future__ import annotations

import math

import pytest
import torch

import pyengine
from pyengine.data.shapes import Shapes
from pyengine.models.demo import DemoCNN
from pyengine.report import series_colours
from pyengine.technique import UnitRef


@pytest.fixture(scope="module")
def small() -> tuple[DemoCNN, Shapes]:
    torch.manual_seed(0)
    model = DemoCNN(width=4, image_size=16).eval()
    for module in model.modules():  # larger weights: ReLUs that fire on some inputs and not others
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.6)
    return model, Shapes(48, seed=1, size=16)


def rows_of(result: pyengine.Result) -> list[tuple[object, ...]]:
    header, *rows = result.table()
    assert rows and all(len(row) == len(header) for row in rows), result.table()
    for row in rows:
        assert all(isinstance(c, (str, int, float, UnitRef)) for c in row), row
    return rows


def test_relu_sync_and_rank_tables_equal_the_fields(small: tuple[DemoCNN, Shapes]) -> None:
    model, data = small
    sync = pyengine.run("relu-sync", model, data=data, progress=False)
    for row in rows_of(sync):
        layer = str(row[0])
        assert row[1] == sync.group[layer].numel() and row[2] == sync.groups[layer]
        assert (row[4], row[5]) == (sync.dead[layer], sync.always_on[layer])
        assert row[6] == f"{float(sync.firing_rate[layer].float().mean()):.1%}"
    for name in ("gram-spectrum", "jacobian-gram"):
        result = pyengine.run(name, model, data=data, progress=False)
        header = result.table()[0]
        for row in rows_of(result):
            layer = str(row[0])
            assert row[1] == result.units[layer]
            ranks = {h.removeprefix("rank "): v for h, v in zip(header, row) if str(h).startswith("rank ")}
            assert ranks and all(result.rank[f"{layer} {cut}"] == value for cut, value in ranks.items())
    basis = pyengine.run("interaction-basis", model, data=data, stop=16, progress=False)
    assert {str(row[0]): row[3] for row in rows_of(basis)} == basis.basis_size


def test_probe_tables_name_units_and_concepts(small: tuple[DemoCNN, Shapes]) -> None:
    model, data = small
    neurons = pyengine.run("probe-neurons", model, data=data, progress=False)
    for row in rows_of(neurons):
        concept, layer, unit = str(row[0]), str(row[1]), row[2]
        assert isinstance(unit, UnitRef) and unit.layer == layer
        assert unit.unit == int(neurons.ranking[f"{layer}|{concept}"][0])
    linear = pyengine.run("probe-linear", model, data=data, progress=False)
    rows = rows_of(linear)
    assert len(rows) == len(linear.test_accuracy)
    for row in rows:
        key = f"{row[1]}|{row[0]}"
        assert row[2] == round(linear.test_accuracy[key], 3) and row[5] == linear.top_units[key]


def test_feature_tables(small: tuple[DemoCNN, Shapes]) -> None:
    model, data = small
    patches = pyengine.run("max-patches", model, data=data, layers="features.relu2", progress=False)
    rows = rows_of(patches)
    assert [row[0] for row in rows] == [UnitRef("features.relu2", c) for c in patches.channels.tolist()]
    assert [float(str(row[1])) for row in rows] == pytest.approx(patches.values[:, 0].tolist(), rel=1e-3)
    optimised = pyengine.run(
        "activation-maximization", model, data=data, layers="features.conv2", channels=[0, 1, 2], steps=4
    )
    for row, value, best in zip(rows_of(optimised), optimised.objective.tolist(), optimised.dataset_best.tolist()):
        assert row[3] == ("-" if math.isnan(best) else "yes" if value > best else "no")
    assert all(name in optimised.figures[0].caption for name in optimised.names)  # every objective named


def test_attribution_and_llc_tables(small: tuple[DemoCNN, Shapes]) -> None:
    model, data = small
    saliency = pyengine.run("saliency", model, data=data, stop=5, progress=False)
    for k, row in enumerate(rows_of(saliency)):
        assert row[0] == int(saliency.index[k]) and row[1] == int(saliency.targets[k])
        assert float(str(row[2])) == pytest.approx(float(saliency.attributions[k].sum()), rel=1e-3)
    llc = pyengine.run("llc", model, data=data, draws=5, burn_in=2, progress=False)
    assert [float(str(row[1])) for row in rows_of(llc)] == pytest.approx(llc.llc_per_chain.tolist(), rel=1e-3)


def test_series_named_after_colours_are_drawn_in_them() -> None:
    colours = series_colours(["texture=plain", "colour=red", "colour=green", "colour=blue", "colour=yellow"])
    assert colours[1:] == ["#d62728", "#2ca02c", "#1f77b4", "#bcbd22"]
    assert colours[0] not in colours[1:]  # the unnamed series takes a colour no named one uses
    assert len(set(series_colours(["a", "b", "c"]))) == 3
