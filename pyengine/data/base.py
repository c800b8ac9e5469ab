"""The dataset protocol pyengine reads: indexed batches of inputs, labels and concepts."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pyengine.errors import PyengineError
from pyengine.hashing import add_tensor, value_bytes
from pyengine.inputs import MASK_KEY, as_model_inputs, pad_sequences


@dataclass(frozen=True)
class Batch:
    """Rows of a dataset: ``inputs`` (B, ...), ``labels`` (B,), ``index`` (B,) and concepts."""

    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    concepts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    boxes: torch.Tensor | None = None  # (B, 4) x0, y0, x1, y1 of the labelled object, if known
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # other model inputs per row (attention_mask)
    input_name: str | None = None  # the keyword of ``inputs`` when the model takes keywords (``input_ids``)


class Dataset(ABC):
    """Random access by index, deterministic: the same index always gives the same row."""

    name: str = "dataset"
    class_names: tuple[str, ...] = ()
    concept_names: Mapping[str, tuple[str, ...]] = {}  # concept -> category names
    batch_size_hint: int | None = None  # rows per step the data's source suggests (a DataLoader's batch_size)

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
    """A dataset over tensors already in memory (user arrays): ``inputs`` a tensor or a mapping
    such as a tokenizer's output (``input_ids`` with its ``attention_mask``; see
    ``pyengine.inputs``)."""

    def __init__(
        self,
        inputs: torch.Tensor | Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        concepts: Mapping[str, torch.Tensor] | None = None,
        name: str = "tensors",
    ) -> None:
        self.model_inputs = as_model_inputs(inputs, name)
        self.inputs = self.model_inputs.main
        n = self.inputs.shape[0]
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
        concepts = ((f"concept:{key}", value) for key, value in self.concepts.items())
        extra = ((f"input:{key}", value) for key, value in sorted(self.model_inputs.extra.items()))
        for key, tensor in [("inputs", self.inputs), *extra, ("labels", self.labels), *concepts]:
            add_tensor(digest, key, tensor)
        return {"name": self.name, "size": len(self), "sha256": digest.hexdigest()}

    def batch(self, indices: Sequence[int]) -> Batch:
        index = self._check_indices(indices)
        rows = self.model_inputs.take(index)
        concepts = {key: value[index] for key, value in self.concepts.items()}
        return Batch(rows.main, self.labels[index], index, concepts, extra=rows.extra, input_name=rows.name)


INPUT_KEYS = ("input_ids", "pixel_values", "image", "img", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
CONCEPTS_KEY = "concepts"
SAMPLED_ROWS = 32  # rows hashed by TorchDataset.describe


@dataclass(frozen=True)
class _Rows:
    inputs: torch.Tensor  # (B, ...)
    labels: torch.Tensor  # (B,) long, -1: unknown
    concepts: dict[str, torch.Tensor]  # name -> (B,) long
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token companions (attention_mask, ...)


class TorchDataset(Dataset):
    """A map-style ``torch.utils.data.Dataset`` (or any object with ``__getitem__(int)`` and
    ``__len__``), read row by row by index.

    An item is ``x``, ``(x, label)``, ``(x, label, {concept: code})``, or a mapping (Hugging
    Face style) holding ``x`` under the first of ``INPUT_KEYS`` present ("pixel_values", "image",
    "img", "input", "inputs", "x"), the label under the first of ``LABEL_KEYS`` ("label",
    "labels", "target", "targets", "y"; none: unknown) and concepts under "concepts". ``x`` is a
    tensor, a numpy array or nested numbers, of one shape for every row (a PIL image is an
    error: add a ToTensor transform); a label is one integer class index (-1: unknown), a
    concept code an integer >= 0. ``collate``, when given (a DataLoader's own ``collate_fn``),
    turns the list of items into the batch instead, of the same forms with a leading batch
    dimension. Class names come from the dataset's ``classes`` (torchvision) or the ``names`` of
    its label feature (Hugging Face ``features["label"]``) when it has them.

    Token sequences: an input that is a 1-D tensor of integers (``input_ids``) may differ in
    length between rows. Rows are right-padded with ``pad_id`` to ``max_length`` (default: the
    longest sequence, found by reading every row once on construction) and carry an
    ``attention_mask`` (the item's own, else 1 for each real token); other per-token tensors of
    a mapping item (``token_type_ids``, ...) are padded with 0. The model is called with the
    input first and these by name: ``model(input_ids, attention_mask=..., ...)``.

    Row 0 is read twice on construction: an item that differs between two reads (a random
    transform) is an error, since pyengine needs the same row for the same index.
    """

    def __init__(
        self,
        dataset: Any,
        name: str | None = None,
        *,
        collate: Callable[[list[Any]], Any] | None = None,
        batch_size_hint: int | None = None,
        pad_id: int = 0,
        max_length: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self.collate = collate
        self.batch_size_hint = batch_size_hint
        self.pad_id = pad_id
        size = len(dataset)
        if size < 1:
            raise PyengineError(f"{self.name} has {size} rows; expected at least one")
        self._size = size
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._concept_keys: tuple[str, ...] | None = None
        self.max_length: int | None = None  # token sequences only: the padded length
        if collate is None and _is_token_sequence(_tensor(_split(dataset[0], "row 0")[0], "row 0")):
            self.max_length = max_length or max(
                _tensor(_split(dataset[i], f"row {i}")[0], f"row {i}").numel() for i in range(size)
            )
        first, again = self._load([0]), self._load([0])
        if not _same_rows(first, again):
            raise PyengineError(
                f"{self.name}: row 0 differs between two reads (a random transform?); pyengine needs the same "
                "row for the same index: use deterministic transforms"
            )
        self.concept_names = {key: () for key in first.concepts}
        self.class_names = _class_names(dataset)

    def __len__(self) -> int:
        return self._size

    def describe(self) -> dict[str, Any]:
        """Name, size and a SHA-256 of up to ``SAMPLED_ROWS`` evenly spaced rows (the first and
        the last among them; every row of a smaller dataset): a resumed capture never continues
        over other data there, but a change between the sampled rows goes unnoticed."""
        count = min(self._size, SAMPLED_ROWS)
        sample = [k * (self._size - 1) // max(count - 1, 1) for k in range(count)]
        rows = self._load(sample)
        digest = hashlib.sha256()
        for key, tensor in [("index", torch.tensor(sample)), *_named(rows)]:
            add_tensor(digest, key, tensor)
        return {"name": self.name, "size": self._size, "sampled_rows": len(sample), "sha256": digest.hexdigest()}

    def batch(self, indices: Sequence[int]) -> Batch:
        index = self._check_indices(indices)
        rows = self._load(index.tolist())
        return Batch(rows.inputs, rows.labels, index, rows.concepts, extra=rows.extra)

    def _load(self, index: list[int]) -> _Rows:
        items = [self.dataset[i] for i in index]
        if self.collate is not None:
            where = f"the batch of rows {index[0]}..{index[-1]} from collate_fn"
            rows = _parse_batch(self.collate(items), len(items), where)
            self._check_structure(rows.inputs[0], tuple(rows.concepts), where)
            return rows
        parsed = []
        for i, item in zip(index, items):
            x, label, concepts = _split(item, f"row {i}")
            parsed.append((_tensor(x, f"row {i}"), _integer(label, f"row {i}: the label", -1), concepts or {}))
            self._check_structure(parsed[-1][0], tuple(parsed[-1][2]), f"row {i}")
        keys = self._concept_keys or ()
        inputs, extra = (
            self._padded(index, items, [x for x, _, _ in parsed], self.max_length)
            if self.max_length is not None
            else (torch.stack([x for x, _, _ in parsed]), {})
        )
        concepts = {}
        for key in keys:
            per_token = [c[key] for _, _, c in parsed]
            if self.max_length is not None and _per_token(per_token[0], parsed[0][0]):
                sequences = [x for x, _, _ in parsed]
                concepts[key] = self._token_codes(index, key, per_token, sequences, self.max_length)
                continue
            concepts[key] = torch.tensor(
                [_integer(c[key], f"row {i}: concept {key!r}", 0) for i, (_, _, c) in zip(index, parsed)],
                dtype=torch.long,
            )
        return _Rows(inputs, torch.tensor([label for _, label, _ in parsed], dtype=torch.long), concepts, extra)

    def _token_codes(
        self, index: list[int], key: str, values: list[Any], sequences: list[torch.Tensor], max_length: int
    ) -> torch.Tensor:
        """A token-level concept (one code per token): (B, max_length) codes, -1 on padding."""
        codes = torch.full((len(values), max_length), -1, dtype=torch.long)
        for row, (i, value, seq) in enumerate(zip(index, values, sequences)):
            tensor = _tensor(value, f"row {i}: concept {key!r}")
            if tensor.shape != seq.shape or tensor.is_floating_point() or (tensor.numel() and int(tensor.min()) < 0):
                raise PyengineError(
                    f"{self.name}: row {i}: concept {key!r} has shape {tuple(tensor.shape)}; expected one integer "
                    f"code >= 0 per token ({seq.numel()}) or one per row"
                )
            codes[row, : seq.numel()] = tensor.long()
        return codes

    def _padded(
        self, index: list[int], items: list[Any], sequences: list[torch.Tensor], max_length: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token sequences right-padded to ``max_length``, with their attention mask and the
        items' other per-token tensors."""
        for i, seq in zip(index, sequences):
            if seq.numel() > max_length:
                raise PyengineError(
                    f"{self.name}: row {i} has {seq.numel()} tokens; expected at most max_length={max_length}"
                )
        ids, mask = pad_sequences(sequences, self.pad_id, self.name)
        width = max_length - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, width), value=self.pad_id)
        extra = {MASK_KEY: torch.nn.functional.pad(mask, (0, width))}
        if isinstance(items[0], Mapping):
            main_key = _input_key(items[0])
            for key in [
                k for k, v in items[0].items() if k not in (main_key, MASK_KEY) and _per_token(v, sequences[0])
            ]:
                companions = [_tensor(item[key], f"row {i}: {key}") for i, item in zip(index, items)]
                padded = torch.zeros(len(items), max_length, dtype=companions[0].dtype)
                for row, value in enumerate(companions):
                    padded[row, : value.numel()] = value
                extra[str(key)] = padded
            if MASK_KEY in items[0]:
                given = [_tensor(item[MASK_KEY], f"row {i}: {MASK_KEY}") for i, item in zip(index, items)]
                own = torch.zeros(len(items), max_length, dtype=torch.long)
                for row, value in enumerate(given):
                    own[row, : value.numel()] = value.long()
                extra[MASK_KEY] = own
        return ids, extra

    def _check_structure(self, x: torch.Tensor, concepts: tuple[str, ...], where: str) -> None:
        """Every row has row 0's input shape (token sequences: any length) and dtype and its
        concept names (``x``: one row)."""
        shape = tuple(x.shape) if self.max_length is None else ()
        if self._shape is None or self._concept_keys is None:
            self._shape, self._dtype, self._concept_keys = shape, x.dtype, concepts
        elif shape != self._shape:
            raise PyengineError(
                f"{self.name}: {where} has inputs of shape {tuple(shape)} but row 0 has {self._shape}; pyengine needs "
                "one input shape: resize or crop in the dataset's transform"
            )
        elif x.dtype != self._dtype:
            raise PyengineError(
                f"{self.name}: {where} has inputs of dtype {x.dtype} but row 0 has {self._dtype}; expected one dtype"
            )
        elif sorted(concepts) != sorted(self._concept_keys):
            raise PyengineError(
                f"{self.name}: {where} has concepts {sorted(concepts)} but row 0 has {sorted(self._concept_keys)}; "
                "expected the same concepts in every row"
            )


