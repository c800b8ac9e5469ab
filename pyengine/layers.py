"""Reading layers: references, the one forward-recording mechanism, and default layers.

A layer reference names a value inside a forward pass::

    "features.relu2"        the output of that module (which must run once per pass)
    "blocks.0.attn[0]"      element 0 of a tuple/list output
    "layer4.2.relu#3"       the output of the module's third call (1-based), for a module
                            run several times per pass; without it such a module is an error
    Layer("encoder", lambda out: out.last_hidden_state, name="encoder.hidden")
                            a Python selector applied to the module's output (a ``str``
                            whose text, the name, is how results and stores call it)

``record`` captures referenced values while the model runs; ``trace`` lists every leaf
module call in order. Both are scoped: every hook is removed when the block ends.
"""

from __future__ import annotations

import dataclasses
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
from pyengine.inputs import ModelInputs

_REFERENCE = re.compile(
    r"^(?P<path>[^\[\]#@\s]+)(?:#(?P<call>\d+))?(?:\[(?P<element>\d+)\])?(?:#(?P<call_after>\d+))?$"
)

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


Selector = Callable[[Any], torch.Tensor]


class Layer(str):
    """A layer reference with a Python selector for outputs an element index cannot reach
    (a Hugging Face ``ModelOutput``, a dict): ``Layer("encoder#2", lambda out: out["h"])``.
    It is a ``str`` — its ``name`` — so it goes wherever a layer reference goes."""

    path: str
    selector: Selector

    def __new__(cls, path: str, selector: Selector, name: str = "") -> Layer:
        if not callable(selector):
            raise PyengineError(f"Layer({path!r}): selector {selector!r} is not callable; expected a function")
        text = name or f"{path}:{getattr(selector, '__name__', 'selected')}".replace("<lambda>", "selected")
        layer = super().__new__(cls, text)
        layer.path, layer.selector = path, selector
        return layer


@dataclass(frozen=True)
class LayerRef:
    """A value inside a forward pass: a module's output, one element of it, at one call."""

    path: str
    element: int | None = None  # element of a tuple/list output; None: the output itself
    call: int | None = None  # which call (1-based) of a module run several times per pass
    selector: Selector | None = field(default=None, compare=False)  # a Python selector (see Layer)

    @classmethod
    def parse(cls, text: str) -> LayerRef:
        if isinstance(text, Layer):
            return dataclasses.replace(cls.parse(text.path), selector=text.selector)
        match = _REFERENCE.match(text) if isinstance(text, str) else None
        call = (match["call"] or match["call_after"]) if match else None
        if match is None or (match["call"] and match["call_after"]) or call == "0" or (call or "").startswith("0"):
            raise PyengineError(
                f"layer {text!r} is invalid: expected a module path, optionally with #call (1-based) "
                "and [element], e.g. 'layer1.0.relu', 'layer4.2.relu#3' or 'blocks.0.attn[0]'"
            )
        element = match["element"]
        return cls(match["path"], int(element) if element is not None else None, int(call) if call else None)

    def __str__(self) -> str:
        text = self.path + (f"#{self.call}" if self.call is not None else "")
        return text + (f"[{self.element}]" if self.element is not None else "")

    def select(self, output: Any) -> torch.Tensor:
        """The referenced tensor inside a module's output."""
        value = output
        if self.selector is not None:
            value = self.selector(output)
            if not isinstance(value, torch.Tensor):
                raise PyengineError(f"layer {str(self)!r}: its selector returned {_describe(value)}; expected a tensor")
            return value
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
    watched: torch.Tensor | None = None  # the tensor the model goes on with, checked for in-place changes
    copy: bool | None = None  # copy the value? None: not known yet (the first pass copies and finds out)


