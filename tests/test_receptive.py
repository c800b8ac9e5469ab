"""Receptive fields in any DAG, checked against measured gradient support.

The reference: in a float64 copy of the model with positive weights, BatchNorm as a positive scale,
max pools measured as average pools over the same windows and squeeze-excitation gates detached,
an input pixel has a nonzero gradient exactly when the unit depends on it through a spatial path;
the bounding box of those pixels must equal the predicted field, unit by unit (corners, edges,
centre; every unit in the planted DAGs), channel by channel.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vision_models import SqueezeExcitation, build, zoo_images

import pyengine
from conftest import hooks_on
from pyengine.context import Context
from pyengine.data import Shapes
from pyengine.errors import PyengineError
from pyengine.plugins.features._receptive import LayerField, receptive_field

Box = tuple[int, int, int, int]


class DetachedGate(nn.Module):
    """A squeeze-excitation module whose gate is a constant (its own ``_scale`` detached)."""

    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se._scale(x).detach() * x


def structural(model: nn.Module) -> nn.Module:
    """A float64 copy whose gradient support is the structural dependency of each unit."""
    copied = copy.deepcopy(model).double().eval()
    for module in list(copied.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            elif isinstance(child, SqueezeExcitation):
                setattr(module, name, DetachedGate(child))
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.abs_().add_(0.05)
                if module.bias is not None:
                    module.bias.abs_()
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.abs_().add_(0.1)
                module.bias.abs_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.abs_().add_(0.1)
    return copied


def measured(
    model: nn.Module,
    layer: str,
    size: int,
    units: list[tuple[int, int, int]],
    image: torch.Tensor | None = None,
    unit_dim: int = 1,
) -> list[Box | None]:
    """The bounding box of the input pixels with a nonzero gradient, for each unit (channel, y, x):
    one copy of the image per unit in one batch (rows are independent in eval mode), one backward.
    ``unit_dim`` 3: the layer is a channels-last map."""
    ctx = Context(model=model, device=torch.device("cpu"))
    if image is None:  # positive, so that every activation of the structural copy is positive
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) + 0.1
    x = image.double().expand(len(units), -1, -1, -1).clone().requires_grad_(True)
    with ctx.record([layer], grad=True) as seen:
        model(x)
        out = seen[layer].movedim(unit_dim, 1)
    c, y, xx = torch.tensor(units).unbind(1)
    out[torch.arange(len(units)), c, y, xx].sum().backward()
    boxes: list[Box | None] = []
    for grad in x.grad.abs().sum(1):  # type: ignore[union-attr]
        rows, cols = grad.any(1).nonzero().flatten(), grad.any(0).nonzero().flatten()
        boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) if len(rows) else None)
    return boxes


def field_of(model: nn.Module, layer: str, size: int) -> LayerField:
    dtype = next(model.parameters(), torch.zeros(())).dtype
    example = torch.rand(1, 3, size, size, dtype=dtype)
    field = receptive_field(Context(model=model, device=torch.device("cpu")), layer, example)
    assert field is not None
    return field


def sample_units(channels: int, height: int, width: int) -> list[tuple[int, int, int]]:
    """Corners, edges and the centre, in the first, a middle and the last channel."""
    spots = {(0, 0), (height - 1, width - 1), (0, width - 1), (height - 1, 0), (height // 2, width // 2)}
    spots |= {(0, width // 2), (height // 2, 0), (height - 1, width // 2)}
    return [(c, y, x) for c in sorted({0, channels // 2, channels - 1}) for y, x in sorted(spots)]


def assert_exact(model: nn.Module, layer: str, size: int, every: bool = False) -> LayerField:
    field = field_of(model, layer, size)
    (height, width), channels = field.layer_size, len(field.group)
    units = (
        [(c, y, x) for c in range(channels) for y in range(height) for x in range(width)]
        if every
        else sample_units(channels, height, width)
    )
    expected = measured(structural(model), layer, size, units)
    predicted = [field.field(c).box(y, x) for c, y, x in units]
    wrong = [(unit, p, e) for unit, p, e in zip(units, predicted, expected, strict=True) if p != e]
    assert wrong == [], f"{layer}: (unit, predicted, measured) {wrong[:4]}"
    return field


# --- the vision zoo ---------------------------------------------------------------------------

ZOO_LAYERS = [
    ("resnet50", "layer2.0.downsample.0"),  # a shortcut conv
    ("resnet50", "layer1.1"),  # a block output (identity shortcut, out += identity, shared relu)
    ("resnet50", "layer2.0"),  # a block output with a strided shortcut
    ("resnet50", "layer4"),
    ("resnet_d", "layer2.0.downsample.0"),  # the ceil_mode, count_include_pad=False average pool
    ("resnet_d", "layer3"),
    ("mobilenet_v3", "features.1.block.0"),  # depthwise, stride 2
    ("mobilenet_v3", "features.1.block.1"),  # after squeeze-excitation
    ("mobilenet_v3", "features.4.block.1"),  # Hardswish after a 5x5 depthwise, stride 2
    ("mobilenet_v3", "features.5"),  # SE, residual
    ("densenet", "features.denseblock1"),  # a concatenation: fields differ by channel
    ("densenet", "features.transition1"),
    ("densenet", "features.norm5"),
    ("convnext", "stem"),  # LayerNorm2d after a 4x4/4 patchify conv
    ("convnext", "stages.1.downsample"),
    ("convnext", "stages.1"),  # 7x7 depthwise, channels-last LayerNorm and MLP, layer scale, residual
    ("vgg16_bn", "features.23"),
    ("vgg16_bn", "features.43"),
    ("demo_cnn", "features.relu2"),
    ("demo_cnn", "features.pool3"),
    ("vit", "conv_proj"),  # the patch embedding has an exact field
]


def test_a_channels_last_map_has_the_fields_of_its_channels_first_source() -> None:
    """ConvNeXt's MLP runs on (N, H, W, C): read with unit_dim=3, unit (c, y, x) of ``mlp.fc1``
    has the measured gradient support of position (y, x), the field of the depthwise conv before."""
    model = zoo_model("convnext", 32)
    example = torch.rand(1, 3, 32, 32)
    ctx = Context(model=model, device=torch.device("cpu"))
    field = receptive_field(ctx, "stages.1.blocks.0.mlp.fc1", example, unit_dim=3)
    depthwise = receptive_field(ctx, "stages.1.blocks.0.conv_dw", example)
    assert field is not None and depthwise is not None and field.layer_size == depthwise.layer_size
    height, width = field.layer_size
    units = sample_units(len(field.group), height, width)
    boxes = measured(structural(model), "stages.1.blocks.0.mlp.fc1", 32, units, unit_dim=3)
    for (c, y, x), box in zip(units, boxes, strict=True):
        assert field.field(c).box(y, x) == box == depthwise.field(0).box(y, x)


@functools.cache
def zoo_model(name: str, size: int) -> nn.Module:
    return build(name, size)


@pytest.mark.parametrize("size", [32, 40])
@pytest.mark.parametrize("name, layer", ZOO_LAYERS)
def test_zoo_fields_are_the_gradient_support(name: str, layer: str, size: int) -> None:
    model = zoo_model(name, size)
    field = assert_exact(model, layer, size)
    assert hooks_on(model) == []
    if name == "mobilenet_v3" and layer != "features.1.block.0":
        assert any("'features.1.block.1'" in note for note in field.also_global)
    else:
        assert field.also_global == ()


@pytest.mark.parametrize(
    "name, layer, size, jump, start",
    [
        ("resnet50", "layer2.0.downsample.0", 27, 8, -13),  # stem 7/2 (7, -3), pool 3/2 (11, -5), two blocks of 3x3
        ("resnet50", "layer2.0", 35, 8, -17),  # ... its block's strided 3x3 adds 2 * 4 on the main path
        ("resnet_d", "layer2.0.downsample.0", 27, 8, -11),  # 3 stem convs, pool (15, -7), 3x3 (23, -11), avg pool 2/2
        ("convnext", "stem", 4, 4, 0),
        ("vit", "conv_proj", 8, 8, 0),
    ],
)
def test_interior_units_have_the_full_geometry(name: str, layer: str, size: int, jump: int, start: int) -> None:
    """On a large image the centre unit's measured support is the whole unclipped field."""
    image = 128 if name != "vit" else 32
    model = zoo_model(name, image)
    field = field_of(model, layer, image)
    assert (field.size, field.jump, field.start) == ((size, size), (jump, jump), (start, start))
    y, x = (n // 2 for n in field.layer_size)
    top, left = field.hull.origin(y, x)
    assert measured(structural(model), layer, image, [(0, y, x)]) == [(top, top + size, left, left + size)]


def test_gates_are_global() -> None:
    """The note is true: with the gate live, a unit after squeeze-excitation depends on every pixel
    (measured in the model as it is, at its most active unit)."""
    model = copy.deepcopy(zoo_model("mobilenet_v3", 32)).double()
    field = field_of(model, "features.1.block.1", 32)
    with torch.no_grad():
        out = model.features[1].block[:2](model.features[0](zoo_images(1, 32).double()))
    c, y, x = (int(i) for i in torch.unravel_index(out[0].argmax(), out.shape[1:]))
    assert field.field(c).box(y, x) != (0, 32, 0, 32)
    assert measured(model, "features.1.block.1", 32, [(c, y, x)], zoo_images(1, 32)) == [(0, 32, 0, 32)]


def test_concatenated_channels_keep_their_own_fields() -> None:
    field = field_of(zoo_model("densenet", 32), "features.denseblock1", 32)
    sizes = [field.field(c).size for c in range(len(field.group))]
    assert sizes[0] == (11, 11) and sizes[-1] == (27, 27) and field.size == (27, 27)  # block input vs layer 2


# --- planted DAGs: every unit -----------------------------------------------------------------


def conv(cin: int, cout: int, k: int, **kwargs: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, **kwargs)


class ChannelShuffle(nn.Module):
    """ShuffleNet-v2 style: split channels, a depthwise branch, concatenate, shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 8, 3, padding=1)
        self.branch = nn.Sequential(conv(4, 4, 3, padding=1, groups=4), nn.ReLU(), conv(4, 4, 3, padding=1, groups=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class SpatialGate(nn.Module):
    """CBAM's spatial attention: a per-position gate from channel mean and max, broadcast over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv(3, 6, 3, stride=2)
        self.gate = conv(2, 1, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)
        return f * torch.sigmoid(self.gate(pooled))


class Cropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv(3, 4, 3, stride=2, dilation=2, padding=3), conv(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[:, :, 1:-1, 2:])


class OptionA(nn.Module):
    """A CIFAR ResNet block with the option-A shortcut: strided slicing, channels padded with zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(3, 4, 3, padding=1), conv(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv1(x))
        return self.conv2(f) + F.pad(f[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))


class EmptyShortcut(nn.Module):
    """A residual block whose identity shortcut is an empty ``nn.Sequential()`` (no module call, no node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv(3, 4, 3, padding=1), conv(4, 4, 3, padding=1), nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv1(x))
        out = self.conv2(f)
        out += self.shortcut(f)
        return torch.relu(out)


class Inception(nn.Module):
    """GoogLeNet/Inception idioms: the input transform (select, unsqueeze, cat), asymmetric 1x7 / 7x1
    kernels, a functional average-pool branch, a ceil_mode max pool, branches concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Sequential(conv(3, 4, (1, 7), padding=(0, 3)), conv(4, 4, (7, 1), padding=(3, 0)))
        self.pooled, self.pool = conv(3, 4, 1), nn.MaxPool2d(3, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(x[:, 0] * 0.5 + 0.1).unsqueeze(1), x[:, 1:]], 1)
        branches = [self.wide(x), self.pooled(F.avg_pool2d(x, 3, stride=1, padding=1))]
        return self.pool(torch.cat(branches, 1))


PLANTED = {
    "valid stride 2 then padded": lambda: nn.Sequential(conv(3, 4, 3, stride=2), conv(4, 4, 3, padding=1)),
    "dilation past the padding": lambda: nn.Sequential(conv(3, 4, 3, dilation=3, padding=2), conv(4, 4, 1, stride=2)),
    "stride beyond the kernel": lambda: nn.Sequential(conv(3, 4, 1, stride=3), conv(4, 4, 3, padding=1)),
    "ceil mode pools": lambda: nn.Sequential(
        conv(3, 4, 3), nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.AvgPool2d(2, ceil_mode=True)
    ),
    "channel shuffle": ChannelShuffle,
    "spatial gate": SpatialGate,
    "crop": Cropped,
    "option-A shortcut": OptionA,
    "empty Sequential shortcut": EmptyShortcut,
    "inception branches": Inception,
    "TF 'same' padding": lambda: nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv(3, 4, 3, stride=2)),
}


@pytest.mark.parametrize("size", [9, 12])
@pytest.mark.parametrize("name", PLANTED)
def test_planted_dags_every_unit(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PLANTED[name]()).eval()  # layer "0": the planted model's output
    field = assert_exact(model, "0", size, every=True)
    if name == "channel shuffle":  # shuffled: even channels are the stem's (3x3), odd ones the branch's (7x7)
        assert [field.field(c).size for c in range(4)] == [(3, 3), (7, 7), (3, 3), (7, 7)]
    assert field.also_global == ()


class GlobalTerm(nn.Module):
    """``x + f(mean(x))``: a global context term broadcast to every position."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.context = conv(3, 4, 3, padding=1), conv(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return f + self.context(f.mean((2, 3), keepdim=True))


def test_global_terms_and_statistics_are_named() -> None:
    term = field_of(nn.Sequential(GlobalTerm()), "0", 16)
    assert term.size == (3, 3) and term.also_global == ("a global gate or term (AddBackward0 in '0')",)
    grouped = field_of(nn.Sequential(conv(3, 4, 3, padding=1), nn.GroupNorm(2, 4)), "1", 16)
    assert grouped.size == (3, 3) and grouped.also_global == (
        "statistics over positions (NativeGroupNormBackward0 in '1')",
    )


class Tokens(nn.Module):
    """A conv map flattened to tokens, self-attention, and back to a map (optionally plus the map)."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.embed, self.attn, self.residual = conv(3, 8, 4, stride=4), nn.MultiheadAttention(8, 2), residual
        self.head = conv(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.embed(x)
        n, c, h, w = f.shape
        tokens = f.flatten(2).permute(2, 0, 1)
        mixed = self.attn(tokens, tokens, tokens, need_weights=False)[0].permute(1, 2, 0).reshape(n, c, h, w)
        return self.head(mixed + f if self.residual else mixed)


@pytest.mark.parametrize("residual", [False, True])
def test_maps_after_attention_see_the_whole_input(residual: bool) -> None:
    """Attention mixes all positions: a map after it sees the whole input, with or without a residual."""
    pattern = r"^receptive field: the units of 'head' see the whole input through a contraction over positions \("
    with pytest.raises(PyengineError, match=pattern + r".*'attn'\)$"):
        field_of(Tokens(residual), "head", 16)


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(x), scale_factor=2)


class Patchified(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 16, h // 4, w // 4)


@pytest.mark.parametrize(
    "model, layer, fragment",
    [
        (nn.Sequential(Upsampled()), "0", "cannot follow positions through UpsampleNearest2DBackward0 in '0'"),
        (nn.Sequential(nn.ConvTranspose2d(3, 4, 2, 2)), "0", "ConvolutionBackward0 in '0' is not a plain 2-d"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 1, padding=1)),
            "0",
            "a unit sees only the padding of ConvolutionBackward0 in '0'",
        ),
        (nn.Sequential(Patchified()), "0", "rows and columns do not map to the input's rows and columns"),
        (nn.Sequential(nn.Unflatten(2, (4, 4)), nn.Flatten(2, 3)), "1", "reshapes across the layer's spatial axes"),
        (nn.Sequential(nn.Flatten(), nn.Linear(48, 48), nn.Unflatten(1, (3, 4, 4))), "2", "see the whole input"),
    ],
)
def test_refusals_name_the_op(model: nn.Module, layer: str, fragment: str) -> None:
    with pytest.raises(PyengineError) as error:
        field_of(model, layer, 4 if isinstance(model[0], nn.Flatten) else 16)
    assert fragment in str(error.value) and "\n" not in str(error.value)


# --- max-patches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layer",
    [
        ("resnet50", "layer2.0"),
        ("resnet50", ""),  # the default layer
        ("mobilenet_v3", "features.3"),
        ("mobilenet_v3", "features.4.block.1"),  # Hardswish
        ("resnet_d", "layer2"),  # after the ceil_mode average pool shortcut
        ("convnext", "stages.1.downsample"),  # after LayerNorm2d
    ],
)
def test_max_patches_crop_exactly_the_field(name: str, layer: str) -> None:
    model, data = zoo_model(name, 64), Shapes(12, seed=1, size=64)
    options = {"layers": layer} if layer else {}
    res = pyengine.run("max-patches", model, data=data, k=3, channels=[0, 5], progress=False, **options)
    chosen = layer or res.layer
    field = field_of(model, chosen, 64)
    assert res.patches.shape[-2:] == field.size and res.field_size == f"{field.size[0]}x{field.size[1]}"
    units = [(int(c), *res.position[i, j].tolist()) for i, c in enumerate(res.channels) for j in range(3)]
    expected = measured(structural(model), chosen, 64, units)
    assert [tuple(b) for b in res.boxes.reshape(-1, 4).tolist()] == expected  # boxes are the gradient support
    inputs = data.batch(res.index.flatten().tolist()).inputs
    for n, (box, (_, y, x)) in enumerate(zip(res.boxes.reshape(-1, 4).tolist(), units, strict=True)):
        y0, y1, x0, x1 = box
        top, left = field.start[0] + y * field.jump[0], field.start[1] + x * field.jump[1]
        patch = res.patches.reshape(-1, *res.patches.shape[2:])[n]
        assert torch.equal(patch[:, y0 - top : y1 - top, x0 - left : x1 - left], inputs[n, :, y0:y1, x0:x1])
        outside = patch.clone()
        outside[:, y0 - top : y1 - top, x0 - left : x1 - left] = 0
        assert outside.abs().sum() == 0  # zero outside the image
    if name == "mobilenet_v3":
        assert "features.1.block.1" in res.also_global and "also the whole input through" in res.summary()


def test_max_patches_on_a_vision_transformer() -> None:
    model, data = zoo_model("vit", 32), Shapes(8, seed=1, size=32)
    res = pyengine.run("max-patches", model, data=data, k=2, progress=False)  # default: the patch embedding
    assert res.layer == "conv_proj" and res.field_size == "8x8" and res.field_jump == "8x8"
    with pytest.raises(PyengineError) as error:
        pyengine.run("max-patches", model, data=data, layers="encoder.layers.encoder_layer_1", progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "max-patches: 'encoder.layers.encoder_layer_1' outputs (1, 17, 32)"
    )
    assert "see the whole input through" in message and "'conv_proj'" in message