def _is_token_sequence(x: torch.Tensor) -> bool:
    return x.dim() == 1 and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _input_key(item: Any) -> str | None:
    """The key of a mapping item's input (the model's keyword for it), None for other items."""
    return next((key for key in INPUT_KEYS if key in item), None) if isinstance(item, Mapping) else None


def _per_token(value: Any, ids: torch.Tensor) -> bool:
    """A tensor-like value with one entry per token of ``ids`` (token_type_ids, ...)."""
    try:
        return tuple(_tensor(value, "").shape) == tuple(ids.shape)
    except PyengineError:
        return False


def _class_names(dataset: Any) -> tuple[str, ...]:
    """torchvision's ``dataset.classes``, or Hugging Face's ``dataset.features[label].names``."""
    features = getattr(dataset, "features", None)
    label_feature = (
        next((features[k] for k in LABEL_KEYS if k in features), None) if isinstance(features, Mapping) else None
    )
    for names in (getattr(dataset, "classes", None), getattr(label_feature, "names", None)):
        if isinstance(names, Sequence) and names and all(isinstance(name, str) for name in names):
            return tuple(names)
    return ()


def _named(rows: _Rows) -> list[tuple[str, torch.Tensor]]:
    concepts = sorted(rows.concepts.items(), key=lambda item: item[0])
    extra = sorted(rows.extra.items(), key=lambda item: item[0])
    return [
        ("inputs", rows.inputs),
        *((f"input:{k}", v) for k, v in extra),
        ("labels", rows.labels),
        *((f"concept:{k}", v) for k, v in concepts),
    ]


