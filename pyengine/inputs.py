"""Model inputs and outputs as the ecosystem has them (host API).

A model is called with one tensor (``model(x)``: images, features) or with keyword tensors
(``model(**batch)``: a Hugging Face ``input_ids`` with its ``attention_mask``). pyengine keeps
one *main* tensor, the one techniques perturb, explain and count rows of, and the other
per-row tensors beside it (``extra``), so that every row of a perturbed or repeated batch is
called with its own mask. ``ModelInputs`` is that pair; ``call`` runs the model on it.

A model returns a tensor, a tuple (its first element is the output) or a mapping such as a
``ModelOutput`` (its ``logits``): ``select_output`` finds the tensor techniques explain, or a
user's ``output=`` selector (a key, an index or a callable) picks it.

The attention mask (``attention_mask``, 1 = real token) marks padding: techniques never
occlude or score padded positions and (B, T, D) activations drop padded rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pyengine.errors import PyengineError

MAIN_KEYS = ("input_ids", "pixel_values", "input_values", "inputs_embeds", "input", "inputs", "x", "image", "img")
"""Keys of a dict input that hold the main tensor, in order of preference."""
MASK_KEY = "attention_mask"
OutputSelector = str | int | Callable[[Any], torch.Tensor] | None


@dataclass(frozen=True)
class ModelInputs:
    """Rows of model inputs: ``main`` (B, ...) and per-row keyword tensors ``extra`` (B, ...).
    ``name`` is the keyword of ``main`` (None: the model takes it positionally)."""

    main: torch.Tensor
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)
    name: str | None = None

    def __len__(self) -> int:
        return self.main.shape[0]

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, T) attention mask (nonzero: a real token), if the inputs carry one."""
        return self.extra.get(MASK_KEY)

    def take(self, index: torch.Tensor | Sequence[int]) -> ModelInputs:
        """Rows ``index`` (repeats allowed): main and every extra tensor alike."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.main.device)
        return replace(self, main=self.main[index], extra={k: v[index.to(v.device)] for k, v in self.extra.items()})

    def with_main(self, main: torch.Tensor, rows: torch.Tensor | None = None) -> ModelInputs:
        """``main`` in place of the main tensor; its row i belongs to input row ``rows[i]``
        (default: row i), whose extra tensors it is called with."""
        if rows is None:
            if main.shape[0] != len(self):
                raise PyengineError(f"{main.shape[0]} rows given for {len(self)} inputs; expected one per input")
            return replace(self, main=main)
        rows = rows.to(torch.long)
        return replace(self, main=main, extra={k: v[rows.to(v.device)] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> ModelInputs:
        return replace(self, main=self.main.to(device), extra={k: v.to(device) for k, v in self.extra.items()})

    def split(self, size: int) -> list[ModelInputs]:
        return [self.take(range(start, min(start + size, len(self)))) for start in range(0, len(self), size)]

    def call(self, model: nn.Module, main: torch.Tensor | None = None) -> Any:
        """The model's raw output for these rows (``main`` replaces the main tensor, same rows)."""
        x = self.main if main is None else main
        if self.name is None and not self.extra:
            return model(x)
        if self.name is None:
            return model(x, **self.extra)
        return model(**{self.name: x, **self.extra})


def as_model_inputs(value: Any, where: str = "inputs") -> ModelInputs:
    """A tensor, or a mapping of tensors (a dict, a tokenizer's ``BatchEncoding``) with the main
    tensor under one of ``MAIN_KEYS``; every other tensor with as many rows is passed along."""
    if isinstance(value, ModelInputs):
        return value
    if isinstance(value, torch.Tensor):
        return ModelInputs(value)
    if isinstance(value, Mapping):
        key = next((k for k in MAIN_KEYS if k in value), None)
        if key is None or not isinstance(value[key], torch.Tensor):
            raise PyengineError(
                f"{where} is a mapping with keys {sorted(map(str, value))}; expected a tensor under one of "
                f"{', '.join(MAIN_KEYS)}"
            )
        main = value[key]
        extra = {}
        for name, tensor in value.items():
            if name == key or tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != main.shape[0]:
                shown = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise PyengineError(
                    f"{where}[{name!r}] is {shown}; expected a tensor with one row per input ({main.shape[0]})"
                )
            extra[str(name)] = tensor
        check_mask(extra.get(MASK_KEY), main, where)
        return ModelInputs(main, extra, str(key))
    raise PyengineError(
        f"{where} is a {type(value).__name__}; expected a tensor or a mapping of tensors (e.g. input_ids and "
        "attention_mask)"
    )


