"""The unit axis: which dim of a layer's values holds its units (channels, features), which its positions.

A recorded value has rows first. Its units are

- ``(B, units)``: the units directly;
- ``(B, C, H, W)`` or ``(B, C, L)`` of a conv net: the channels (dim 1), positions are the rest;
- ``(B, T, D)`` of a transformer (or ``(B, H, W, C)`` inside a ConvNeXt block): the last dim,
  positions (tokens) are the rest.

``units="auto"`` tells these apart by where the value came from, not by its shape: one forward
pass of an example follows the unit axis from the operations that define it (convolutions and
batch/group/instance norms put units on dim 1; linear layers, matmuls, layer norms, embeddings
and attention on the last dim) through everything after them (elementwise ops and
nonlinearities keep it, permutes and transposes move it, views and indexing keep it while its
size and the elements after it stay together). ``"channels"`` (dim 1) and ``"last"`` (the last
dim) override it. Every technique that reads units resolves them here, with ``UnitAxes``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pyengine.errors import PyengineError
from pyengine.inputs import ModelInputs
from pyengine.layers import HookScope, LayerRef, resolve_module

UNIT_CHOICES = ("auto", "channels", "last", "flatten")
UNITS_DOC = (
    "the dim of a layer's values holding its units (the rest are positions): 'auto' (by the op that made "
    "them: conv/batch-norm -> dim 1, linear/layer-norm/attention -> last dim), 'channels' (dim 1), 'last'"
)
FLATTEN_DOC = "; 'flatten': every value of a row is a unit"
POOLINGS = ("max", "mean", "first", "last")
POOLING_DOC = (
    "how a unit's positions become one value per row: 'auto' ('max' over a conv map, 'mean' over a "
    "sequence's tokens), 'max', 'mean', 'first' (the first token: a ViT's class token) or 'last' (the last token)"
)


def _functions(*names: str) -> tuple[Any, ...]:
    found = []
    for name in names:
        owner, attribute = name.split(".", 1) if "." in name else ("torch", name)
        space = {"torch": torch, "F": F, "Tensor": torch.Tensor}[owner]
        if hasattr(space, attribute):
            found.append(getattr(space, attribute))
    return tuple(found)


# Operations that define the unit axis of their output (the first output for attention).
_LAST = _functions(
    "F.linear", "F.bilinear", "matmul", "Tensor.matmul", "Tensor.__matmul__", "Tensor.__rmatmul__", "mm",
    "Tensor.mm", "bmm", "Tensor.bmm", "addmm", "Tensor.addmm", "baddbmm", "F.layer_norm", "F.rms_norm",
    "F.embedding", "F.embedding_bag", "F.multi_head_attention_forward", "F.scaled_dot_product_attention",
)  # fmt: skip
_CHANNELS = _functions(
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "F.batch_norm",
    "F.instance_norm", "F.group_norm", "F.local_response_norm",
)  # fmt: skip
# Operations that reorder dims: where the unit axis goes is found by running them on an empty tensor.
_REORDER = _functions(
    "permute", "Tensor.permute", "transpose", "Tensor.transpose", "swapaxes", "Tensor.swapaxes", "swapdims",
    "Tensor.swapdims", "t", "Tensor.t", "movedim", "Tensor.movedim", "moveaxis", "Tensor.moveaxis", "adjoint",
    "Tensor.adjoint",
)  # fmt: skip
_CONCATENATE = _functions("cat", "concat", "concatenate")
_REORDER_PROPERTIES = tuple(getattr(torch.Tensor, name) for name in ("T", "mT", "H", "mH"))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _tail(shape: Sequence[int], axis: int) -> int:
    """The number of elements after (negative) ``axis`` in one slice of ``shape``."""
    return math.prod(shape[len(shape) + axis + 1 :])


class _AxisTracker(TorchFunctionMode):
    """Follows the unit axis (a negative dim) of every tensor made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self._axes: dict[int, tuple[weakref.ReferenceType[torch.Tensor], int, str]] = {}

    def axis(self, tensor: torch.Tensor) -> tuple[int, str] | None:
        """(negative unit dim, the operation that set it), or None if unknown."""
        entry = self._axes.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1], entry[2]

    def _set(self, tensor: torch.Tensor, axis: int | None, origin: str) -> None:
        if axis is not None and tensor.dim() >= 1 and -tensor.dim() <= axis < 0:
            self._axes[id(tensor)] = (weakref.ref(tensor), axis, origin)
        else:
            self._axes.pop(id(tensor), None)

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        outputs = list(_tensors(output))
        if not outputs:
            return output
        name = getattr(func, "__name__", "op")
        if func in _LAST:
            first = outputs[0]
            self._set(first, -1, name)
            for other in outputs[1:]:
                self._set(other, None, name)
            return output
        if func in _CHANNELS:
            for tensor in outputs:
                self._set(tensor, 1 - tensor.dim() if tensor.dim() >= 2 else None, name)
            return output
        if func in _CONCATENATE:  # channels or tokens joined: the unit axis stays where the inputs agree it is
            seen = {self.axis(t) for t in _tensors(list(args[:1]))}
            axes = {entry[0] for entry in seen if entry}
            if len(axes) == 1 and None not in seen:
                self._set(outputs[0], axes.pop(), next(entry[1] for entry in seen if entry))
                return output
        source = self._source(args, kwargs, outputs[0])
        for tensor in outputs:
            axis, origin = None, name
            if source is not None:
                known, (axis_in, origin) = source
                axis = self._carry(func, args, kwargs, known, axis_in, tensor)
            self._set(tensor, axis, origin)
        return output

    def _source(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], output: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, str]] | None:
        """The input whose unit axis the output inherits: one of the output's shape first."""
        found = [(t, a) for t in (*_tensors(list(args)), *_tensors(list(kwargs.values()))) if (a := self.axis(t))]
        same = [item for item in found if item[0].shape == output.shape]
        return (same or found)[0] if found else None

    @staticmethod
    def _carry(
        func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], source: torch.Tensor, axis: int, out: torch.Tensor
    ) -> int | None:
        """Where ``source``'s unit axis is in ``out``, or None when the op mixes or splits it."""
        shape = tuple(source.shape)
        if func in _REORDER or getattr(func, "__self__", None) in _REORDER_PROPERTIES:
            if not args or args[0] is not source:
                return None
            sizes = tuple(range(2, 2 + len(shape)))  # distinct sizes: the output's shape shows each dim's place
            with torch.no_grad():
                moved = func(torch.empty(sizes, device="meta"), *args[1:], **kwargs)
            if not isinstance(moved, torch.Tensor) or moved.dim() != len(shape):
                return None
            return list(moved.shape).index(sizes[axis]) - moved.dim()
        target = tuple(out.shape)
        size = shape[axis]
        if target == shape or (len(target) == len(shape) and target[axis] == size):
            return axis  # elementwise, in place, pooled, padded or concatenated along other dims
        if size <= 1:
            return None
        tail = _tail(shape, axis)
        places = [
            k - len(target) for k in range(len(target)) if target[k] == size and _tail(target, k - len(target)) == tail
        ]
        return places[0] if len(places) == 1 else None