def _same_rows(a: _Rows, b: _Rows) -> bool:
    """Bit for bit: same names, dtypes, shapes and values."""
    named_a, named_b = _named(a), _named(b)
    return [k for k, _ in named_a] == [k for k, _ in named_b] and all(
        x.dtype == y.dtype and x.shape == y.shape and value_bytes(x) == value_bytes(y)
        for (_, x), (_, y) in zip(named_a, named_b)
    )


def _split(item: Any, where: str) -> tuple[Any, Any, Mapping[str, Any] | None]:
    """(x, label or None, concepts or None) of an item or a collated batch."""
    if isinstance(item, Mapping):
        x_key = next((key for key in INPUT_KEYS if key in item), None)
        if x_key is None:
            raise PyengineError(
                f"{where} is a mapping with keys {sorted(map(str, item))}; expected the input under one of "
                f"{', '.join(INPUT_KEYS)}"
            )
        label_key = next((key for key in LABEL_KEYS if key in item), None)
        x, label, concepts = item[x_key], item[label_key] if label_key else None, item.get(CONCEPTS_KEY)
    elif isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise PyengineError(
                f"{where} is a {type(item).__name__} of {len(item)} values; expected (x,), (x, label) or "
                "(x, label, {concept: code})"
            )
        x, label, concepts = (*item, None, None)[:3]
    else:
        x, label, concepts = item, None, None
    if concepts is not None and not isinstance(concepts, Mapping):
        raise PyengineError(f"{where}: concepts are a {type(concepts).__name__}; expected a mapping name -> code")
    return x, label, concepts


