"""Feature visualization: receptive fields, max-patches vs brute force, filters, activations,
activation maximization on the trained demo model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import pyengine
from conftest import hooks_on
from pyengine.context import Context
from pyengine.data import Shapes
from pyengine.errors import PyengineError
from pyengine.plugins.features._receptive import receptive_field

VGG = [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(4, 4, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(4, 4, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
]
MIXED = [
    nn.Conv2d(3, 4, 5, stride=2, padding=1),
    nn.ReLU(),
    nn.Conv2d(4, 4, 3, dilation=2, padding=2),
    nn.AvgPool2d(3, stride=2, padding=1),
    nn.Conv2d(4, 2, 3, stride=2),
]


@pytest.mark.parametrize(
    "layers, size, jump, start",
    [
        (VGG[:1], 3, 1, -1),  # one 3x3 conv, padding 1
        (VGG[:4], 5, 1, -2),  # two of them
        (VGG, 12, 4, -4),  # ... then pool 2 (6, jump 2), conv (10, start -4), pool 2 (12, jump 4)
        (MIXED, 25, 8, -7),  # conv 5/2 (5, jump 2, start -1), dilated conv (13, -5), avg pool (17, jump 4, -7), conv/2
    ],
)
def test_receptive_fields_by_hand(layers: list[nn.Module], size: int, jump: int, start: int) -> None:
    model = nn.Sequential(*layers).eval()
    field = receptive_field(
        Context(model=model, device=torch.device("cpu")), str(len(layers) - 1), torch.zeros(1, 3, 32, 32)
    )
    assert field.size == (size, size) and field.jump == (jump, jump) and field.start == (start, start)


@pytest.mark.parametrize("layers", [VGG, MIXED])
def test_receptive_field_is_the_gradient_support(layers: list[nn.Module]) -> None:
    """With positive weights and average pooling every pixel in the field reaches the unit."""
    surrogate = [nn.AvgPool2d(m.kernel_size, m.stride, m.padding) if isinstance(m, nn.MaxPool2d) else m for m in layers]
    model = nn.Sequential(*surrogate).eval()
    for module in model:
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 0.1)
            nn.init.constant_(module.bias, 1.0)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = model(x)
    field = receptive_field(Context(model=model, device=torch.device("cpu")), str(len(layers) - 1), x.detach())
    for y, xx in [(0, 0), (out.shape[2] // 2, out.shape[3] // 2), (out.shape[2] - 1, out.shape[3] - 1)]:
        grad = torch.autograd.grad(out[0, 0, y, xx], x, retain_graph=True)[0][0].abs().sum(0)
        support = (grad > 0).nonzero()
        y0, y1, x0, x1 = field.box(y, xx)
        assert (int(support[:, 0].min()), int(support[:, 0].max()) + 1) == (y0, y1)
        assert (int(support[:, 1].min()), int(support[:, 1].max()) + 1) == (x0, x1)


def brute_force_top(model: nn.Module, data: Shapes, layer: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    with torch.no_grad():
        model(data.batch(range(len(data))).inputs)
    handle.remove()
    values = captured[0].flatten(2).amax(-1)  # (N, C)
    order = torch.sort(values.t(), dim=1, descending=True, stable=True)  # ties: lower index first
    return order.values[:, :k], order.indices[:, :k]


@pytest.mark.parametrize("batch_size", [96, 10, 32])  # 96 and 32 divide N = 96, 10 does not
def test_max_patches_equal_brute_force(small_cnn: nn.Module, small_shapes: Shapes, batch_size: int) -> None:
    res = pyengine.run(
        "max-patches", small_cnn, data=small_shapes, layers="features.relu2", k=5, batch_size=batch_size, progress=False
    )
    values, index = brute_force_top(small_cnn, small_shapes, "features.relu2", 5)
    assert torch.equal(res.index, index)
    torch.testing.assert_close(res.values, values)
    assert res.patches.shape == (8, 5, 3, 8, 8) and res.field_size == "8x8"  # conv 3, pool 2, conv 3
    # each patch is the input under the unit's field: its top-left pixel for a unit away from the border
    inputs = small_shapes.batch(res.index.flatten().tolist()).inputs.view(8, 5, 3, 16, 16)
    for c in range(8):
        for j in range(5):
            y, x = res.position[c, j].tolist()
            y0, x0 = -3 + 2 * y, -3 + 2 * x
            if y0 >= 0 and x0 >= 0 and y0 + 8 <= 16 and x0 + 8 <= 16:
                assert torch.equal(res.patches[c, j], inputs[c, j, :, y0 : y0 + 8, x0 : x0 + 8])
            else:  # cut off by the border: the part outside the image is zero
                assert res.patches[c, j].abs().sum() <= inputs[c, j].abs().sum()


def test_max_patches_from_the_store_equal_a_fresh_pass(small_cnn: nn.Module, small_shapes: Shapes, tmp_path) -> None:
    store = pyengine.capture(
        small_cnn, small_shapes, ["features.relu3"], tmp_path / "a.h5", dtype="float32", progress=False
    )
    stored = pyengine.run(
        "max-patches",
        small_cnn,
        data=small_shapes,
        store=store,
        layers="features.relu3",
        k=4,
        guided=True,
        progress=False,
    )
    fresh = pyengine.run("max-patches", small_cnn, data=small_shapes, layers="features.relu3", k=4, progress=False)
    assert torch.equal(stored.index, fresh.index) and torch.equal(stored.position, fresh.position)
    assert stored.guided.shape == stored.patches.shape and stored.guided.abs().sum() > 0
    assert hooks_on(small_cnn) == []


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"layers": "features.conv9"}, "no layer 'features.conv9'"),
        ({"layers": "features.relu2", "channels": [8]}, "channel 8 is out of range: 'features.relu2' has 8 channels"),
        ({"k": 97}, "k=97 is larger than the 96 rows scanned"),
    ],
)
def test_max_patches_errors(small_cnn: nn.Module, small_shapes: Shapes, options: dict, fragment: str) -> None:
    with pytest.raises(PyengineError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pyengine.run("max-patches", small_cnn, data=small_shapes, progress=False, **options)


def test_filters_and_activations(small_cnn: nn.Module, small_shapes: Shapes) -> None:
    filters = pyengine.run("filters", small_cnn, progress=False)
    weight = small_cnn.features.conv1.weight.detach()
    assert filters.images.shape == weight.shape
    flat = filters.images.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(4)) and torch.testing.assert_close(flat.amax(1), torch.ones(4))
    grey = nn.Sequential(OrderedDict([("conv", nn.Conv2d(2, 5, 3)), ("relu", nn.ReLU())]))
    assert pyengine.run("filters", grey, progress=False).images.shape == (10, 1, 3, 3)
    x = small_shapes.batch(range(3)).inputs
    acts = pyengine.run("activations", small_cnn, x, stop=3, progress=False)
    expected = small_cnn.features.relu1(small_cnn.features.conv1(x))
    torch.testing.assert_close(acts.maps, expected.detach())
    assert acts.zero_fraction == pytest.approx(float((expected == 0).double().mean()))
    torch.testing.assert_close(acts.channel_max, expected.transpose(0, 1).flatten(1).amax(1).detach())
    with pytest.raises(PyengineError, match="expected an nn.Conv2d"):
        pyengine.run("filters", small_cnn, layers="features.relu1", progress=False)


def test_activation_maximization_is_seeded_and_takes_many_objectives(
    small_cnn: nn.Module, small_shapes: Shapes
) -> None:
    objectives = [
        {"class": 1},
        {"layer": "features.relu2", "channel": 3, "y": 4, "x": 4},
        {"layer": "classifier.relu4", "unit": 7},
        {"terms": [{"class": 0, "weight": 1.0}, {"class": 1, "weight": -0.5}]},
        {"layer": "features.relu3", "direction": torch.randn(16).tolist()},
    ]
    runs = [
        pyengine.run(
            "activation-maximization",
            small_cnn,
            data=small_shapes,
            objectives=objectives,
            steps=30,
            parameterization=p,
            progress=False,
        )
        for p in ("fourier", "pixel", "fourier")
    ]
    assert runs[0].images.shape == (5, 3, 16, 16)
    assert torch.equal(runs[0].images, runs[2].images)  # seeded
    assert float(runs[0].images.min()) >= float(small_shapes.batch(range(64)).inputs.min()) - 1e-6
    assert runs[0].curve["mean_objective"][-1] > runs[0].curve["mean_objective"][0]
    assert hooks_on(small_cnn) == []
    with pytest.raises(PyengineError, match="option objectives"):
        pyengine.run(
            "activation-maximization", small_cnn, data=small_shapes, objectives=[{"neuron": 1}], progress=False
        )


def test_activation_maximization_beats_the_dataset_on_the_demo_model(trained_demo: nn.Module) -> None:
    res = pyengine.run(
        "activation-maximization",
        trained_demo,
        data=Shapes(1000, seed=1),
        layers="features.conv3",
        steps=64,
        progress=False,
    )
    assert len(res.names) == 32
    assert res.beats_dataset >= 0.9, (res.objective, res.dataset_best)
