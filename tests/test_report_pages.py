"""Heatmaps with a colour bar in the maps' units and an opacity slider; a table of contents;
unit pages linked from table cells; every internal link resolves."""

from __future__ import annotations

import html.parser
from pathlib import Path

import torch

from pyengine.figures import heatmap_figure
from pyengine.report import Link, Page, Report, Section, colour_bar, section_html
from pyengine.technique import ColourScale, UnitRef


class Collect(html.parser.HTMLParser):
    """Ids, links, images and inputs of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.ranges = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.append(str(found["id"]))
        if tag == "a" and found.get("href"):
            self.hrefs.append(str(found["href"]))
        if tag == "img":
            self.images.append(found)
        if tag == "input" and found.get("type") == "range":
            self.ranges += 1


def parsed(text: str) -> Collect:
    page = Collect()
    page.feed(text)
    return page


def test_heatmap_figure_has_one_scale_at_the_99th_percentile() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(3, 3, 10, 12, generator=generator)
    maps = torch.randn(3, 10, 12, generator=generator)
    maps[1, 0, 0] = 100.0  # an outlier does not wash out the other tiles
    figure = heatmap_figure("maps", inputs, maps, units="score <units>", columns=2)
    limit = float(torch.quantile(maps.abs().flatten(), 0.99))
    assert figure.scale == ColourScale(limit, "score <units>")
    assert figure.image is not None and figure.heat is not None
    assert figure.heat.shape == (3, *figure.image.shape[-2:])
    pad = 2  # tile 0 at (2, 2); tile 1 beside it; tile 2 below
    tile1 = figure.heat[:, pad : pad + 10, pad + 12 + pad : pad + 12 + pad + 12]
    assert torch.allclose(tile1[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # beyond the limit: full red
    value = float(maps[0, 3, 4])
    expected = min(abs(value) / limit, 1.0)
    pixel = figure.heat[:, pad + 3, pad + 4]
    channel = 2 if value > 0 else 0  # red: blue channel falls; blue: red channel falls
    assert abs(float(pixel[channel]) - (1 - expected)) < 1e-5
    assert abs(float(pixel[1]) - (1 - expected)) < 1e-5


def test_heatmap_section_has_overlay_slider_and_colour_bar() -> None:
    inputs = torch.rand(2, 3, 8, 8)
    figure = heatmap_figure("maps", inputs, torch.randn(2, 8, 8), units="drop <of> score")
    text = section_html(Section("s", figures=[figure]), lambda png: "x.png")
    page = parsed(text)
    assert len(page.images) == 2 and page.images[1].get("class") == "heat" and page.ranges == 1
    widths = {int(str(image["width"])) for image in page.images}
    width = figure.image.shape[-1]  # type: ignore[union-attr]
    assert widths == {min(960, width * 16)}  # enlarged to be legible, at most 16 times
    assert "drop &lt;of&gt; score" in text and "<of>" not in text
    bar = colour_bar(ColourScale(0.25, "u"))
    assert "≤ -0.25" in bar and "≥ 0.25" in bar and ">0<" in bar


def test_report_has_contents_unit_pages_and_every_link_resolves(tmp_path: Path) -> None:
    unit = UnitRef("features.relu1", 5)
    units = Page("units.html", "Units", [Section("features.relu1#5", lines=["fires 12%"], anchor="u-relu1-5")])
    sections = [
        Section("Summary", table=[("technique", "found"), (Link("probe", "#probe-neurons"), "x")]),
        Section("probe-neurons", table=[("concept", "neuron"), ("red", unit), ("blue", UnitRef("other", 1))]),
        Section("probe-neurons", lines=["a second section of that title"]),
    ]
    report = Report("t", sections, pages=[units], unit_pages={str(unit): "units.html#u-relu1-5"})
    index = report.write(tmp_path)
    pages = {path.name: parsed(path.read_text()) for path in tmp_path.glob("*.html")}
    assert set(pages) == {"index.html", "units.html"}
    main = pages["index.html"]
    assert len(main.ids) == len(set(main.ids)) and {"summary", "probe-neurons", "probe-neurons-2"} <= set(main.ids)
    assert {f"#{anchor}" for anchor in ("summary", "probe-neurons", "probe-neurons-2")} <= set(main.hrefs)
    assert "units.html#u-relu1-5" in main.hrefs and "units.html" in main.hrefs
    assert "other#1" in index.read_text() and not any("other" in href for href in main.hrefs)
    for name, page in pages.items():
        for href in page.hrefs:
            target, _, fragment = href.partition("#")
            target = target or name
            assert target in pages, href
            assert not fragment or fragment in pages[target].ids, href