@dataclass(frozen=True)
class Found:
    """What the example pass showed about one layer: its value's shape and unit dim (None: unknown)."""

    shape: tuple[int, ...]
    dim: int | None
    origin: str  # the operation that set the unit axis


def infer_unit_dims(model: nn.Module, example: torch.Tensor | ModelInputs, layers: Sequence[str]) -> dict[str, Found]:
    """The unit dim of each layer's value, followed through one forward pass of ``example``."""
    references = {name: LayerRef.parse(name) for name in dict.fromkeys(layers)}
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, reference in references.items():
        module = resolve_module(model, reference.path)
        by_module.setdefault(id(module), (module, []))[1].append(name)
    tracker = _AxisTracker()
    found: dict[str, Found] = {}
    calls: dict[int, int] = {}

    def make_hook(key: int, names: list[str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[key] = calls.get(key, 0) + 1
            for name in names:
                if calls[key] != (references[name].call or 1):
                    continue
                value = references[name].select(output)
                seen = tracker.axis(value)
                dim = seen[0] + value.dim() if seen else None
                found[name] = Found(tuple(value.shape), dim, seen[1] if seen else "")

        return hook

    with HookScope() as scope, torch.no_grad():
        for key, (module, names) in by_module.items():
            scope.forward(module, make_hook(key, names))
        with tracker:
            example.call(model) if isinstance(example, ModelInputs) else model(example)
    missing = [name for name in references if name not in found]
    if missing:
        raise PyengineError(f"layer {missing[0]!r} did not run in a forward pass of the example input")
    return found


def dim_name(dim: int, ndim: int) -> str:
    """``channels`` (dim 1), ``last`` or ``dim k``; for (rows, units) values: ``units``."""
    if ndim <= 2:
        return "units"
    return "channels" if dim == 1 else "last" if dim == ndim - 1 else f"dim {dim}"


class UnitAxes:
    """Per layer, the dim of its values that holds the units, resolved once per layer.

    ``choice``: 'auto', 'channels', 'last' or 'flatten' (see the module doc); for 'auto',
    ``stored``: unit dims a store recorded at capture, ``found``: what an example pass showed.
    """

    def __init__(
        self, choice: str, technique: str, found: Mapping[str, Found], stored: Mapping[str, int] | None = None
    ) -> None:
        if choice not in UNIT_CHOICES:
            raise PyengineError(f"units={choice!r} is invalid: expected one of {', '.join(UNIT_CHOICES)}")
        self.choice, self.technique = choice, technique
        self._found, self._stored = dict(found), dict(stored or {})
        self.dims: dict[str, int] = {}  # 0: flattened (every value of a row is a unit)
        self.origins: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def prepare(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Resolve the layers of these value shapes."""
        for name, shape in shapes.items():
            self.dim(name, shape)

    def dim(self, layer: str, shape: Sequence[int]) -> int:
        """The unit dim of ``layer``'s values of ``shape`` (rows first)."""
        if layer in self.dims:
            return self.dims[layer]
        ndim = len(shape)
        self._shapes[layer] = tuple(shape)
        if self.choice == "flatten":
            self.dims[layer], self.origins[layer] = 0, "units='flatten'"
            return 0
        if ndim < 2:
            raise PyengineError(
                f"{self.technique}: layer {layer!r} has values of shape {tuple(shape)}; expected (rows, units, ...)"
            )
        if ndim == 2:
            dim, origin = 1, "(rows, units)"
        elif self.choice == "channels":
            dim, origin = 1, "units='channels'"
        elif self.choice == "last":
            dim, origin = ndim - 1, "units='last'"
        elif layer in self._stored:
            dim, origin = self._stored[layer], "recorded at capture"
        else:
            found = self._found.get(layer)
            if found is None or found.dim is None or found.dim == 0 or len(found.shape) != ndim:
                why = "no input to run and the store did not record it" if found is None else "not from its producer"
                raise PyengineError(
                    f"{self.technique}: cannot tell which dim of layer {layer!r} (values {_shape(shape)}) holds "
                    f"its units ({why}); pass units='channels' (dim 1) or units='last' (dim {ndim - 1})"
                )
            dim, origin = found.dim, f"from a {found.origin}"
        self.dims[layer], self.origins[layer] = dim, origin
        return dim

    def names(self) -> dict[str, str]:
        """Layer -> where its units are: 'channels' (dim 1), 'last', 'units' (rows of units),
        'flatten' (every value) or 'dim k'; stored with the results."""
        return {
            layer: "flatten" if dim == 0 else dim_name(dim, len(self._shapes[layer]))
            for layer, dim in self.dims.items()
        }

    def matrices(self, block: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each layer's values as (rows * positions, units); with a (B, T) ``mask`` a token
        sequence's padded positions are dropped."""
        self.prepare({layer: tuple(values.shape) for layer, values in block.items()})
        return {layer: as_unit_matrix(values, self.dims[layer], mask) for layer, values in block.items()}

    def pooling(self, layer: str, how: str) -> str:
        """The pooling ``how`` means for ``layer`` (resolved first): 'auto' is 'max' over a map's
        positions (units on dim 1) and 'mean' over a sequence's tokens (units on the last dim);
        '-' for values without positions."""
        shape = self._shapes[layer]
        if len(shape) <= 2 or self.dims[layer] == 0:
            return "-"
        if how == "auto":
            return "max" if self.dims[layer] == 1 else "mean"
        if how in ("first", "last") and len(shape) > 3:
            raise PyengineError(
                f"{self.technique}: reduce={how!r} picks a token of a sequence, but the positions of layer "
                f"{layer!r} (values {_shape(shape)}, units on dim {self.dims[layer]}) are not one sequence; "
                "use 'max' or 'mean'"
            )
        return how

    def pooled(
        self, block: Mapping[str, torch.Tensor], how: str, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each layer's values as (rows, units), its positions pooled by ``how`` (see ``pooling``),
        over a token sequence's real positions only when a (B, T) ``mask`` is given."""
        self.prepare({layer: tuple(values.shape) for layer, values in block.items()})
        return {
            layer: pool_positions(
                values, self.dims[layer], self.pooling(layer, how) if values.dim() > 2 else "max", mask
            )
            for layer, values in block.items()
        }

    def summary(self) -> str:
        """``dim 2 (last) of blocks.0.mlp.act (a linear output); ...`` for the layers resolved."""
        groups: dict[str, list[str]] = {}
        for layer, dim in self.dims.items():
            if len(self._shapes[layer]) <= 2:
                continue
            groups.setdefault(f"dim {dim} ({self.origins[layer]})", []).append(layer)
        parts = []
        for what, names in groups.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
            parts.append(f"{what}: {shown}")
        return "; ".join(parts)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(["B", *map(str, shape[1:])]) + ")"


def as_unit_matrix(values: torch.Tensor, dim: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, ..., units at ``dim``, ...) -> (rows * positions, units): every position of a row is a
    sample; ``dim`` 0 flattens (rows, every value). A (B, T) ``mask`` (0: padding) keeps only the
    real tokens of a (B, T, D) sequence."""
    if values.dim() <= 2 or dim == 0:
        return values.reshape(values.shape[0], -1)
    real = _real_tokens(values, dim, mask)
    if real is not None:
        return values[real]
    return values.movedim(dim, -1).reshape(-1, values.shape[dim])


def _real_tokens(values: torch.Tensor, dim: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) boolean real tokens of ``values`` when ``mask`` marks them (a (B, T, D) sequence
    with units last), else None."""
    if mask is None or values.dim() != 3 or dim != 2 or tuple(values.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(values.device).bool()


def pool_positions(values: torch.Tensor, dim: int, how: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, ..., units at ``dim``, ...) -> (rows, units): the positions of each unit pooled by ``how``:
    'max', 'mean', 'first' (the first position: a ViT's class token) or 'last' (the last token);
    with a (B, T) ``mask`` over the real tokens only ('last': the last real token)."""
    if values.dim() <= 2 or dim == 0:
        return values.reshape(values.shape[0], -1)
    if how not in POOLINGS:
        raise PyengineError(f"pooling {how!r} is invalid: expected one of {', '.join(POOLINGS)}")
    real = _real_tokens(values, dim, mask)
    if real is not None:
        if how == "max":
            return values.masked_fill(~real[..., None], float("-inf")).amax(1)
        if how == "mean":
            weights = real[..., None].to(values.dtype)
            return (values * weights).sum(1) / weights.sum(1)
        if how == "last":
            last = real.shape[1] - 1 - real.flip(1).to(torch.uint8).argmax(1)
            return values[torch.arange(values.shape[0], device=values.device), last]
    positions = values.movedim(dim, -1).reshape(values.shape[0], -1, values.shape[dim])
    if how == "max":
        return positions.amax(1)
    if how == "mean":
        return positions.mean(1)
    return positions[:, 0] if how == "first" else positions[:, -1]


def unit_count(shape: Sequence[int], dim: int) -> int:
    """How many units values of ``shape`` have along ``dim`` (all of a row for 1-D rows)."""
    return int(shape[dim]) if len(shape) >= 2 else 1
