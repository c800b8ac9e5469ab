"""Attribution techniques: parity with Captum, hand-computed cases, batching, targets, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from conftest import assert_user_error, hooks_on, requires_cuda, run_cli
from pyengine.errors import PyengineError
from pyengine.models import DemoCNN, DemoMLP

try:  # only the parity tests need Captum; the rest (the CUDA test among them) run without it
    import captum.attr as captum_attr
except ImportError:
    captum_attr = None
needs_captum = pytest.mark.skipif(captum_attr is None, reason="needs captum")
warnings.filterwarnings("ignore", module="captum")

OCCLUSION_SETTINGS = [  # (window, stride, baseline)
    ((3, 4, 4), (3, 2, 2), 0.0),
    ((1, 5, 3), (1, 3, 2), 0.25),  # windows cut off at the edges, per-channel windows
    ((3, 6, 6), (3, 6, 6), "tensor"),  # non-overlapping, a per-pixel baseline tensor
]


def vgg() -> nn.Module:
    torch.manual_seed(0)
    return DemoCNN(width=4, image_size=16).eval()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return DemoMLP(in_features=3 * 16 * 16, hidden=32).eval()


def images(n: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def assert_equal_maps(ours: torch.Tensor, theirs: torch.Tensor, relative: float = 1e-5) -> None:
    """Equal up to ``relative`` times the largest attribution magnitude."""
    scale = theirs.abs().max().item()
    assert scale > 0
    assert (ours - theirs).abs().max().item() <= relative * scale, ((ours - theirs).abs().max().item(), scale)


def run(name: str, model: nn.Module, x: torch.Tensor, **options: object) -> pyengine.Result:
    return pyengine.run(name, model, x, progress=False, **options)


@needs_captum
@pytest.mark.parametrize("make_model", [vgg, mlp])
@pytest.mark.parametrize("window, stride, baseline", OCCLUSION_SETTINGS)
def test_occlusion_equals_captum_for_every_batching(make_model, window, stride, baseline) -> None:
    model, x = make_model(), images()
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    if baseline == "tensor":
        baseline = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    expected = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=window, strides=stride, baselines=baseline, target=targets
    )
    for batch_size, max_batch in [(1, 1), (2, 3), (3, 7), (7, 0)]:
        res = run(
            "occlusion",
            model,
            x,
            target=targets,
            window=window,
            stride=stride,
            baseline=baseline,
            batch_size=batch_size,
            max_batch=max_batch,
        )
        assert res.attributions.shape == x.shape
        assert_equal_maps(res.attributions, expected)
    assert hooks_on(model) == []


@needs_captum
def test_gradient_techniques_equal_captum() -> None:
    for model in (vgg(), mlp()):
        x, targets = images(), torch.tensor([3, 1, 2, 0, 0, 1, 2])
        for batch_size in (1, 2, 3, 7):
            common = {"target": targets, "batch_size": batch_size, "max_batch": batch_size}
            assert_equal_maps(
                run("saliency", model, x, **common).attributions,
                captum_attr.Saliency(model).attribute(x, target=targets),
            )
            assert_equal_maps(
                run("saliency", model, x, abs=False, **common).attributions,
                captum_attr.Saliency(model).attribute(x, target=targets, abs=False),
            )
            assert_equal_maps(
                run("guided-backprop", model, x, **common).attributions,
                captum_attr.GuidedBackprop(model).attribute(x, target=targets),
            )
            for method in ("gausslegendre", "riemann_trapezoid", "riemann_middle"):
                ours = run("integrated-gradients", model, x, n_steps=16, method=method, baseline=0.1, **common)
                theirs, delta = captum_attr.IntegratedGradients(model).attribute(
                    x, baselines=0.1, target=targets, n_steps=16, method=method, return_convergence_delta=True
                )
                assert_equal_maps(ours.attributions, theirs, relative=1e-4)
                torch.testing.assert_close(ours.delta, delta.double(), rtol=1e-3, atol=1e-6)


@needs_captum
def test_grad_cam_equals_captum_before_upsampling() -> None:
    model, x, targets = vgg(), images(), torch.tensor([3, 1, 2, 0, 0, 1, 2])
    layer = model.features.conv3
    for relu in (False, True):
        theirs = captum_attr.LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=relu)
        for batch_size in (1, 3, 7):
            res = run("grad-cam", model, x, target=targets, layers="features.conv3", relu=relu, batch_size=batch_size)
            assert_equal_maps(res.layer_attributions, theirs)
            upsampled = captum_attr.LayerAttribution.interpolate(theirs, (16, 16), interpolate_mode="bilinear")
            assert_equal_maps(res.attributions, upsampled.expand_as(x))
    default = run("grad-cam", model, x, target=0)
    assert default.layer == "features"  # the last (N, C, H, W) output: after the last pool, as pytorch-grad-cam's VGG
    assert default.defaults.startswith("layers=features (the last (N, C, H, W) output")


@needs_captum
def test_smoothgrad_is_the_mean_of_its_base_over_seeded_noise() -> None:
    model, x, targets = vgg(), images(3), torch.tensor([0, 1, 2])
    res = run("smoothgrad", model, x, target=targets, samples=4, noise=0.2)
    generator = torch.Generator().manual_seed(0)
    sigma = 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    noisy = [x + sigma * torch.randn(x.shape, generator=generator) for _ in range(4)]
    expected = torch.stack([captum_attr.Saliency(model).attribute(n, target=targets) for n in noisy]).mean(0)
    assert_equal_maps(res.attributions, expected)
    guided = run("smoothgrad", model, x, target=targets, samples=2, base="guided-backprop", stdev=0.1)
    assert guided.attributions.shape == x.shape and guided.attributions.abs().sum() > 0


class FunctionalReLUNet(nn.Module):
    """The VGG net's weights, but ReLUs called functionally and in place."""

    def __init__(self, net: DemoCNN, inplace: bool) -> None:
        super().__init__()
        self.net, self.inplace = net, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.features
        for conv, pool in ((f.conv1, f.pool1), (f.conv2, f.pool2), (f.conv3, f.pool3)):
            x = pool(F.relu(conv(x), inplace=self.inplace) if self.inplace else torch.relu(conv(x)))
        c = self.net.classifier
        hidden = c.fc1(self.net.flatten(x))
        return c.fc2(hidden.relu_() if self.inplace else hidden.relu())


