"""Checked before any work: output folders, the store's model, row ranges, models built by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pyengine
from conftest import assert_user_error, run_cli
from pyengine.api import resolve_model
from pyengine.errors import PyengineError
from pyengine.models import DemoCNN


def test_a_missing_output_folder_fails_before_any_work(small_cnn, small_shapes, tmp_path: Path) -> None:
    calls = []
    handle = small_cnn.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(PyengineError, match=r"cannot write .*res.h5: the folder .*missing does not exist"):
            pyengine.run("gram-spectrum", small_cnn, data=small_shapes, save=tmp_path / "missing" / "res.h5")
    finally:
        handle.remove()
    assert calls == []  # the model never ran


def test_a_store_from_other_weights_is_refused_unless_accepted(small_shapes, tmp_path: Path) -> None:
    torch.manual_seed(0)
    captured, other = DemoCNN(width=4, image_size=16).eval(), DemoCNN(width=4, image_size=16).eval()
    store = pyengine.capture(captured, small_shapes, ["features.relu1"], tmp_path / "a.h5", progress=False)
    with pytest.raises(PyengineError, match=r"a.h5 was captured from other weights \(sha256 [0-9a-f]{12}"):
        pyengine.run("gram-spectrum", other, store=store, progress=False)
    accepted = pyengine.run("gram-spectrum", other, store=store, accept_other_model=True, progress=False)
    same = pyengine.run("gram-spectrum", captured, store=store, progress=False)
    assert torch.equal(accepted.eigenvalues["features.relu1"], same.eigenvalues["features.relu1"])


def test_models_built_by_name_are_the_same_every_time() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, second = resolve_model("demo-cnn"), resolve_model("demo-cnn")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_a_stop_past_the_end_is_an_error_not_a_clip(small_cnn, small_shapes) -> None:
    with pytest.raises(
        PyengineError, match=r"stop=500 is past the end of the 96 rows of dataset .*expected stop <= 96"
    ):
        pyengine.run("gram-spectrum", small_cnn, data=small_shapes, stop=500, progress=False)
    result = pyengine.run("activations", small_cnn, data=small_shapes, progress=False)
    assert result.rows.endswith(
        f"rows 0-3 of dataset '{small_shapes.name}' (96 rows; the first 4 by default, set stop to change it)"
    )
    result = pyengine.run("activations", small_cnn, small_shapes.batch(range(3)).inputs, progress=False)
    assert result.rows == "3 rows 0-2 of the given inputs (3 rows)"
    with pytest.raises(PyengineError, match="rows start=200, stop=0 select nothing of the 96 rows"):
        pyengine.run("gram-spectrum", small_cnn, data=small_shapes, start=200, progress=False)


def test_cli_checks_the_output_folder_first(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'out = "nowhere/res.h5"\n[model]\nname = "demo-cnn"\nargs = { width = 4, image_size = 16 }\n'
        '[data]\nname = "shapes"\nargs = { n = 8, size = 16 }\n[[technique]]\nname = "gram-spectrum"\n'
    )
    assert_user_error(run_cli("run", str(config), cwd=tmp_path), "the folder")


@pytest.mark.parametrize("name", ["saliency", "occlusion", "gram-spectrum"])
def test_nan_inputs_are_an_error_naming_the_row(name: str, small_cnn) -> None:
    x = torch.rand(5, 3, 16, 16)
    x[3, 1, 2, 2] = float("nan")
    with pytest.raises(PyengineError, match="input row 3 contains NaN or Inf"):
        pyengine.run(name, small_cnn, x, progress=False)


def test_probe_linear_says_when_it_stops_at_the_iteration_limit(small_cnn, small_shapes) -> None:
    options = dict(data=small_shapes, layers=["classifier.relu4"], concepts=["texture=striped"], progress=False)
    short = pyengine.run("probe-linear", small_cnn, iterations=3, **options)
    assert "stopped at iterations=3 before converging" in short.warning and short.iterations["classifier.relu4"] == 3
    full = pyengine.run("probe-linear", small_cnn, iterations=20000, **options)
    assert full.warning == "" and full.iterations["classifier.relu4"] < 20000
    assert full.gradient_norm["classifier.relu4"] < short.gradient_norm["classifier.relu4"]