def _tensor(value: Any, where: str) -> torch.Tensor:
    """An input as a tensor: tensors, numpy arrays and nested numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value).__module__.split(".")[0] == "PIL":
        raise PyengineError(
            f"{where}: the input is a PIL image; pyengine needs tensors: add a ToTensor transform to the dataset "
            "(e.g. torchvision.transforms.ToTensor(), then the model's normalization)"
        )
    try:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise PyengineError(
            f"{where}: the input is a {type(value).__name__}; expected a tensor, a numpy array or nested numbers"
        ) from None


def _integer(value: Any, what: str, minimum: int) -> int:
    """One integer (a Python or numpy integer, or a one-element integer tensor/array); None: -1."""
    if value is None and minimum < 0:
        return -1
    if isinstance(value, torch.Tensor) and value.numel() == 1 and _integral_dtype(value):
        value = int(value.reshape(-1)[0])
    elif isinstance(value, np.ndarray) and value.size == 1 and _integral_dtype(value):
        value = int(value.reshape(-1)[0])
    if isinstance(value, (bool, int, np.integer)) and int(value) >= minimum:
        return int(value)
    expected = "an integer class index (-1: unknown)" if minimum < 0 else f"an integer >= {minimum}"
    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, (torch.Tensor, np.ndarray)) else repr(value)
    raise PyengineError(f"{what} is {shown}; expected {expected}")


def _integral_dtype(value: torch.Tensor | np.ndarray) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.dtype.is_floating_point or value.dtype.is_complex)
    return bool(np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.bool_))


def _parse_batch(batch: Any, count: int, where: str) -> _Rows:
    """A collated batch: the same forms as an item, each with a leading dimension of ``count``."""
    x, label, concepts = _split(batch, where)
    inputs = _tensor(x, where)
    if inputs.dim() == 0 or inputs.shape[0] != count:
        raise PyengineError(f"{where}: inputs of shape {tuple(inputs.shape)}; expected {count} rows first")
    labels = torch.full((count,), -1, dtype=torch.long) if label is None else _vector(label, count, f"{where}: labels")
    codes = {str(k): _vector(v, count, f"{where}: concept {k!r}") for k, v in (concepts or {}).items()}
    if int(labels.min()) < -1 or any(int(v.min()) < 0 for v in codes.values()):
        raise PyengineError(
            f"{where}: negative labels or concept codes; expected class indices (-1: unknown), codes >= 0"
        )
    key = _input_key(batch)
    extra = (
        {str(k): _tensor(v, where) for k, v in batch.items() if k != key and _per_token(v, inputs)}
        if isinstance(batch, Mapping) and inputs.dim() == 2 and not inputs.is_floating_point()
        else {}
    )
    return _Rows(inputs, labels, codes, extra)


def _vector(value: Any, count: int, what: str) -> torch.Tensor:
    tensor = _tensor(value, what)
    if tensor.shape != (count,) or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise PyengineError(
            f"{what} have shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected ({count},) integers"
        )
    return tensor.long()


def as_dataset(data: Any) -> Dataset:
    """A pyengine Dataset from: a pyengine Dataset; a tensor (rows along dim 0); a map-style
    ``torch.utils.data.Dataset`` or any object with ``__getitem__(int)`` and ``__len__``
    (see ``TorchDataset`` for the item forms); a ``DataLoader`` over a map-style dataset.

    A DataLoader gives its ``dataset``, its ``collate_fn`` when it is not the default, and its
    ``batch_size`` as the default of ``pyengine.capture``; its sampler, shuffling and workers
    are not used: rows are read by index, in order, never shuffled (pyengine needs random
    access). An IterableDataset is an error for that reason.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return _from_loader(data)
    if isinstance(data, torch.utils.data.IterableDataset):
        raise PyengineError(_ITERABLE.format(type(data).__name__))
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, Mapping)):
        return TorchDataset(data)
    raise PyengineError(
        f"cannot use {type(data).__name__} as a dataset; expected a pyengine Dataset, a tensor, a map-style "
        "torch Dataset or a DataLoader over one"
    )


_ITERABLE = (
    "cannot use the IterableDataset {} as data: pyengine reads rows by index (random access); "
    "expected a map-style Dataset (__getitem__ and __len__)"
)


def _from_loader(loader: torch.utils.data.DataLoader[Any]) -> TorchDataset:
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise PyengineError(_ITERABLE.format(type(dataset).__name__))
    if loader.batch_sampler is None:
        raise PyengineError(
            "a DataLoader with batch_size=None yields the dataset's items as batches; pyengine reads rows by "
            "index: pass a DataLoader with a batch_size, or the dataset of single rows"
        )
    collate = None if loader.collate_fn is torch.utils.data.default_collate else loader.collate_fn
    return TorchDataset(dataset, collate=collate, batch_size_hint=loader.batch_size)