class Recording(Mapping[str, torch.Tensor]):
    """The values recorded in the latest forward pass, by the names they were asked for."""

    def __init__(self, slots: dict[str, _Slot]) -> None:
        self._slots = slots

    def __getitem__(self, name: str) -> torch.Tensor:
        slot = self._slots[name]
        if slot.calls > 1 and slot.reference.call is None:
            raise PyengineError(
                f"layer {name!r}: module {slot.reference.path!r} ran {slot.calls} times in one forward pass; "
                f"name the call, e.g. '{slot.reference.path}#{slot.calls}' for the last (1 to {slot.calls})"
            )
        if slot.value is None:
            ran = f"ran {slot.calls} time(s) per pass" if slot.calls else "did not run in the forward pass"
            raise PyengineError(f"layer {name!r}: the module {ran}; nothing recorded")
        watched = slot.watched
        if watched is not None and watched._version != slot.version:
            if slot.copy is None:  # found out on the first pass; its value is a copy
                slot.copy = True
            elif not slot.copy:
                raise PyengineError(
                    f"layer {name!r}: its output was changed in place after the module returned it, "
                    "in this pass but not the first; record the module that produces the final value"
                )
        elif slot.copy is None:
            slot.copy = False
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

    A recorded value is what the module returned, even when the model changes that tensor in
    place afterwards (``out += identity``, an in-place ReLU): the first pass copies each value
    and watches whether the model changes it; later passes copy only the values that changed.
    Without ``grad`` values are detached; with ``grad`` they stay in the autograd graph (the
    model goes on with a copy when it changes the value in place), and a value that needs no
    gradient, in a frozen model, becomes a leaf that does. ``edit`` maps a layer to a function
    that replaces its value in the forward pass (at the referenced call).
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
            slot.calls, slot.value, slot.watched = 0, None, None

    def make_hook(entries: list[tuple[str, _Slot]]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for name, slot in entries:
                slot.calls += 1
                if slot.calls != (slot.reference.call or 1):
                    continue
                value = slot.reference.select(output)
                if edit and name in edit:
                    value, output = _substituted(output, value, edit[name](value), name)
                copy = slot.copy is not False
                if grad and torch.is_grad_enabled():
                    if not value.requires_grad and value.is_floating_point():
                        # differentiable even in a frozen model
                        value, output = _substituted(output, value, value.detach().requires_grad_(True), name)
                    slot.value = slot.watched = value
                    if copy:  # the model goes on with a copy; the recorded value stays as returned
                        slot.watched, output = _substituted(output, value, value.clone(), name)
                else:
                    slot.watched = value.detach()
                    slot.value = slot.watched.clone() if copy else slot.watched
                slot.version = slot.watched._version
            return output

        return hook

    with HookScope() as scope:
        scope.forward_pre(model, reset)
        for key, entries in by_module.items():
            scope.forward(modules[key], make_hook(entries))
        yield Recording(slots)
    for name, slot in slots.items():
        if slot.reference.call is not None and slot.value is None and slot.calls:
            raise PyengineError(
                f"layer {name!r}: the module ran {slot.calls} time(s) per pass; "
                f"call #{slot.reference.call} does not exist"
            )


def _substituted(output: Any, old: torch.Tensor, new: torch.Tensor, name: str) -> tuple[torch.Tensor, Any]:
    """``new`` and the module output with ``new`` in place of ``old`` (found by identity: the
    output itself, an element of a tuple/list, or a value of a dict or ModelOutput)."""
    if output is old:
        return new, new
    if isinstance(output, (tuple, list)) and any(item is old for item in output):
        items = [new if item is old else item for item in output]
        return new, (tuple(items) if isinstance(output, tuple) else items)
    if isinstance(output, dict) and any(item is old for item in output.values()):
        for key in [key for key, item in output.items() if item is old]:
            output[key] = new
        return new, output
    raise PyengineError(
        f"layer {name!r}: its value cannot be replaced inside the module's {_describe(output)} output "
        "(needed for gradients toward it in a frozen model, or for an edit); reference a tuple element or dict value"
    )


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


# --- default layers, found from one traced forward pass ---------------------------------------

NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Softplus, nn.Tanh,
)  # fmt: skip
"""Hidden-unit nonlinearities (gates such as Sigmoid/Hardsigmoid are not units' outputs)."""

_ACTIVATION_NAME = re.compile(r"(?i)(gelu|relu|silu|swish|mish|softplus|activation)")
"""Other libraries' activation modules by class name: Hugging Face's ``GELUActivation``,
``NewGELUActivation``, ``SiLUActivation``, timm's ``GELUTanh``, ``QuickGELU``."""


def is_nonlinearity(module: nn.Module) -> bool:
    """A hidden-unit nonlinearity module: torch's (``NONLINEARITIES``), or a leaf module without
    parameters whose class is named like an activation (other libraries' own classes)."""
    if isinstance(module, NONLINEARITIES):
        return True
    if any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False)):
        return False
    return bool(_ACTIVATION_NAME.search(type(module).__name__))


