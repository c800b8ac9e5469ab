"""``pyengine demo`` trains to >= 95% held-out accuracy and writes results and a report."""

from __future__ import annotations

import re
from pathlib import Path

import pyengine
from conftest import run_cli


def test_demo_end_to_end(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "--out", str(tmp_path / "out"), env={"PYENGINE_CACHE": str(tmp_path / "cache")}, timeout=1200
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"held-out accuracy ([0-9.]+)% on 1000 shapes images \(trained in ([0-9.]+) s\)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= 95.0
    with pyengine.StoreReader(tmp_path / "out" / "results.h5") as reader:
        assert {t for t, _ in reader.results()} == set(pyengine.techniques())
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
    with pyengine.StoreReader(tmp_path / "out" / "activations.h5") as reader:
        assert len(reader) == 1000 and "features.relu3" in reader.layers
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "gram-spectrum" in page and "held-out accuracy" in page
    assert "Best single-neuron test accuracy per layer" in page and "activations by concept" in page
    assert "texture=striped (neuron, test accuracy, test AUC — the ranking —, selectivity, activation that signals it): " in page
    for layer in ("features.relu1", "features.relu2", "features.relu3"):
        assert f"Feature visualization of {layer}" in page and f"{layer} channel 3: top 9 patches" in page
    assert list((tmp_path / "cache").glob("democnn-*.pt"))

    again = run_cli("demo", "--out", str(tmp_path / "out"), env={"PYENGINE_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0 and "loaded from cache" in again.stdout