@needs_captum
def test_guided_backprop_handles_inplace_and_functional_relus() -> None:
    model, x, targets = vgg(), images(4), torch.tensor([0, 1, 2, 3])
    expected = captum_attr.GuidedBackprop(model).attribute(x, target=targets)
    for inplace in (False, True):
        res = run("guided-backprop", FunctionalReLUNet(model, inplace), x, target=targets)
        assert_equal_maps(res.attributions, expected)
    plain = captum_attr.Saliency(model).attribute(x, target=targets, abs=False)
    assert (plain - expected).abs().max() > 1e-3 * expected.abs().max()  # guided differs from plain gradients


def test_linear_model_cases_by_hand() -> None:
    """f(x) = w·x + c: occluding one feature drops w_i x_i; gradients are w; IG is w ⊙ (x - x0)."""
    model = nn.Linear(6, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, -1.0]]))
        model.bias.fill_(0.7)
    x = torch.tensor([[2.0, 1.0, -4.0, 0.5, 9.0, 3.0]])
    w = model.weight[0].detach()
    occluded = run("occlusion", model, x, target=0, window=(1,), stride=(1,), baseline=0.0)
    torch.testing.assert_close(occluded.attributions[0], w * x[0])
    pairs = run("occlusion", model, x, target=0, window=(2,), stride=(2,), baseline=1.0)
    torch.testing.assert_close(pairs.attributions[0], (w * (x[0] - 1)).view(3, 2).sum(1).repeat_interleave(2))
    torch.testing.assert_close(run("saliency", model, x, target=0, abs=False).attributions[0], w)
    ig = run("integrated-gradients", model, x, target=0, baseline=0.5)
    torch.testing.assert_close(ig.attributions[0], w * (x[0] - 0.5))
    assert ig.max_abs_delta < 1e-5  # complete for a linear model


def test_one_sweep_serves_many_targets() -> None:
    model, x = vgg(), images(3)
    both = run("occlusion", model, x, target=[[0, 2]], window=(3, 4, 4), stride=(3, 2, 2))
    assert both.attributions.shape == (3, 2, 3, 16, 16) and both.targets.shape == (3, 2)
    for k, target in enumerate((0, 2)):
        single = run("occlusion", model, x, target=target, window=(3, 4, 4), stride=(3, 2, 2))
        assert_equal_maps(both.attributions[:, k], single.attributions, relative=1e-6)
    per_input = run("saliency", model, x, target=torch.tensor([[0, 1], [2, 3], [1, 1]]))
    assert per_input.attributions.shape == (3, 2, 3, 16, 16)
    assert_equal_maps(per_input.attributions[2, 0], run("saliency", model, x[2:], target=1).attributions[0])


@needs_captum
def test_predicted_and_label_targets_over_a_dataset_range(small_shapes, tmp_path: Path) -> None:
    model = vgg()
    res = pyengine.run(
        "occlusion",
        model,
        data=small_shapes,
        start=10,
        stop=30,
        batch_size=8,
        target="label",
        window=(4, 4),
        progress=False,
        save=tmp_path / "maps.h5",
    )
    batch = small_shapes.batch(range(10, 30))
    assert torch.equal(res.index, batch.index) and torch.equal(res.targets, batch.labels)
    expected = captum_attr.Occlusion(model).attribute(
        batch.inputs,
        sliding_window_shapes=(3, 4, 4),
        strides=(3, 2, 2),
        target=batch.labels,
        baselines=batch.inputs.mean((2, 3), keepdim=True),
    )
    assert_equal_maps(res.attributions, expected)
    with pyengine.StoreReader(tmp_path / "maps.h5") as reader:
        arrays, attrs = reader.result("occlusion", "run-001")
    assert arrays["attributions"].shape == (20, 3, 16, 16) and attrs["window"] == "(3, 4, 4)"
    predicted = run("saliency", model, batch.inputs[:5])
    assert torch.equal(predicted.targets, model(batch.inputs[:5]).argmax(1))


