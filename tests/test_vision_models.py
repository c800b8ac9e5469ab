"""The vision zoo: every model runs at two sizes with signal, keeps its library's idioms and names, is reproducible."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from vision_models import (
    NUM_CLASSES,
    SIZE_BOUND,
    ZOO,
    Bottleneck,
    InvertedResidual,
    LayerNorm2d,
    VisionTransformer,
    calibrate,
    densenet_style,
    init_signal,
    zoo_images,
)

from conftest import hooks_on
from pyengine.models import DemoCNN

SIZES = (32, 40)


@functools.cache
def zoo_model(name: str, size: int = 32) -> Any:
    """The zoo model, built once per test session (tests only run it and add hooks they remove)."""
    return ZOO[name](size)


@contextmanager
def saved_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[tuple[Any, int, Any]]]]:
    """Each named module's outputs during the block: (output, its version counter then, a copy made then)."""
    seen: dict[str, list[tuple[Any, int, Any]]] = {name: [] for name in names}
    modules = dict(model.named_modules())

    def hook(name: str) -> Any:
        def save(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                seen[name].append((output, output._version, output.detach().clone()))
            else:
                seen[name].append((output, -1, None))

        return save

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_model_runs_with_signal(name: str, size: int) -> None:
    model = zoo_model(name, size)
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        logits = model(zoo_images(8, size, seed=1))
        other = model(zoo_images(8, size, seed=2))
    assert logits.shape == (8, NUM_CLASSES)
    assert logits.isfinite().all()
    assert logits.std(dim=0).min() > 0.02  # every class's logit varies across images
    assert (logits - other).abs().max() > 0.05


@pytest.mark.parametrize("name", sorted(set(ZOO) - SIZE_BOUND))
def test_size_free_models_run_at_another_size_once_built(name: str) -> None:
    with torch.no_grad():
        logits = zoo_model(name, 32)(zoo_images(4, 48, seed=1))
    assert logits.shape == (4, NUM_CLASSES) and logits.isfinite().all()


def test_factories_are_reproducible_and_leave_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first: Any = ZOO["resnet_d"]()
    second = ZOO["resnet_d"]()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    other: Any = ZOO["resnet50"]()
    assert torch.equal(
        other.conv1.weight, ZOO["resnet50"](40).get_parameter("conv1.weight")
    )  # the same weights at any size
    assert not torch.equal(other.fc.weight[:, :10], first.fc.weight[:, :10])  # each model has its own seed


def test_calibrate_sets_batchnorm_statistics_from_the_images() -> None:
    """After calibration, in eval mode each BN output's channel mean is its bias and its spread its weight.

    Not exact: calibration normalises with batch statistics and eval with the (unbiased) running ones."""
    torch.manual_seed(0)
    model, images = init_signal(densenet_style()), zoo_images(64, 32, seed=5)
    calibrate(model, images)
    assert not model.training
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 11
    with torch.no_grad(), saved_outputs(model, norms) as seen:
        model(images)
    modules = dict(model.named_modules())
    for name in norms:
        norm = modules[name]
        assert isinstance(norm, nn.BatchNorm2d) and norm.momentum == 0.1
        output = seen[name][0][2]  # copied before the in-place ReLUs that follow
        torch.testing.assert_close(output.mean(dim=(0, 2, 3)), norm.bias, atol=2e-3, rtol=0)
        torch.testing.assert_close(output.std(dim=(0, 2, 3)), norm.weight.abs(), atol=2e-2, rtol=2e-2)


def test_resnet_bottleneck_idioms_and_torchvision_names() -> None:
    model = zoo_model("resnet50")
    names = dict(model.named_modules())
    for name in ["conv1", "bn1", "relu", "maxpool", "layer1.1.conv3", "layer4.0.relu", "avgpool", "fc"]:
        assert name in names, name
    assert names["layer1.1"].downsample is None
    projection = names["layer4.0.downsample.0"]
    assert isinstance(projection, nn.Conv2d) and projection.kernel_size == (1, 1) and projection.stride == (2, 2)
    assert isinstance(names["layer4.0.downsample.1"], nn.BatchNorm2d)
    assert isinstance(names["layer4.0"], Bottleneck) and names["layer4.0.relu"].inplace
    with torch.no_grad(), saved_outputs(model, ["layer4.0.relu", "layer4.0.bn3", "layer1.1.bn3"]) as seen:
        model(zoo_images(2, 32, seed=1))
    assert len(seen["layer4.0.relu"]) == 3  # one module called three times
    for name in ["layer4.0.bn3", "layer1.1.bn3"]:  # out += identity wrote into bn3's output
        ((output, version, _),) = seen[name]
        assert output._version > version


def test_vgg16_bn_structure() -> None:
    model = zoo_model("vgg16_bn")
    kinds = [type(m) for m in model.features]
    assert kinds.count(nn.Conv2d) == 13 and kinds.count(nn.BatchNorm2d) == 13 and kinds.count(nn.MaxPool2d) == 5
    convs_between_pools = [
        len(block) // 3 for block in "".join("M" if k is nn.MaxPool2d else "c" for k in kinds).split("M")[:-1]
    ]
    assert convs_between_pools == [2, 2, 3, 3, 3]
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert model.avgpool.output_size == (7, 7)


def test_mobilenet_v3_idioms() -> None:
    model = zoo_model("mobilenet_v3")
    modules = list(model.modules())
    depthwise = [m for m in modules if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert {m.kernel_size for m in depthwise} == {(3, 3), (5, 5)} and any(m.stride == (2, 2) for m in depthwise)
    assert any(isinstance(m, nn.Hardsigmoid) for m in modules) and any(isinstance(m, nn.Hardswish) for m in modules)
    assert isinstance(model.features[0][2], nn.Hardswish)
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear]
    residual = [f"features.{i}.block" for i, m in enumerate(model.features) if getattr(m, "use_res_connect", False)]
    assert len(residual) == 2 and all(isinstance(model.get_submodule(n[:-6]), InvertedResidual) for n in residual)
    with torch.no_grad(), saved_outputs(model, residual) as seen:
        model(zoo_images(2, 32, seed=1))
    for name in residual:  # result += input
        ((output, version, _),) = seen[name]
        assert output._version > version


def test_densenet_idioms() -> None:
    model = zoo_model("densenet")
    names = [name for name, _ in model.features.named_children()]
    assert names == ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "norm5"]
    assert [name for name, _ in model.features.transition1.named_children()] == ["norm", "relu", "conv", "pool"]
    layer = model.features.denseblock2.denselayer2
    assert [n for n, _ in layer.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    inputs: list[tuple[Any, int]] = []  # the block appends to the list it passed, so note its length at the call
    handle = layer.register_forward_pre_hook(lambda module, args: inputs.append((args[0], len(args[0]))))
    try:
        with torch.no_grad(), saved_outputs(model, ["features.norm5"]) as seen:
            model(zoo_images(2, 32, seed=1))
    finally:
        handle.remove()
    ((features, length),) = inputs
    assert isinstance(features, list) and length == 2  # the block's input and the first layer's maps
    ((norm5, version, _),) = seen["features.norm5"]
    assert norm5._version > version and norm5.min() >= 0  # F.relu(features, inplace=True)


def test_vit_idioms() -> None:
    model = zoo_model("vit", 40)
    assert isinstance(model, VisionTransformer) and model.seq_length == 26
    names = dict(model.named_modules())
    block = "encoder.layers.encoder_layer_1"
    for name in ["conv_proj", f"{block}.ln_1", f"{block}.ln_2", f"{block}.mlp.3", "encoder.ln", "heads.head"]:
        assert name in names, name
    attention = names[f"{block}.self_attention"]
    assert isinstance(attention, nn.MultiheadAttention) and attention.batch_first
    assert [type(m) for m in names[f"{block}.mlp"].children()] == [
        nn.Linear,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
        nn.Dropout,
    ]
    with torch.no_grad(), saved_outputs(model, [f"{block}.self_attention"]) as seen:
        model(zoo_images(2, 40, seed=1))
    ((output, _, _),) = seen[f"{block}.self_attention"]
    assert isinstance(output, tuple) and output[1] is None and output[0].shape == (2, 26, 32)
    with pytest.raises(AssertionError, match="Wrong image height"):
        model(zoo_images(2, 32, seed=1))


def test_resnet_d_shortcuts_pool_with_ceil_mode() -> None:
    model = zoo_model("resnet_d", 40)
    assert isinstance(model.layer1[0].downsample[0], nn.Identity)
    for i in (2, 3, 4):
        pool = model.get_submodule(f"layer{i}.0.downsample.0")
        assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and not pool.count_include_pad
        assert isinstance(model.get_submodule(f"layer{i}.0.downsample.1"), nn.Conv2d)
    with torch.no_grad(), saved_outputs(model, ["layer3.0.downsample.0", "layer3.0.bn3"]) as seen:
        model(zoo_images(2, 40, seed=1))
    ((pooled, _, _),) = seen["layer3.0.downsample.0"]
    ((main, version, _),) = seen["layer3.0.bn3"]
    assert pooled.shape[-1] == main.shape[-1] == 3  # an odd 5x5 map: ceil mode keeps the shortcut aligned
    assert main._version > version  # x += shortcut


def test_convnext_layernorm2d_and_layer_scale() -> None:
    model = zoo_model("convnext")
    norms = [m for m in model.modules() if isinstance(m, LayerNorm2d)]
    assert len(norms) == 1 + 3 + 1  # stem, three downsample layers, head
    x = torch.randn(2, 8, 5, 3)
    norm = norms[0]
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    block = model.stages[2].blocks[1]
    assert block.conv_dw.groups == block.conv_dw.in_channels and block.conv_dw.kernel_size == (7, 7)
    assert block.gamma.shape == (32,) and isinstance(block.mlp.act, nn.GELU)
    downsample = model.stages[1].downsample
    assert isinstance(downsample[0], LayerNorm2d) and downsample[1].stride == (2, 2) == downsample[1].kernel_size
    assert isinstance(model.stages[0].downsample, nn.Identity)


def test_demo_cnn_is_the_package_model_and_hooks_are_left_clean() -> None:
    model = zoo_model("demo_cnn", 40)
    assert isinstance(model, DemoCNN)
    for name in ZOO:
        assert hooks_on(zoo_model(name, 32)) == []


def test_calibrate_uses_the_batch_not_a_running_blend() -> None:
    """momentum=None: one batch gives exactly its statistics, whatever the momentum was."""
    norm = nn.BatchNorm2d(3, momentum=0.01)
    images = zoo_images(16, 32, seed=9)
    calibrate(nn.Sequential(norm), images)
    torch.testing.assert_close(norm.running_mean, images.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(norm.running_var, images.var(dim=(0, 2, 3), unbiased=True))
    assert norm.momentum == 0.01 and not norm.training
