"""Faithfulness: pointing game and deletion/insertion curves, by hand and on the trained demo model."""

from __future__ import annotations

import torch
from torch import nn

import pyengine
from pyengine.data import Shapes
from pyengine.figures import gaussian_blur
from pyengine.plugins.attribution.faithfulness import area_under, deletion_insertion, pointing_game


def test_pointing_game_by_hand() -> None:
    inputs = torch.zeros(3, 1, 8, 8)
    maps = torch.zeros(3, 1, 8, 8)
    maps[0, 0, 2, 3] = 1  # pixel centre (3.5, 2.5): inside (2, 2, 5, 5)
    maps[1, 0, 7, 7] = 1  # (7.5, 7.5): outside
    maps[2, 0, 5, 1] = 1  # (1.5, 5.5): outside by half a pixel, inside with tolerance 1
    boxes = torch.tensor([[2.0, 2.0, 5.0, 5.0]]).repeat(3, 1)
    assert pointing_game(maps, inputs, boxes).tolist() == [True, False, False]
    assert pointing_game(maps, inputs, boxes, tolerance=1.0).tolist() == [True, False, True]


def test_deletion_and_insertion_curves_by_hand() -> None:
    """f(x) = sum of the pixels: deleting the top-k pixels of a map removes exactly their values."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False))
    nn.init.ones_(model[1].weight)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    deletion, insertion = deletion_insertion(
        model, x, x.clone(), torch.zeros(1, dtype=torch.long), steps=4, probability=False
    )
    values = x.flatten().sort(descending=True).values
    expected = [float(values.sum() - values[:k].sum()) for k in (0, 4, 8, 12, 16)]
    torch.testing.assert_close(deletion[0], torch.tensor(expected, dtype=torch.float64))
    canvas = gaussian_blur(x, sigma=1.0).flatten()  # insertion starts from the blurred image
    top = x.flatten().argsort(descending=True)
    inserted = [float(canvas.sum() - canvas[top[:k]].sum() + x.flatten()[top[:k]].sum()) for k in (0, 4, 8, 12, 16)]
    torch.testing.assert_close(insertion[0], torch.tensor(inserted, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(area_under(torch.tensor([[0.0, 1.0, 1.0]])), torch.tensor([0.75]))
    reversed_order, _ = deletion_insertion(model, x, -x, torch.zeros(1, dtype=torch.long), steps=4, probability=False)
    assert area_under(deletion) < area_under(reversed_order)  # the right order deletes faster


def test_occlusion_and_grad_cam_point_at_the_object(trained_demo: nn.Module) -> None:
    """Planted truth: the object. Chance is the boxes' share of the image (a random point);
    grad-cam's default layer is the demo's pooled 4x4 feature map, so its hit rate varies with
    training (0.78 to 0.84 seen across thread counts): it must beat chance threefold."""
    held_out = Shapes(1000, seed=1)
    boxes = held_out.batch(range(100)).boxes
    assert boxes is not None
    chance = float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()) / held_out.size**2
    res = pyengine.run(
        "faithfulness",
        trained_demo,
        data=held_out,
        stop=100,
        curves=False,
        techniques=["occlusion", "grad-cam", "saliency"],
        progress=False,
    )
    assert chance < 0.25
    assert res.pointing["occlusion"] >= 0.8, res.pointing
    assert res.pointing["grad-cam"] >= max(0.7, 3 * chance), (res.pointing, chance)
    assert 0.0 < res.pointing["saliency"] <= 1.0


def test_faithfulness_curves_rank_techniques(trained_demo: nn.Module) -> None:
    held_out = Shapes(1000, seed=1)
    res = pyengine.run(
        "faithfulness",
        trained_demo,
        data=held_out,
        stop=40,
        steps=8,
        techniques=["occlusion"],
        technique_options={"occlusion": {"window": (8, 8)}},
        progress=False,
    )
    assert res.deletion_auc["occlusion"] < res.insertion_auc["occlusion"]
    assert res.deletion_curves["occlusion"].shape == (9,)
    assert "occlusion: pointing" in "\n".join(res.lines())


def test_default_techniques_that_do_not_apply_are_skipped_with_their_reason() -> None:
    """A SiLU model has no ReLU to guide: by default guided-backprop is skipped (its refusal kept in
    the result); named explicitly, its refusal is the answer."""
    import pytest

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    data = Shapes(8, seed=2, size=16)
    res = pyengine.run("faithfulness", model, data=data, stop=4, steps=2, progress=False)
    assert "guided-backprop" in res.skipped and "no ReLU" in res.skipped["guided-backprop"]
    assert "saliency" in res.deletion_auc and "guided-backprop" not in res.deletion_auc
    assert any(line.startswith("guided-backprop: skipped") for line in res.lines())
    with pytest.raises(pyengine.PyengineError, match="applies no ReLU"):
        pyengine.run("faithfulness", model, data=data, stop=4, steps=2, techniques=["guided-backprop"], progress=False)
