"""Models: the embedded demo CNN and MLP, registered as ``demo-cnn`` and ``demo-mlp``."""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.models.demo import DemoCNN, DemoMLP

__all__ = ["DemoCNN", "DemoMLP"]


@hookimpl
def register_models(register: Any) -> None:
    register("demo-cnn", DemoCNN, summary="VGG-style CNN: 3 x (Conv/ReLU/MaxPool), Linear/ReLU/Linear")
    register("demo-mlp", DemoMLP, summary="MLP: Linear/ReLU/Linear/ReLU/Linear on flattened images")