def check_mask(mask: torch.Tensor | None, main: torch.Tensor, where: str) -> None:
    """An attention mask is (B, T) like the token ids it masks, with a real token in every row."""
    if mask is None:
        return
    if mask.shape != main.shape[:2] or mask.dim() != 2:
        raise PyengineError(
            f"{where}: attention_mask has shape {tuple(mask.shape)}; expected {tuple(main.shape[:2])} like the "
            "token ids"
        )
    empty = (mask == 0).all(1)
    if bool(empty.any()):
        raise PyengineError(f"{where}: row {int(empty.nonzero()[0])} has no real token (its attention_mask is 0)")


def select_output(output: Any, selector: OutputSelector = None, where: str = "the model") -> torch.Tensor:
    """The tensor techniques explain: ``selector`` applied (a key, an index or a callable), else
    the output itself, a mapping's ``logits`` (Hugging Face ``ModelOutput``), or a tuple's first
    element."""
    if selector is not None:
        try:
            picked = selector(output) if callable(selector) else output[selector]
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise PyengineError(f"output={selector!r} does not select from {describe(output)}: {error}") from None
        if not isinstance(picked, torch.Tensor):
            raise PyengineError(f"output={selector!r} selects a {type(picked).__name__}; expected a tensor")
        return picked
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise PyengineError(
            f"{where} returns {describe(output)} without 'logits'; pass output=<key or callable> to pick the tensor "
            "to explain"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PyengineError(f"{where} returns {describe(output)}; expected a tensor, or pass output=<key or callable>")


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} values"
    return f"a {type(value).__name__}"


def pad_sequences(sequences: Sequence[torch.Tensor], pad_id: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token sequences: (ids (B, T_max), attention mask (B, T_max), 1 = real)."""
    if not sequences:
        raise PyengineError(f"{where}: no sequences")
    for k, seq in enumerate(sequences):
        if seq.dim() != 1 or seq.numel() == 0 or seq.is_floating_point():
            raise PyengineError(
                f"{where}: sequence {k} has shape {tuple(seq.shape)} and dtype {seq.dtype}; expected a non-empty 1-D "
                "tensor of token ids"
            )
    length = max(seq.numel() for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for k, seq in enumerate(sequences):
        ids[k, : seq.numel()] = seq.long()
        mask[k, : seq.numel()] = 1
    return ids, mask


def explained_scores(output: torch.Tensor, inputs: ModelInputs | None = None, position: int = -1) -> torch.Tensor:
    """The scores targets index: the output itself, or for a sequence model's per-token output
    (N, T, V) over token-id inputs (N, T), the scores at ``position`` (-1: each row's last real
    token, by its mask); a position that is padding in some row is an error."""
    main = inputs.main if inputs is not None else None
    per_token = (
        main is not None and main.dim() == 2 and output.dim() == 3 and tuple(output.shape[:2]) == tuple(main.shape)
    )
    if not per_token:
        if position != -1:
            raise PyengineError(
                f"position={position} picks a token of a per-token output (N, T, V) over token ids; this model "
                f"outputs {tuple(output.shape)}: leave position at -1"
            )
        return output
    mask = inputs.mask if inputs is not None else None
    rows = torch.arange(output.shape[0], device=output.device)
    if position >= 0:
        if position >= output.shape[1]:
            raise PyengineError(f"position={position} is past the {output.shape[1]} tokens; expected 0 <= position")
        if mask is not None and not bool((mask[:, position] != 0).all()):
            row = int((mask[:, position] == 0).nonzero()[0])
            raise PyengineError(
                f"position={position} is padding in input row {row} (it has {int((mask[row] != 0).sum())} tokens); "
                "expected a real token of every row, or -1 (each row's last real token)"
            )
        return output[:, position]
    last = (
        torch.full((output.shape[0],), output.shape[1] - 1, dtype=torch.long, device=output.device)
        if mask is None
        else mask.shape[1] - 1 - (mask != 0).flip(1).to(torch.uint8).argmax(1).to(output.device)
    )
    return output[rows, last]
