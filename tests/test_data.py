"""The embedded shapes data and demo models."""

from __future__ import annotations

import pytest
import torch

from pyengine.data import Shapes
from pyengine.errors import PyengineError
from pyengine.models import DemoCNN, DemoMLP


def test_rows_depend_only_on_seed_and_index() -> None:
    data = Shapes(50, seed=7)
    whole = data.batch(range(50))
    single = data.batch([31, 4])
    assert torch.equal(single.inputs, whole.inputs[[31, 4]])
    assert torch.equal(single.labels, whole.labels[[31, 4]])
    assert not torch.equal(Shapes(50, seed=8).batch([4]).inputs, single.inputs[1:])
    assert whole.inputs.shape == (50, 3, 64, 64) and 0 <= float(whole.inputs.min()) <= float(whole.inputs.max()) <= 1


def test_labels_concepts_and_boxes() -> None:
    data = Shapes(2000, seed=0, size=32)
    batch = data.batch(range(2000))
    for values, count in ((batch.labels, 4), (batch.concepts["texture"], 3), (batch.concepts["colour"], 4)):
        frequencies = torch.bincount(values, minlength=count).float() / 2000
        assert frequencies.min() > 0.8 / count and frequencies.max() < 1.2 / count
    boxes = batch.boxes
    assert boxes is not None
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 2] > boxes[:, 0]).all())
    # The object is the only saturated colour: its pixels lie inside the box.
    saturation = batch.inputs.max(1).values - batch.inputs.min(1).values
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    inside = (
        (xs >= boxes[:, 0, None, None] - 1)
        & (xs <= boxes[:, 2, None, None] + 1)
        & (ys >= boxes[:, 1, None, None] - 1)
        & (ys <= boxes[:, 3, None, None] + 1)
    )
    saturated = saturation > 0.6
    assert float(saturated[~inside].float().mean()) < 5e-3  # background noise only
    assert float(saturated[inside].float().mean()) > 0.2


def test_bad_arguments() -> None:
    with pytest.raises(PyengineError, match="n=0 is invalid"):
        Shapes(0)
    with pytest.raises(PyengineError, match="index out of range"):
        Shapes(5).batch([5])


def test_models_forward() -> None:
    assert DemoCNN()(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    assert DemoCNN(in_channels=1, num_classes=7, image_size=32)(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert DemoMLP()(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in DemoCNN().modules())