def test_memory_budget_bounds_the_pass() -> None:
    model, x = vgg(), images(2)
    small = run("occlusion", model, x, target=0, window=(4, 4), memory_mb=0.05)
    large = run("occlusion", model, x, target=0, window=(4, 4))
    assert 1 <= small.samples_per_pass < 5 < 100 < large.samples_per_pass
    assert_equal_maps(small.attributions, large.attributions, relative=1e-6)


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("occlusion", {"window": (20, 20)}, "option window=(20, 20) is invalid: expected sizes that fit the input"),
        ("occlusion", {"window": (4, 4), "stride": (5, 5)}, "never occluded"),
        ("occlusion", {"window": "big"}, "option window='big' is invalid"),
        ("occlusion", {"baseline": "zero"}, "option baseline='zero' is invalid"),
        ("occlusion", {"baseline": torch.zeros(5)}, "baseline has shape (5,)"),
        ("saliency", {"target": "best"}, "option target='best' is invalid"),
        ("saliency", {"target": [0.5]}, "option target=[0.5] is invalid"),
        ("saliency", {"target": 9}, "target 9 is out of range: the model has 4 outputs"),
        ("saliency", {"target": [0, 1]}, "target has 2 rows but there are 3 inputs"),
        ("saliency", {"reduce": "median"}, "option reduce='median' is invalid"),
        ("integrated-gradients", {"method": "simpson"}, "option method='simpson' is invalid"),
        ("grad-cam", {"layers": "features.conv9"}, "no layer 'features.conv9'"),
        ("grad-cam", {"layers": "classifier.fc1"}, "not a feature map laid out like the 4-D inputs"),
        ("smoothgrad", {"base": "gram-spectrum"}, "option base='gram-spectrum' is invalid"),
        ("smoothgrad", {"base_options": {"target": 1}}, "set it on smoothgrad itself"),
    ],
)
def test_bad_options_are_named(name: str, options: dict, fragment: str) -> None:
    model = vgg()
    with pytest.raises(PyengineError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run(name, model, images(3), **options)
    assert hooks_on(model) == []


def test_cli_runs_attributions_from_a_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'out = "maps.h5"\n[model]\nname = "demo-cnn"\nargs = { width = 4, image_size = 16 }\n'
        '[data]\nname = "shapes"\nargs = { n = 20, size = 16 }\ninputs = 0\n'
        '[[technique]]\nname = "occlusion"\noptions = { window = [4, 4], target = [[0, 1]], stop = 3 }\n'
        '[[technique]]\nname = "integrated-gradients"\noptions = { n_steps = 8, target = "label", '
        "start = 5, stop = 8 }\n"
    )
    result = run_cli("run", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with pyengine.StoreReader(tmp_path / "maps.h5") as reader:
        assert reader.result("occlusion", "run-001")[0]["attributions"].shape == (3, 2, 3, 16, 16)
        assert reader.result("integrated-gradients", "run-001")[0]["delta"].shape == (3,)
    config.write_text(config.read_text().replace("window = [4, 4]", "window = [40, 40]"))
    assert_user_error(run_cli("run", str(config), cwd=tmp_path), "window=(40, 40) is invalid")


@requires_cuda
def test_cuda_matches_cpu() -> None:
    model, x, targets = vgg(), images(3), torch.tensor([0, 1, 2])
    for name, options in [
        ("occlusion", {"window": (4, 4)}),
        ("saliency", {}),
        ("guided-backprop", {}),
        ("integrated-gradients", {"n_steps": 8}),
        ("grad-cam", {}),
    ]:
        cpu = run(name, model, x, target=targets, **options).attributions
        gpu = pyengine.run(name, model, x, target=targets, device="cuda", progress=False, **options).attributions
        model.cpu()
        assert_equal_maps(gpu.cpu(), cpu, relative=1e-4)


def test_occlusion_layouts_agree() -> None:
    model, x = vgg(), images(3)
    maps = {
        layout: run(
            "occlusion",
            model,
            x,
            target=[[1, 3]],
            window=(1, 5, 3),
            stride=(1, 3, 2),
            layout=layout,
            baseline=torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)),
        ).attributions
        for layout in ("as-given", "channels-last")
    }
    assert_equal_maps(maps["channels-last"], maps["as-given"], relative=1e-5)
