"""A zoo of real vision architectures, small and randomly initialised, written in their libraries' idioms.

Each model keeps the structure users load from torchvision or timm (module names, one ``self.relu``
called several times, ``out += identity``, ``F.relu(..., inplace=True)``, LayerNorm2d, attention
returning a tuple) at narrow widths and few blocks, so a forward of 8 small images takes milliseconds.
``ZOO[name](image_size)`` builds a model on a fixed seed, with weights that carry signal and
BatchNorm statistics set from ``zoo_images``; every model but ``vit`` and ``demo_cnn`` (whose
structure depends on it) accepts any image size >= 32 once built.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm_models import NUM_CLASSES, ConvNeXt, LayerNorm2d, TimmResNet, convnext_style, resnet_d_style
from torch import nn

from pyengine.data import Batch, Shapes
from pyengine.models import DemoCNN

__all__ = [
    "NUM_CLASSES", "SIZE_BOUND", "ZOO", "Bottleneck", "ConvNeXt", "DemoCNN", "DenseNet", "InvertedResidual",
    "LayerNorm2d", "MobileNetV3", "ResNet", "TimmResNet", "VGG", "VisionTransformer", "build", "calibrate",
    "convnext_style", "densenet_style", "init_signal", "mobilenet_v3_style", "resnet50_style", "resnet_d_style",
    "vgg16_bn_style", "vit_style", "zoo_batch", "zoo_images",
]  # fmt: skip


# --- torchvision ResNet (Bottleneck) -------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1, 3x3 (strided), 1x1 x4; one ``self.relu`` called three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet: 7x7/2 stem, max pool, ``layer1..layer4``, adaptive average pool, ``fc``."""

    def __init__(self, layers: list[int], num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet50_style(num_classes: int = NUM_CLASSES) -> ResNet:
    """ResNet-50's structure at width 8 and blocks [2, 1, 1, 1]."""
    return ResNet([2, 1, 1, 1], num_classes)


# --- torchvision VGG-16-BN -----------------------------------------------------------------------

VGG_D: list[int | str] = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]


