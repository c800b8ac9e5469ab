"""The shipped demo weights are what ``scripts/train_demo_weights.py`` makes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pyengine.data.shapes import Shapes
from pyengine.models.demo import DemoCNN
from pyengine.train import HELD_OUT_SEED, SHIPPED_WEIGHTS, TrainConfig, accuracy, load_demo_weights

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_demo_weights.py"


def test_shipped_weights_load_safely_and_score_what_they_recorded() -> None:
    meta = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    held_out = Shapes(meta["config"]["test_size"], seed=HELD_OUT_SEED)
    model = DemoCNN()
    report = load_demo_weights(model, held_out)
    assert report.accuracy == meta["held_out_accuracy"] >= 0.95
    assert list(report.losses) == meta["losses"] and report.losses[-1] < report.losses[0] / 10
    assert SHIPPED_WEIGHTS.stat().st_size < 1024 * 1024
    assert meta["config"] == asdict(TrainConfig())


@pytest.mark.slow
def test_the_script_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    """Bit for bit on CPUs with the kernels they were made with (one thread, fixed seeds); elsewhere
    the float sums differ in their last bits and training amplifies that: then the same behaviour."""
    meta = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    made = tmp_path / "demo_cnn.pt"
    result = subprocess.run(
        [sys.executable, "-P", str(SCRIPT), "--out", str(made)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours, shipped = torch.load(made, weights_only=True), torch.load(SHIPPED_WEIGHTS, weights_only=True)
    assert ours.keys() == shipped.keys()
    if meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
        assert all(torch.equal(ours[key], shipped[key]) for key in ours)
        assert json.loads(made.with_suffix(".json").read_text())["losses"] == meta["losses"]
    else:
        held_out = Shapes(1000, seed=HELD_OUT_SEED)
        a, b = DemoCNN().eval(), DemoCNN().eval()
        a.load_state_dict(ours)
        b.load_state_dict(shipped)
        inputs = held_out.batch(range(len(held_out))).inputs
        with torch.no_grad():
            agree = float((a(inputs).argmax(1) == b(inputs).argmax(1)).float().mean())
        assert agree >= 0.98 and abs(accuracy(a, held_out) - accuracy(b, held_out)) <= 0.01
