"""One spelling per concept across every registered technique, and a doc for every option."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch

import pyengine
from pyengine.attribution import normalise_target
from pyengine.technique import RowOptions

TECHNIQUES = sorted(pyengine.techniques())

# Old or drifting names, and the spelling every technique uses instead.
RENAMED = {
    "layer": "layers",
    "max_rows": "start/stop",
    "n": "start/stop",
    "n_inputs": "start/stop",
    "compare_rows": "start/stop",
    "rows": "start/stop",
    "limit": "start/stop",
    "threshold": "cutoff or agreement",
    "thresholds": "cutoffs",
    "module": "layers",
    "target_module": "target_layer",
}


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_option_has_a_one_line_doc(name: str) -> None:
    technique = pyengine.techniques()[name]
    for item in technique.Options.describe():
        assert item.doc and "\n" not in item.doc, f"{name}: option {item.name!r} has no one-line doc"


@pytest.mark.parametrize("name", TECHNIQUES)
def test_options_use_the_shared_spellings(name: str) -> None:
    options = {f.name: f for f in fields(pyengine.techniques()[name].Options)}
    drifting = {option: RENAMED[option] for option in options if option in RENAMED}
    assert drifting == {}, f"{name}: rename {drifting}"
    if "start" in options or "stop" in options:
        assert issubclass(pyengine.techniques()[name].Options, RowOptions), f"{name}: rows through RowOptions"
    if "layers" in options:
        default = options["layers"].default
        assert default == (), f"{name}: layers defaults to () (the technique's default layers)"
    if "target" in options:  # always the explained output, never a module path
        normalise_target(options["target"].default)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_a_bad_row_range_is_an_error(name: str) -> None:
    technique = pyengine.techniques()[name]
    if not issubclass(technique.Options, RowOptions):
        pytest.skip(f"{name} reads no rows")
    with pytest.raises(pyengine.OptionsError, match=r"option stop=2 is invalid"):
        technique.options(start=5, stop=2)


def test_an_option_nobody_reads_is_refused() -> None:
    """Pathwise techniques take no memory budget, so passing one is an error, not a no-op."""
    with pytest.raises(pyengine.OptionsError, match="unknown option 'memory_mb'"):
        pyengine.techniques()["path-linear"].options(memory_mb=10)


def test_single_layer_techniques_refuse_several() -> None:
    with pytest.raises(pyengine.OptionsError, match="one layer reference"):
        pyengine.techniques()["grad-cam"].options(layers=["a", "b"])
    assert pyengine.techniques()["grad-cam"].options(layers="features.conv3").layers == ("features.conv3",)


def test_technique_flags_are_declared() -> None:
    flagged = {name for name, t in pyengine.techniques().items() if t.attribution}
    assert {"occlusion", "saliency", "guided-backprop", "integrated-gradients", "grad-cam", "smoothgrad"} <= flagged
    assert "faithfulness" not in flagged and "gram-spectrum" not in flagged
    assert torch.is_tensor(normalise_target([0, 1]))


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("gram-spectrum", {"cutoffs": "1e-6"}, "option cutoffs='1e-6' is invalid: expected a list of numbers"),
        ("gram-spectrum", {"center": "no"}, "option center='no' is invalid: expected true or false"),
        ("gram-spectrum", {"batch_size": 2.5}, "option batch_size=2.5 is invalid: expected an integer"),
        ("probe-linear", {"split": [0.5, 0.5]}, "option split=[0.5, 0.5] is invalid: expected a list of 3 numbers"),
        ("max-patches", {"channels": [1, "2"]}, "option channels=[1, '2'] is invalid: expected a list of integers"),
        ("smoothgrad", {"base_options": [1]}, "option base_options=[1] is invalid: expected a table"),
    ],
)
def test_declared_types_are_enforced(name: str, options: dict, fragment: str) -> None:
    with pytest.raises(pyengine.OptionsError, match=re.escape(f"{name}: {fragment}")):
        pyengine.techniques()[name].options(**options)


def test_one_item_is_a_list_of_one() -> None:
    assert pyengine.techniques()["gram-spectrum"].options(cutoffs=1e-6).cutoffs == (1e-6,)
    assert pyengine.techniques()["max-patches"].options(channels=3).channels == (3,)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_flag_refuses_a_string(name: str) -> None:
    technique = pyengine.techniques()[name]
    flags = [f.name for f in fields(technique.Options) if f.type in ("bool", bool)]
    if not flags:
        pytest.skip(f"{name} has no true/false option")
    for flag in flags:
        with pytest.raises(pyengine.OptionsError, match=f"option {flag}='no' is invalid: expected true or false"):
            technique.options(**{flag: "no"})
