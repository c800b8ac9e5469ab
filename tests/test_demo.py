"""``pyengine demo``: the shipped model, every technique, a report with a summary, tables and unit pages."""

from __future__ import annotations

import html.parser
import json
import re
from pathlib import Path

import pyengine
from pyengine.train import SHIPPED_WEIGHTS


class Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "a" and found.get("href"):
            self.hrefs.append(str(found["href"]))


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text())
    return links


def test_demo_end_to_end(demo_out: Path) -> None:
    stdout = (demo_out / "stdout.txt").read_text()
    match = re.search(r"held-out accuracy ([0-9.]+)% on 1000 shapes images \(the shipped weights", stdout)
    assert match, stdout
    assert (
        float(match.group(1)) / 100 == json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())["held_out_accuracy"]
    )
    assert "time per step:" in stdout and re.search(r"total\s+[0-9.]+ s", stdout)
    techniques = set(pyengine.techniques())
    with pyengine.StoreReader(demo_out / "results.h5") as reader:
        assert {t for t, _ in reader.results()} == techniques
        striped = {}
        for technique in ("probe-linear", "probe-mlp"):
            _, attrs = reader.result(technique, "demo")
            striped.update(
                {
                    f"{technique} {key}": value
                    for key, value in attrs.items()
                    if key.startswith("test_accuracy/") and key.endswith("|texture=striped")
                }
            )
    assert len(striped) == 8  # 4 layers x 2 probes
    assert max(striped.values()) >= 0.9, striped  # the texture concept is decodable from some layer
    with pyengine.StoreReader(demo_out / "activations.h5") as reader:
        assert len(reader) == 1000 and "features.relu3" in reader.layers

    report = demo_out / "report"
    index, units = parse(report / "index.html"), parse(report / "units.html")
    page = (report / "index.html").read_text()
    # the summary: a row per technique linking to its section; a table of contents
    assert "Held-out accuracy: " in page and "Summary" in page
    assert {f"#{name}" for name in techniques} <= set(index.hrefs) and techniques <= index.ids
    assert "Best single-neuron test accuracy per layer" in page and "activations by concept" in page
    assert 'class="colour-bar"' in page and 'type="range"' in page  # heatmaps with a scale and opacity
    # a page section per channel of each conv layer, linked from the tables that name it
    channels = {"features.relu1": 8, "features.relu2": 16, "features.relu3": 32}
    unit_page = (report / "units.html").read_text()
    for layer, count in channels.items():
        assert f"Units of {layer}" in page
        for channel in range(count):
            anchor = f"unit-{layer.replace('.', '-')}-{channel}"
            assert anchor in units.ids and f"units.html#{anchor}" in index.hrefs
        assert f"{layer} channel {count - 1}: top 9 patches (row 2: guided backprop)" in unit_page
    for word in ("Fires (relu-sync", "Synchronized partners", "Concepts (probe-neurons", "Activation maximization of"):
        assert unit_page.count(word) >= sum(channels.values()), word
    for name, links in (("index.html", index), ("units.html", units)):
        for href in links.hrefs:
            target, _, fragment = href.partition("#")
            assert (target or name) in ("index.html", "units.html"), href
            assert not fragment or fragment in (units if (target or name) == "units.html" else index).ids, href


def test_readme_numbers_are_what_the_demo_prints(demo_out: Path) -> None:
    """The README's faithfulness table is scripts/readme_numbers.py's output on the demo's results."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    printed = subprocess.run(
        [
            sys.executable,
            "-P",
            str(root / "scripts" / "readme_numbers.py"),
            "faithfulness",
            str(demo_out / "results.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- numbers: scripts/readme_numbers.py faithfulness -->\n", 1)[1].split("<!-- /numbers -->")[
        0
    ]
    assert block.strip() == printed.stdout.strip(), "README is stale: run scripts/readme_numbers.py --write README.md"
    rows = [line.split(" | ") for line in block.strip().splitlines()[2:]]
    pointing = [row[1].strip("* ") for row in rows]  # the pointing-game column
    stdout = (demo_out / "stdout.txt").read_text() + (demo_out / "stderr.txt").read_text()
    best = re.search(r"pointing game best \S+ ([0-9.]+)", stdout)
    assert best and pointing and best.group(1) == max(pointing, key=float)  # what the demo prints
