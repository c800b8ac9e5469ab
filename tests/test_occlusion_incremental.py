"""Incremental occlusion equals the plain sweep (float32 rounding); its fallbacks say why.

The plain sweep is itself tested against Captum's Occlusion (tests/test_attribution.py); here
every incremental map is compared with the plain sweep's on the same model and settings.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vision_models import build, zoo_images

import pyengine
from conftest import requires_cuda
from pyengine.errors import PyengineError

TOLERANCE = 1e-5  # of the largest |attribution|


def both(model: nn.Module, x: torch.Tensor, **options: Any) -> tuple[Any, Any]:
    plain = pyengine.run("occlusion", model, x, progress=False, sweep="plain", **options)
    fast = pyengine.run("occlusion", model, x, progress=False, sweep="incremental", **options)
    return plain, fast


def assert_close(plain: Any, fast: Any) -> None:
    scale = float(plain.attributions.abs().max())
    assert scale > 0
    assert float((plain.attributions - fast.attributions).abs().max()) <= TOLERANCE * scale
    assert fast.sweep.startswith("incremental (exact)") and plain.sweep.startswith("plain")


@pytest.mark.parametrize(
    ("name", "size", "window", "stride", "batch"),
    [
        ("demo_cnn", 48, (3, 8, 8), (3, 4, 4), 3),
        ("demo_cnn", 48, (1, 5, 7), (1, 3, 2), 1),  # channel windows, windows that do not tile
        ("vgg16_bn", 40, (3, 6, 6), (3, 4, 3), 2),
        ("resnet50", 40, (3, 7, 7), (3, 5, 5), 2),  # BatchNorm, `out += identity`, one relu thrice
        ("resnet_d", 32, (3, 6, 6), (3, 3, 3), 2),  # avg-pool shortcut, ceil_mode pool
        ("densenet", 32, (3, 5, 5), (3, 3, 3), 2),  # concatenations
        ("mobilenet_v3", 32, (3, 6, 6), (3, 3, 3), 2),  # depthwise convs, squeeze-excitation: full after it
        ("convnext", 32, (3, 6, 6), (3, 3, 3), 1),
    ],
)
def test_incremental_equals_plain_on_the_zoo(
    name: str, size: int, window: tuple[int, ...], stride: tuple[int, ...], batch: int
) -> None:
    model = build(name, size)
    x = zoo_images(batch, size, seed=11)
    plain, fast = both(model, x, window=window, stride=stride, target=torch.tensor([[0, 2, 5]]))
    assert plain.attributions.shape == (batch, 3, 3, size, size)
    assert_close(plain, fast)
    assert 0 < fast.flops_ratio < 1
    deepest = pyengine.run(  # every supported op on its box, however large: residual adds, concatenations, ...
        "occlusion",
        model,
        x,
        progress=False,
        window=window,
        stride=stride,
        target=torch.tensor([[0, 2, 5]]),
        full_above=1.0,
    )
    assert_close(plain, deepest)
    assert deepest.flops_ratio <= fast.flops_ratio


class Branches(nn.Module):
    """Stride, padding, dilation, groups, avg/max pools, a residual add and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.relu = nn.ReLU(inplace=True)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(2)
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        y = self.bn(self.dilated(x))
        y += x
        y = self.relu(y)
        z = torch.cat([self.pool(y), F.gelu(self.side(self.pool(y)))], dim=1)
        z = self.avg(z)
        return self.head(z.mean((2, 3)))


def test_incremental_handles_strides_dilation_groups_pools_adds_and_concatenation() -> None:
    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 23, 19)
    for window, stride in (((3, 6, 6), (3, 3, 3)), ((2, 9, 5), (1, 4, 3))):
        # full_above=1: every supported op runs on its box, however large (the mechanism, not the heuristic)
        plain, fast = both(model, x, window=window, stride=stride, target=torch.tensor([[1, 3]]), full_above=1.0)
        assert_close(plain, fast)
        assert "in full from mean" in fast.sweep


def test_several_passes_and_a_blurred_baseline_give_the_same_maps() -> None:
    model = build("demo_cnn", 32)
    x = zoo_images(3, 32, seed=4)
    options = dict(window=(3, 6, 6), stride=(3, 3, 3), baseline="blur")
    plain, fast = both(model, x, **options)
    assert_close(plain, fast)
    scale = float(fast.attributions.abs().max())
    small = pyengine.run("occlusion", model, x, progress=False, sweep="incremental", max_batch=5, **options)
    assert float((small.attributions - fast.attributions).abs().max()) <= TOLERANCE * scale
    # a budget that holds the cached values of one image at a time: blocks of images, same maps
    tight = pyengine.run("occlusion", model, x, progress=False, sweep="incremental", memory_mb=0.5, **options)
    assert float((tight.attributions - fast.attributions).abs().max()) <= TOLERANCE * scale


