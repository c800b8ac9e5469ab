"""Datasets: the protocol, adapters, and the embedded synthetic ``shapes``."""

from __future__ import annotations

from typing import Any

from pyengine.data.base import Batch, Dataset, TensorDataset, as_dataset
from pyengine.data.shapes import Shapes
from pyengine.hookspecs import hookimpl

__all__ = ["Batch", "Dataset", "Shapes", "TensorDataset", "as_dataset"]


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        "shapes", Shapes, summary="synthetic RGB shapes (square/circle/triangle/cross) with texture and colour concepts"
    )