class VGG(nn.Module):
    """torchvision's VGG: ``features``, ``avgpool`` to 7x7, ``classifier`` with two dropouts."""

    def __init__(self, features: nn.Sequential, num_classes: int = NUM_CLASSES, hidden: int = 64) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        channels = next(m.out_channels for m in reversed(features) if isinstance(m, nn.Conv2d))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def make_vgg_layers(cfg: list[int | str], batch_norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            channels = int(v)
            conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
            norm = [nn.BatchNorm2d(channels)] if batch_norm else []
            layers += [conv, *norm, nn.ReLU(inplace=True)]
            in_channels = channels
    return nn.Sequential(*layers)


def vgg16_bn_style(num_classes: int = NUM_CLASSES) -> VGG:
    """VGG-16-BN's 'D' configuration (13 convs, 5 max pools) at 1/8 width."""
    return VGG(make_vgg_layers(VGG_D), num_classes)


# --- torchvision MobileNetV3 ---------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops: Conv2d, BatchNorm2d, then an (in-place) activation, as children 0, 1, 2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels, eps=0.001, momentum=0.01),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision.ops: pool, ``fc1``, ReLU, ``fc2``, Hardsigmoid, then ``scale * input``."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(input))))
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self._scale(input)
        return scale * input


# (input, kernel, expanded, out, use_se, activation, stride), as torchvision's InvertedResidualConfig
MOBILENET_CONFIG = [
    (8, 3, 8, 8, True, "RE", 2),
    (8, 3, 32, 16, False, "RE", 2),
    (16, 3, 48, 16, False, "RE", 1),
    (16, 5, 64, 24, True, "HS", 2),
    (24, 5, 96, 24, True, "HS", 1),
]


class InvertedResidual(nn.Module):
    """Expand 1x1 (unless expanded == input), depthwise kxk, SE, project 1x1; ``result += input``."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, act: str, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation_layer: Callable[..., nn.Module] = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, expanded, activation_layer))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout
        self._is_cn = stride > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3: Hardswish stem, inverted residuals, last conv x6, Hardswish classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, last_channel: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, MOBILENET_CONFIG[0][0], 3, 2, activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in MOBILENET_CONFIG]
        last_in = MOBILENET_CONFIG[-1][3]
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3_style(num_classes: int = NUM_CLASSES) -> MobileNetV3:
    """MobileNetV3-Small's idioms: SE with Hardsigmoid, kernels 3 and 5, ReLU and Hardswish blocks."""
    return MobileNetV3(num_classes)


# --- torchvision DenseNet ------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 on the concatenated previous features, then BN-ReLU-3x3 to ``growth_rate`` maps."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class _DenseBlock(nn.ModuleDict):
    """A ModuleDict of ``denselayer{i}``; each layer is called with the list of all earlier features."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for _, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet; the classifier follows ``F.relu(features, inplace=True)``."""

    def __init__(
        self,
        growth_rate: int = 8,
        block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 16,
        bn_size: int = 2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_style(num_classes: int = NUM_CLASSES) -> DenseNet:
    """DenseNet's idioms with two dense blocks of two layers, growth rate 8."""
    return DenseNet(num_classes=num_classes)


# --- torchvision VisionTransformer ---------------------------------------------------------------


class MLPBlock(nn.Sequential):
    """torchvision's transformer MLP: Linear, GELU, Dropout, Linear, Dropout as children 0..4."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim))
        self.append(nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-norm attention (``need_weights=False``, a tuple) and MLP, each with a residual."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    """Position embedding, ``layers.encoder_layer_{i}``, final ``ln``."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim)
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """torchvision's ViT: ``conv_proj`` patches, class token, encoder, ``heads.head`` on the class token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int = 2,
        num_heads: int = 4,
        hidden_dim: int = 32,
        mlp_dim: int = 64,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        torch._assert(image_size % patch_size == 0, "Input shape indivisible by patch size!")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(hidden_dim, num_classes))]))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        batch_class_token = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def vit_style(image_size: int = 32, patch_size: int = 8, num_classes: int = NUM_CLASSES) -> VisionTransformer:
    """A two-layer ViT of width 32 with four heads."""
    return VisionTransformer(image_size, patch_size, num_classes=num_classes)


# --- weights with signal, BatchNorm statistics from data, the zoo --------------------------------


def init_signal(model: nn.Module) -> nn.Module:
    """Kaiming-normal (ReLU gain) convs and linears, small random biases, norms' affine near identity."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_normal_(module.in_proj_weight, gain=math.sqrt(2.0))
            nn.init.normal_(module.in_proj_bias, std=0.1)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
            nn.init.uniform_(module.weight, 0.7, 1.3)
            nn.init.normal_(module.bias, std=0.1)
    if isinstance(model, VisionTransformer):
        nn.init.normal_(model.class_token, std=0.5)
        nn.init.normal_(model.encoder.pos_embedding, std=0.5)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images``; return the model in eval mode.

    One forward with only the BatchNorms in train mode (dropout stays off) and ``momentum=None`` (a
    cumulative average, so exactly this batch's statistics); each BatchNorm's momentum is restored after."""
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    if norms:
        model(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model.eval()


def zoo_batch(n: int = 64, size: int = 32, seed: int = 0) -> Batch:
    """``n`` shape images (with labels and concepts) of ``size`` x ``size`` from ``pyengine.data.Shapes``."""
    return Shapes(n, seed=seed, size=size).batch(range(n))


def zoo_images(n: int = 64, size: int = 32, seed: int = 0) -> torch.Tensor:
    """The (n, 3, size, size) images of ``zoo_batch``."""
    return zoo_batch(n, size, seed).inputs


CALIBRATION_SEED = 12345
ZOO_SEEDS = {"resnet50": 0, "vgg16_bn": 1, "mobilenet_v3": 2, "densenet": 3, "vit": 4, "resnet_d": 5, "convnext": 6,
             "demo_cnn": 7}  # fmt: skip
SIZE_BOUND = frozenset({"vit", "demo_cnn"})  # structure depends on the image size given to the factory


def _builders(image_size: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "resnet50": resnet50_style,
        "vgg16_bn": vgg16_bn_style,
        "mobilenet_v3": mobilenet_v3_style,
        "densenet": densenet_style,
        "vit": lambda: vit_style(image_size=image_size, patch_size=8),
        "resnet_d": resnet_d_style,
        "convnext": convnext_style,
        "demo_cnn": lambda: DemoCNN(num_classes=NUM_CLASSES, width=8, image_size=image_size),
    }


def build(name: str, image_size: int = 32) -> nn.Module:
    """The zoo's model ``name`` on its fixed seed (global RNG untouched), calibrated on 64 images, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ZOO_SEEDS[name])
        model = init_signal(_builders(image_size)[name]())
    return calibrate(model, zoo_images(64, image_size, seed=CALIBRATION_SEED))


def _factory(name: str) -> Callable[..., nn.Module]:
    def factory(image_size: int = 32) -> nn.Module:
        return build(name, image_size)

    factory.__name__ = factory.__qualname__ = name
    return factory


ZOO: dict[str, Callable[..., nn.Module]] = {name: _factory(name) for name in ZOO_SEEDS}
