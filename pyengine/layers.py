"""Reading layers: references, the one forward-recording mechanism, and default layers.

A layer reference names a value inside a forward pass::

    "features.relu2"        the output of that module (its last call)
    "blocks.0.attn[0]"      element 0 of a tuple/list output
    "layer1.0.relu@1"       the output of the module's second call (0-based; -1 = last)

``record`` captures referenced values while the model runs; ``trace`` lists every leaf
module call in order. Both are scoped: every hook is removed when the block ends.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pyengine.errors import NotFoundError, PyengineError

_REFERENCE = re.compile(r"^(?P<path>[^\[\]@\s]+)(?:\[(?P<element>\d+)\])?(?:@(?P<call>-?\d+))?$")

Edit = Callable[[torch.Tensor], torch.Tensor]


class HookScope:
    """Collects hook handles; removes every one on exit, however the block ends."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        handle = module.register_forward_hook(hook, **kwargs)
        self._handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        handle = module.register_forward_pre_hook(hook, **kwargs)
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a module path like ``features.conv1``; errors list the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4) or names[:5]
    raise NotFoundError(f"no layer {name!r} in {type(model).__name__}; closest: {', '.join(close)}")


@dataclass(frozen=True)
class LayerRef:
    """A value inside a forward pass: a module's output, one element of it, at one call."""

    path: str
    element: int | None = None  # element of a tuple/list output; None: the output itself
    call: int = -1  # which call of a module run several times per pass (0-based; -1: the last)

    @classmethod
    def parse(cls, text: str) -> LayerRef:
        match = _REFERENCE.match(text) if isinstance(text, str) else None
        if match is None:
            raise PyengineError(
                f"layer {text!r} is invalid: expected a module path, optionally with [element] "
                "and @call, e.g. 'layer1.0.relu' or 'blocks.0.attn[0]@1'"
            )
        element, call = match["element"], match["call"]
        return cls(match["path"], int(element) if element is not None else None, int(call) if call else -1)

    def __str__(self) -> str:
        text = self.path + (f"[{self.element}]" if self.element is not None else "")
        return text + (f"@{self.call}" if self.call != -1 else "")

    def select(self, output: Any) -> torch.Tensor:
        """The referenced tensor inside a module's output."""
        value = output
        if self.element is not None:
            if not isinstance(output, (tuple, list)) or self.element >= len(output):
                raise PyengineError(
                    f"layer {str(self)!r}: the module returned {_describe(output)}; "
                    f"expected a tuple or list with an element {self.element}"
                )
            value = output[self.element]
        if not isinstance(value, torch.Tensor):
            hint = "; name one element, e.g. '[0]'" if isinstance(value, (tuple, list)) else ""
            raise PyengineError(f"layer {str(self)!r} returned {_describe(value)}; expected a tensor{hint}")
        return value


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


@dataclass
class _Slot:
    reference: LayerRef
    calls: int = 0
    value: torch.Tensor | None = None
    version: int = 0


class Recording(Mapping[str, torch.Tensor]):
    """The values recorded in the latest forward pass, by the names they were asked for."""

    def __init__(self, slots: dict[str, _Slot], grad: bool) -> None:
        self._slots, self._grad = slots, grad

    def __getitem__(self, name: str) -> torch.Tensor:
        slot = self._slots[name]
        if slot.value is None:
            ran = (
                f"ran {slot.calls} time(s) in the last forward pass"
                if slot.calls
                else "did not run in the forward pass"
            )
            raise PyengineError(f"layer {name!r} {ran}; nothing recorded")
        if self._grad and slot.value._version != slot.version:
            raise PyengineError(
                f"layer {name!r}: its output was changed in place after the module returned it "
                "(e.g. an in-place add or ReLU); record the module that produces the final value"
            )
        return slot.value

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def calls(self, name: str) -> int:
        """How often the layer's module ran in the latest forward pass."""
        return self._slots[name].calls


