"""The embedded demo models: a VGG-style CNN (no BatchNorm) and an MLP."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class DemoCNN(nn.Module):
    """Three Conv/ReLU/MaxPool blocks, then Linear/ReLU/Linear. Pathwise-analysable."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 8, image_size: int = 64) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size={image_size} is invalid; expected a multiple of 8")
        c1, c2, c3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, c1, 3, padding=1)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(c1, c2, 3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(c2, c3, 3, padding=1)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                ]
            )
        )
        self.flatten = nn.Flatten()
        side = image_size // 8
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(c3 * side * side, 64)),
                    ("relu4", nn.ReLU()),
                    ("fc2", nn.Linear(64, num_classes)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class DemoMLP(nn.Module):
    """Flatten, then Linear/ReLU/Linear/ReLU/Linear."""

    def __init__(self, in_features: int = 3 * 64 * 64, num_classes: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(in_features, hidden)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, hidden // 2)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(hidden // 2, num_classes)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(x))