class StdConv2d(nn.Conv2d):
    """timm's weight-standardised convolution: a Conv2d whose forward computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(F.pad(x, (1, 2, 1, 2)), weight, self.bias, self.stride, 0)


def test_subclasses_that_override_forward_are_not_taken_for_their_base() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), StdConv2d(6, 6, 4), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 20 * 20, 3)
    ).eval()
    x = torch.randn(2, 3, 20, 20)
    plain, fast = both(model, x, window=(3, 4, 4), stride=(3, 2, 2))
    assert_close(plain, fast)
    assert "in full from pad" in fast.sweep  # fx traces into the subclass: its own ops run, in full from its pad


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(y.mean()) > 100:  # data-dependent control flow: torch.fx cannot trace it
            y = -y
        return self.fc(y.mean((2, 3)))


def test_models_fx_cannot_trace_run_the_plain_sweep_and_say_why() -> None:
    torch.manual_seed(0)
    model, x = Untraceable().eval(), torch.randn(2, 3, 16, 16)
    auto = pyengine.run("occlusion", model, x, progress=False, window=(3, 4, 4))
    assert auto.sweep.startswith("plain: torch.fx cannot trace Untraceable")
    with pytest.raises(PyengineError, match="sweep='incremental' cannot run on this model: torch.fx cannot trace"):
        pyengine.run("occlusion", model, x, progress=False, window=(3, 4, 4), sweep="incremental")
    plain = pyengine.run("occlusion", model, x, progress=False, window=(3, 4, 4), sweep="plain")
    assert torch.equal(auto.attributions, plain.attributions)


def test_a_model_whose_first_op_is_global_runs_plain() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    result = pyengine.run("occlusion", model, torch.randn(2, 3, 8, 8), progress=False, window=(3, 2, 2))
    assert result.sweep.startswith("plain: the first op on the input runs in full")


def test_field_cap_is_exact_where_it_does_not_bind_and_cheaper_where_it_does() -> None:
    torch.manual_seed(0)
    shallow = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 3)).eval()
    x = torch.randn(2, 3, 32, 32)
    exact = pyengine.run("occlusion", shallow, x, progress=False, window=(3, 4, 4))
    capped = pyengine.run("occlusion", shallow, x, progress=False, window=(3, 4, 4), field_cap=0.5)
    assert torch.allclose(capped.attributions, exact.attributions, rtol=0, atol=1e-6)  # 6-pixel boxes: under the cap
    deep = build("vgg16_bn", 40)
    images = zoo_images(1, 40, seed=2)
    exact = pyengine.run("occlusion", deep, images, progress=False, window=(3, 6, 6), stride=(3, 4, 4))
    capped = pyengine.run("occlusion", deep, images, progress=False, window=(3, 6, 6), stride=(3, 4, 4), field_cap=0.3)
    assert capped.flops_ratio < exact.flops_ratio and "approximate: field_cap=0.3" in capped.sweep
    assert not torch.equal(capped.attributions, exact.attributions)


def test_drilldown_equals_exact_on_the_pixels_it_refines() -> None:
    """A pixel in the refined fraction has every fine window over it run: its value is exact."""
    model = build("resnet50", 40)
    x = zoo_images(2, 40, seed=6)
    options = dict(window=(3, 6, 6), stride=(3, 2, 2), target=torch.tensor([3]))
    exact = pyengine.run("occlusion", model, x, progress=False, **options)
    coarse = pyengine.run("occlusion", model, x, progress=False, **{**options, "stride": (3, 4, 4)})
    drilled = pyengine.run("occlusion", model, x, progress=False, drilldown=0.2, **options)
    saliency = coarse.attributions.abs().sum(1).flatten(1)
    keep = int(0.2 * saliency.shape[1])
    refined = saliency >= saliency.topk(keep, 1).values[:, -1:]
    scale = float(exact.attributions.abs().max())
    difference = (drilled.attributions - exact.attributions).abs().amax(1).flatten(1)
    assert float(difference[refined].max()) <= TOLERANCE * scale
    assert float(difference[~refined].max()) > TOLERANCE * scale  # elsewhere: the coarse map stands
    assert "drilldown=0.2" in drilled.sweep and drilled.flops_ratio < exact.flops_ratio


def test_sweep_options_are_checked() -> None:
    model, x = build("demo_cnn", 32), zoo_images(1, 32, seed=1)
    for option, value in (("sweep", "fast"), ("field_cap", 0.0), ("drilldown", 1.0), ("full_above", 2)):
        with pytest.raises(PyengineError, match=f"option {option}="):
            pyengine.run("occlusion", model, x, progress=False, **{option: value})


@requires_cuda
def test_incremental_equals_plain_on_cuda() -> None:
    model = build("resnet50", 40).cuda()
    x = zoo_images(2, 40, seed=3).cuda()
    plain, fast = both(model, x, window=(3, 7, 7), stride=(3, 4, 4), target=torch.tensor([[0, 1]]))
    assert_close(plain, fast)


def test_a_leaf_conv_subclass_overriding_forward_runs_in_full() -> None:
    """A Conv2d subclass fx keeps whole (a leaf, as torch.nn's own are) is not computed on boxes
    as a Conv2d: its forward may pad or change the weights."""
    from pyengine.plugins.attribution import _incremental

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), StdConv2d(6, 6, 4)).eval()
    graph = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    plan = _incremental.make_plan(graph, torch.randn(1, 3, 20, 20), torch.tensor([[0, 0], [8, 8]]), (4, 4), 1.0, 1.0)
    modes = {node.name: step.mode for node, step in plan.steps.items()}
    assert modes["_0"] == "inc" and modes["_2"] == "full"


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, StdConv2d) or super().is_leaf_module(m, qualname)


def test_an_unforeseen_failure_of_the_incremental_sweep_falls_back_to_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyengine.plugins.attribution import _incremental

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("shapes do not match\nmore")

    monkeypatch.setattr(_incremental.Sweep, "run", broken)
    model, x = build("demo_cnn", 32), zoo_images(2, 32, seed=1)
    auto = pyengine.run("occlusion", model, x, progress=False, window=(3, 6, 6), batch_size=1)
    assert auto.sweep == "plain: the incremental sweep failed (RuntimeError: shapes do not match)"
    plain = pyengine.run("occlusion", model, x, progress=False, window=(3, 6, 6), batch_size=1, sweep="plain")
    assert torch.equal(auto.attributions, plain.attributions)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        pyengine.run("occlusion", model, x, progress=False, window=(3, 6, 6), sweep="incremental")