PER_POSITION: tuple[type[nn.Module], ...] = (
    *NONLINEARITIES, nn.Sigmoid, nn.Hardsigmoid, nn.Hardtanh, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
"""Modules that act on each position of their input independently (same shape out)."""


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass(frozen=True)
class ModuleCall:
    """One module call of a traced pass: its reference, module, input and output."""

    reference: str  # "path", or "path#k" for a module that ran several times
    module: nn.Module
    leaf: bool
    first_input: Any
    output: Any
    node: Any  # the output's autograd node (None without gradients)


@dataclass(frozen=True)
class TracedPass:
    """One forward pass: its module calls, in the order they finished, and its autograd graph."""

    calls: list[ModuleCall]
    sources: tuple[torch.Tensor, ...]  # the input, or for token ids the embeddings' outputs
    output: Any

    def separates(self, node: Any) -> bool:
        """Every path from the output back to the input (its sources) goes through autograd ``node``."""
        root = _first_tensor(self.output)
        if root is None or root.grad_fn is None or not self.sources:
            return False
        targets = {id(source.view_as(source).grad_fn.next_functions[0][0]) for source in self.sources}  # type: ignore[union-attr]
        stack: list[Any] = [root.grad_fn]
        visited = {id(node)}
        while stack:
            current = stack.pop()
            if current is None or id(current) in visited:
                continue
            if id(current) in targets:
                return False
            visited.add(id(current))
            stack.extend(next_node for next_node, _ in current.next_functions)
        return True


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


Example = torch.Tensor | ModelInputs  # one input row, alone or with its attention mask


def traced_pass(model: nn.Module, example: Example) -> TracedPass:
    """Every module call (containers too, in the order they finish) of one forward pass of
    ``example``, with references that name the call of modules run several times."""
    names = {id(m): n for n, m in model.named_modules() if n}
    raw: list[tuple[str, nn.Module, Any, Any, Any]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # the node now: an in-place op later on the same tensor (``out += identity``) replaces it
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        raw.append((names[id(module)], module, args[0] if args else None, output, node))

    sources: list[torch.Tensor] = []

    def embedded(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        leaf = output.detach().requires_grad_(True)  # token ids: paths start at the embeddings
        sources.append(leaf)
        return leaf

    given = example if isinstance(example, ModelInputs) else ModelInputs(example)
    x = given.main.detach().clone()
    if x.is_floating_point():
        sources.append(x.requires_grad_(True))
    with HookScope() as scope, torch.enable_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and not x.is_floating_point():
                scope.forward(module, embedded)
            if id(module) in names:
                scope.forward(module, hook)
        output = given.call(model, x)
    counts: dict[str, int] = {}
    for name, *_ in raw:
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    calls = []
    for name, module, first_input, value, node in raw:
        seen[name] = seen.get(name, 0) + 1
        reference = name if counts[name] == 1 else f"{name}#{seen[name]}"
        leaf = not any(True for _ in module.children())
        calls.append(ModuleCall(reference, module, leaf, first_input, value, node))
    return TracedPass(calls, tuple(sources), output)


def bypassed(model: nn.Module, example: Example, references: Sequence[str]) -> tuple[str, ...]:
    """Those module calls of ``references`` that some path from the input to the output goes
    around (a residual add, a concatenation, a gate); references this cannot tell (tuple
    elements; integer inputs of a model without ``nn.Embedding``) are not listed."""
    traced = traced_pass(model, example)
    if not traced.sources:
        return ()
    nodes = {c.reference: c.node for c in traced.calls}
    nodes |= {f"{ref}#1": node for ref, node in list(nodes.items()) if "#" not in ref}
    return tuple(ref for ref in references if nodes.get(ref) is not None and not traced.separates(nodes[ref]))


def module_cuts(model: nn.Module, example: Example) -> tuple[ModuleCall, ...]:
    """The module calls that every path from the input to the output goes through, in the order
    they finished (a residual net's block outputs, its stem, ...)."""
    traced = traced_pass(model, example)
    return tuple(call for call in traced.calls if call.node is not None and traced.separates(call.node))


def nonlinearity_outputs(model: nn.Module, example: Example) -> tuple[str, ...]:
    """References to every call of a nonlinearity module (ReLU, GELU, SiLU, ...) in a pass."""
    return tuple(c.reference for c in traced_pass(model, example).calls if is_nonlinearity(c.module))


def last_spatial_cut(model: nn.Module, example: Example, technique: str) -> str:
    """The last (N, C, H, W) output with H*W > 1 that every path from the input to the output
    goes through (a ResNet's ``layer4``, not a conv inside its last block; the outermost module
    when several return the same value); an error naming why when there is none."""
    main = example.main if isinstance(example, ModelInputs) else example
    if not main.is_floating_point():
        raise PyengineError(f"{technique}: no default layer for {main.dtype} inputs; pass layers=<module path>")
    traced = traced_pass(model, example)
    spatial = [
        c
        for c in traced.calls
        if isinstance(c.output, torch.Tensor)
        and c.output.dim() == 4
        and c.output.shape[-2:].numel() > 1
        and c.node is not None
        and not isinstance(c.module, _ADAPTIVE_POOLS)  # the classifier's pooling, which may even upsample
        and not isinstance(c.module, _TRANSPARENT)  # name the module that computed the value
    ]
    for call in reversed(spatial):
        if traced.separates(call.node):
            return call.reference
    raise PyengineError(
        f"{technique}: {type(model).__name__} has no (N, C, H, W) layer that every path to the output goes "
        "through; pass layers=<module path>"
    )


def first_block_output(model: nn.Module, example: Example, technique: str) -> str:
    """The first convolution's output after the per-position modules applied to it in turn
    (its normalisation and nonlinearity: a ResNet's ``relu`` after ``conv1``/``bn1``), named by
    the outermost module that returns that value (torchvision's ``features.0`` block)."""
    calls = traced_pass(model, example).calls
    convs = [k for k, c in enumerate(calls) if c.leaf and isinstance(c.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise PyengineError(f"{technique}: {type(model).__name__} runs no convolution; pass layers=<module path>")
    chosen = calls[convs[0]]
    for call in calls[convs[0] + 1 :]:
        if call.leaf and isinstance(call.module, _TRANSPARENT):
            continue
        if call.leaf and isinstance(call.module, PER_POSITION) and call.first_input is chosen.output:
            chosen = call  # the next normalisation or nonlinearity (in place or not)
        elif not call.leaf and call.output is chosen.output:
            chosen = call  # a block returning that value
        elif call.leaf:
            break
    return chosen.reference


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
