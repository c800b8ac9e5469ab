"""timm's idioms for the vision zoo (``vision_models``): a ResNet-D and a ConvNeXt, small and randomly initialised.

ResNet-D: a deep 3-conv stem, ``act1..act3``, ``x += shortcut``, shortcuts that average-pool (ceil mode,
padding excluded) before a 1x1 conv. ConvNeXt: ``LayerNorm2d`` over the channels of NCHW tensors,
depthwise 7x7 convs, channels-last MLPs with GELU, layer scale ``gamma``, ``x = x + shortcut``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


# --- timm ResNet-D -------------------------------------------------------------------------------


def downsample_avg(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """timm's ResNet-D shortcut: average pool (ceil mode, padding excluded), then 1x1 conv and BN."""
    pool: nn.Module = nn.Identity()
    if stride != 1:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, bias=False),
                         nn.BatchNorm2d(out_channels))  # fmt: skip


class TimmBottleneck(nn.Module):
    """timm's Bottleneck: ``act1..act3`` and ``x += shortcut``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class SelectAdaptivePool2d(nn.Module):
    """timm's global pool: ``pool`` then ``flatten`` (or Identity)."""

    def __init__(self, flatten: bool = True) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten: nn.Module = nn.Flatten(1) if flatten else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


class TimmResNet(nn.Module):
    """timm's resnet50d: deep 3-conv stem, avg-pool shortcuts, ``global_pool`` and ``fc``."""

    def __init__(self, layers: list[int], num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        stem = width // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, width, 3, stride=1, padding=1, bias=False),
        )  # fmt: skip
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            outplanes = planes * TimmBottleneck.expansion
            stage = [TimmBottleneck(inplanes, planes, stride, downsample_avg(inplanes, outplanes, stride))]
            stage += [TimmBottleneck(outplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = outplanes
        self.num_features = inplanes
        self.global_pool = SelectAdaptivePool2d()
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.global_pool(x))


def resnet_d_style(num_classes: int = NUM_CLASSES) -> TimmResNet:
    """timm's ResNet-50-D idioms at width 8 and blocks [1, 1, 1, 1]."""
    return TimmResNet([1, 1, 1, 1], num_classes)


# --- timm ConvNeXt -------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """timm's Mlp: ``fc1``, ``act`` (GELU), ``drop1``, ``norm``, ``fc2``, ``drop2``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm and MLP, layer scale ``gamma``, ``x = ... + shortcut``."""

    def __init__(self, dim: int, ls_init_value: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        x = x.permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, ls_init_value: float) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Identity()
        if in_chs != out_chs:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, ls_init_value) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormMlpClassifierHead(nn.Module):
    """timm's ConvNeXt head: ``global_pool``, LayerNorm2d ``norm``, ``flatten``, ``fc``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(flatten=False)
        self.norm = LayerNorm2d(in_features)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.norm(self.global_pool(x)))
        return self.fc(self.drop(self.pre_logits(x)))


class ConvNeXt(nn.Module):
    """timm's ConvNeXt: 4x4/4 patchify ``stem`` with LayerNorm2d, ``stages``, ``head``."""

    def __init__(
        self,
        depths: tuple[int, ...] = (1, 1, 2, 1),
        dims: tuple[int, ...] = (8, 16, 32, 64),
        ls_init_value: float = 1e-6,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        chs = [dims[0], *dims]
        self.stages = nn.Sequential(
            *[ConvNeXtStage(chs[i], chs[i + 1], d, ls_init_value) for i, d in enumerate(depths)]
        )
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_pre(self.stages(self.stem(x))))


def convnext_style(num_classes: int = NUM_CLASSES) -> ConvNeXt:
    """A ConvNeXt of four stages, widths 8..64; layer scale starts at 0.5 (not 1e-6) so blocks carry signal."""
    return ConvNeXt(ls_init_value=0.5, num_classes=num_classes)
