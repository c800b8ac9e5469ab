"""The dataset protocol pyengine reads: indexed batches of inputs, labels and concepts."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.errors import PyengineError


@dataclass(frozen=True)
class Batch:
    """Rows of a dataset: ``inputs`` (B, ...), ``labels`` (B,), ``index`` (B,) and concepts."""

    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    concepts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    boxes: torch.Tensor | None = None  # (B, 4) x0, y0, x1, y1 of the labelled object, if known


class Dataset(ABC):
    """Random access by index, deterministic: the same index always gives the same row."""

    name: str = "dataset"
    class_names: tuple[str, ...] = ()
    concept_names: Mapping[str, tuple[str, ...]] = {}  # concept -> category names

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batch(self, indices: Sequence[int]) -> Batch:
        """The rows at ``indices`` (each in range)."""

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = len(self) if stop is None else stop
        for first in range(start, stop, batch_size):
            yield self.batch(range(first, min(first + batch_size, stop)))

    def describe(self) -> dict[str, Any]:
        """JSON-compatible identity, stored in /meta."""
        return {"name": self.name, "size": len(self)}

    def _check_indices(self, indices: Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise PyengineError(f"{self.name}: index out of range; expected 0 <= index < {len(self)}")
        return index


class TensorDataset(Dataset):
    """A dataset over tensors already in memory (user arrays)."""

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        concepts: Mapping[str, torch.Tensor] | None = None,
        name: str = "tensors",
    ) -> None:
        self.inputs = inputs
        n = inputs.shape[0]
        self.labels = labels if labels is not None else torch.full((n,), -1, dtype=torch.long)
        self.concepts = dict(concepts or {})
        for key, value in [("labels", self.labels), *self.concepts.items()]:
            if value.shape[0] != n:
                raise PyengineError(f"{key} has {value.shape[0]} rows but inputs have {n}; expected equal")
        self.name = name
        self.concept_names = {key: () for key in self.concepts}

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def describe(self) -> dict[str, Any]:
        """Name, size and a content hash, so a resumed capture never mixes two arrays."""
        digest = hashlib.sha256()
        for tensor in (self.inputs, self.labels, *self.concepts.values()):
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"name": self.name, "size": len(self), "sha256": digest.hexdigest()}

    def batch(self, indices: Sequence[int]) -> Batch:
        index = self._check_indices(indices)
        return Batch(
            self.inputs[index], self.labels[index], index, {key: value[index] for key, value in self.concepts.items()}
        )


class TorchDataset(Dataset):
    """Adapts a map-style ``torch.utils.data.Dataset`` yielding ``x`` or ``(x, y)``."""

    def __init__(self, dataset: Any, name: str | None = None) -> None:
        self.dataset = dataset
        self.name = name or type(dataset).__name__

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = self._check_indices(indices)
        items = [self.dataset[int(i)] for i in index]
        if items and isinstance(items[0], (tuple, list)):
            inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
            labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        else:
            inputs = torch.stack([torch.as_tensor(item) for item in items])
            labels = torch.full((len(items),), -1, dtype=torch.long)
        return Batch(inputs, labels, index)


def as_dataset(data: Any) -> Dataset:
    """A pyengine Dataset from a Dataset, a tensor, or a map-style torch dataset."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return TorchDataset(data)
    raise PyengineError(
        f"cannot use {type(data).__name__} as a dataset; expected a pyengine Dataset, a tensor "
        "or a map-style torch Dataset"
    )