@contextmanager
def record(
    model: nn.Module, layers: Sequence[str], *, grad: bool = False, edit: Mapping[str, Edit] | None = None
) -> Iterator[Recording]:
    """Record ``layers`` (references, see module doc) during forward passes of ``model``.

    Without ``grad`` values are detached copies, so later in-place changes by the model do not
    reach them; with ``grad`` they stay in the autograd graph (a value that needs no gradient,
    in a frozen model, becomes a leaf that does, so gradients toward it always exist). ``edit`` maps a layer to a
    function that replaces its value in the forward pass (every matching call).
    """
    if isinstance(layers, str):
        raise PyengineError(f"layers={layers!r} is invalid: expected a list of layer references")
    slots = {name: _Slot(LayerRef.parse(name)) for name in dict.fromkeys(layers)}
    unknown = set(edit or {}) - set(slots)
    if unknown:
        raise PyengineError(f"edit names {sorted(unknown)[0]!r}, which is not a recorded layer")
    by_module: dict[int, list[tuple[str, _Slot]]] = {}
    modules: dict[int, nn.Module] = {}
    for name, slot in slots.items():
        module = resolve_module(model, slot.reference.path)
        modules[id(module)] = module
        by_module.setdefault(id(module), []).append((name, slot))

    def reset(module: nn.Module, args: Any) -> None:
        for slot in slots.values():
            slot.calls, slot.value = 0, None

    def make_hook(entries: list[tuple[str, _Slot]]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for name, slot in entries:
                call, slot.calls = slot.calls, slot.calls + 1
                wanted = slot.reference.call
                if wanted != -1 and call != wanted:
                    continue
                value = slot.reference.select(output)
                if edit and name in edit:
                    value = edit[name](value)
                    output = _replace(output, slot.reference.element, value)
                if grad and torch.is_grad_enabled() and not value.requires_grad and value.is_floating_point():
                    value = value.detach().requires_grad_(True)  # differentiable even in a frozen model
                    output = _replace(output, slot.reference.element, value)
                slot.value = value if grad else value.detach().clone()
                slot.version = value._version
            return output

        return hook

    with HookScope() as scope:
        scope.forward_pre(model, reset)
        for key, entries in by_module.items():
            scope.forward(modules[key], make_hook(entries))
        yield Recording(slots, grad)
    for name, slot in slots.items():
        if slot.reference.call >= 0 and slot.value is None and slot.calls:
            raise PyengineError(
                f"layer {name!r}: the module ran {slot.calls} time(s) per pass; "
                f"call {slot.reference.call} does not exist"
            )


def _replace(output: Any, element: int | None, value: torch.Tensor) -> Any:
    if element is None:
        return value
    items = list(output)
    items[element] = value
    return tuple(items) if isinstance(output, tuple) else items


@dataclass(frozen=True)
class Call:
    """One leaf module call of a traced forward pass."""

    name: str
    module: nn.Module
    inputs: tuple[Any, ...]
    output: Any


@dataclass
class Trace:
    """Leaf module calls in the order they finished (filled while the model runs)."""

    calls: list[Call] = field(default_factory=list)


class _Reached(Exception):
    pass


@contextmanager
def trace(model: nn.Module, *, until: nn.Module | None = None, also: Sequence[nn.Module] = ()) -> Iterator[Trace]:
    """Record every leaf module call (and the calls of ``also``) of the passes run inside.

    With ``until``, the pass stops right after that module's first call: the rest of the
    ``with`` block is skipped and the stop is absorbed here.
    """
    names = {id(m): n for n, m in model.named_modules()}
    traced = Trace()
    watched = [m for m in model.modules() if m is until or m in also or not any(True for _ in m.children())]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        traced.calls.append(Call(names[id(module)], module, args, output))
        if module is until:
            raise _Reached

    with HookScope() as scope:
        for module in watched:
            scope.forward(module, hook)
        try:
            yield traced
        except _Reached:
            pass


def conv_layers(model: nn.Module, technique: str, kinds: tuple[type[nn.Module], ...] = (nn.Conv2d,)) -> list[str]:
    """Module paths of the model's conv layers, in order; an error if there are none."""
    convs = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    if not convs:
        wanted = "/".join(f"nn.{kind.__name__}" for kind in kinds)
        raise PyengineError(f"{technique}: the model has no {wanted} layer; pass layers=<module path>")
    return convs


def after_relu(model: nn.Module, name: str) -> str:
    """The nn.ReLU module registered right after ``name``, if there is one, else ``name``."""
    modules = list(model.named_modules())
    k = [n for n, _ in modules].index(name)
    return modules[k + 1][0] if k + 1 < len(modules) and isinstance(modules[k + 1][1], nn.ReLU) else name


def relu_layers(model: nn.Module) -> tuple[str, ...]:
    """Module paths of every ``nn.ReLU`` in the model."""
    return tuple(name for name, module in model.named_modules() if name and isinstance(module, nn.ReLU))
