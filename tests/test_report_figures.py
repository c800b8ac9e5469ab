"""Line plots: ticks on both axes, legend colours = line colours, readable log ranges, no NaN, never empty."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

from pyengine.report import LOG_DECADES, Report, Section, svg_lines
from pyengine.technique import Figure, UnitRef

SVG = "{http://www.w3.org/2000/svg}"


def parse(figure: Figure) -> ET.Element:
    text = svg_lines(figure)
    assert text, "an empty plot"
    assert "nan" not in text.lower() and "inf" not in text.lower()
    return ET.fromstring(text)


def ticks(root: ET.Element, axis: str) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text") if t.get("class") == f"{axis}tick"]


def check_structure(root: ET.Element, names: list[str], x_ticks: int = 2) -> None:
    lines = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "series"]
    swatches = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "legend"]
    labels = [t for t in root.iter(f"{SVG}text") if t.text in names]
    assert len(lines) == len(swatches) == len(names)
    assert [p.get("stroke") for p in lines] == [r.get("fill") for r in swatches] == [t.get("fill") for t in labels]
    assert len(set(p.get("stroke") for p in lines)) == len(lines)
    for line in lines:
        for point in (line.get("points") or "").split():
            assert all(math.isfinite(float(c)) for c in point.split(","))
    assert len(ticks(root, "x")) >= x_ticks and len(ticks(root, "y")) >= 2


def test_linear_plot_has_round_ticks_on_both_axes() -> None:
    figure = Figure(
        "loss", lines={"train": [2.3, 1.1, 0.7, 0.55], "test": [2.4, 1.3, 0.9, float("nan")]}, xlabel="epoch"
    )
    root = parse(figure)
    check_structure(root, ["train", "test"])
    assert ticks(root, "x") == ["0", "1", "2", "3"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", t) for t in ticks(root, "y"))


def test_log_axis_is_clipped_to_readable_decades_and_says_so() -> None:
    values = [1.0, 0.1, 1e-3, 1e-9, 1e-200, 1e-300]
    root = parse(Figure("spectrum", lines={"layer": values}, log_y=True))
    labels = ticks(root, "y")
    assert all(re.fullmatch(r"1e-?\d+", t) for t in labels)  # whole decades, not 1e-75.7
    assert int(labels[0][2:]) >= -LOG_DECADES and labels[-1] == "1e0"
    clipped = [" ".join(t.itertext()) for t in root.iter(f"{SVG}text") if t.get("class") == "clipped"]
    assert clipped == [f"2 values below 1e-{LOG_DECADES} not shown"]
    line = next(p for p in root.iter(f"{SVG}polyline") if p.get("class") == "series")
    assert len((line.get("points") or "").split()) == len(values) - 2  # the clipped values are not drawn


def test_categorical_x_axis_names_each_point_and_one_point_series_show() -> None:
    figure = Figure("basis", lines={"width": [64.0], "basis size": [12.0]}, x_labels=["features.relu1"])
    root = parse(figure)
    check_structure(root, ["width", "basis size"], x_ticks=1)
    assert ticks(root, "x") == ["features.relu1"]
    assert len(list(root.iter(f"{SVG}circle"))) == 2  # a marker per point: a single point is visible
    many = parse(Figure("acc", lines={"red": [0.5, 0.9, 0.7]}, x_labels=["conv1", "conv2", "fc"]))
    assert ticks(many, "x") == ["conv1", "conv2", "fc"]


def test_nothing_finite_is_no_plot_and_the_report_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = Figure("nothing", lines={"a": [float("nan")], "b": [0.0, -1.0]}, log_y=True)
    assert svg_lines(empty) == ""
    page = Report("t", [Section("s", figures=[empty])]).write(tmp_path).read_text()
    assert "<svg" not in page and "(no finite values to plot)" in page


def test_labels_are_escaped() -> None:
    text = svg_lines(Figure("x", lines={"<b>&": [1.0, 2.0]}, x_labels=["<i>", "a&b"], xlabel="<x>"))
    assert "<b>" not in text and "<i>" not in text and "&lt;b&gt;&amp;" in text and "a&amp;b" in text


def test_results_are_tables_and_the_report_sorts_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    import pyengine
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN

    torch.manual_seed(0)
    model, data = DemoCNN(width=4, image_size=16).eval(), Shapes(60, seed=1, size=16)
    layers = ["features.relu1", "features.relu2"]
    probes = pyengine.run("probe-neurons", model, data=data, layers=layers, progress=False)
    spectrum = pyengine.run("gram-spectrum", model, data=data, layers=layers, cutoffs=[1e-3], progress=False)
    faith = pyengine.run("faithfulness", model, data=data, techniques=["saliency"], stop=8, steps=4, progress=False)
    for result in (probes, spectrum, faith):
        header, *rows = result.table()
        assert rows and all(len(row) == len(header) for row in rows)
    header, *rows = probes.table()
    assert len(rows) == len(layers) * len(probes.best_accuracy)  # every layer x concept
    for concept, layer, unit, accuracy, auc, *_ in rows:
        key = f"{layer}|{concept}"
        assert unit == UnitRef(layer, int(probes.ranking[key][0]))
        assert auc == round(float(probes.auc[key][unit.unit]), 3)
        assert accuracy == round(float(probes.test_accuracy[key][unit.unit]), 3)
    assert [row[0] for row in spectrum.table()[1:]] == layers
    assert "rank rel<0.001" in spectrum.table()[0]
    assert faith.table()[1][0] == "saliency" and faith.table()[1][1] == round(faith.pointing["saliency"], 3)
    page = Report("t", [Section("probes", table=probes.table())]).write(tmp_path).read_text()
    assert '<table class="sortable"><thead>' in page and page.count("<tr>") == len(rows) + 1
    assert "addEventListener('click'" in page and "http" not in page.split("<script>")[1]  # offline: no CDN


def test_results_render_inline_in_notebooks_with_the_report_renderer() -> None:
    import base64

    import torch

    import pyengine
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN

    torch.manual_seed(0)
    model, data = DemoCNN(width=4, image_size=16).eval(), Shapes(40, seed=1, size=16)
    spectrum = pyengine.run("gram-spectrum", model, data=data, layers=["features.relu1"], progress=False)
    page = spectrum._repr_html_()
    assert '<section id="gramspectrum"><h2>GramSpectrum</h2>' in page and '<table class="sortable">' in page
    assert "<svg" in page and "Rows analysed: 40 rows 0-39" in page and "<script>" in page
    maps = pyengine.run("saliency", model, data.batch(range(2)).inputs, target=1, progress=False)
    html_text = maps._repr_html_()
    source = html_text.split('<img src="')[1].split('"')[0]
    assert source.startswith("data:image/png;base64,")
    assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
