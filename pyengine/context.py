"""What a technique gets: model, device, layers, data, store, hooks, progress, rng."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pyengine.errors import NotFoundError, PyengineError
from pyengine.progress import Progress

if TYPE_CHECKING:
    from pyengine.data.base import Dataset
    from pyengine.store import StoreReader


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a module path like ``features.conv1``; errors list the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4) or names[:5]
    raise NotFoundError(f"no layer {name!r} in {type(model).__name__}; closest: {', '.join(close)}")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; a clear error for typos and absent accelerators."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PyengineError(f"device={device!r} is invalid: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise PyengineError(f"device={device!r} is not available: this torch sees no CUDA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise PyengineError(f"device={device!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    return parsed


class HookScope:
    """Collects hook handles; removes every one on exit, however the block ends."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def forward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        return self.add(module.register_forward_hook(hook, **kwargs))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        return self.add(module.register_forward_pre_hook(hook, **kwargs))

    def backward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        return self.add(module.register_full_backward_hook(hook, **kwargs))

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Context:
    """Everything a technique may use. Built by ``pyengine.run``; techniques never open files."""

    model: nn.Module
    device: torch.device
    inputs: torch.Tensor | None = None
    data: Dataset | None = None
    store: StoreReader | None = None
    seed: int = 0
    show_progress: bool = True
    rng: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = torch.Generator(device="cpu").manual_seed(self.seed)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """Module path -> module, for every submodule of the model."""
        return {name: module for name, module in self.model.named_modules() if name}

    def relu_layers(self) -> tuple[str, ...]:
        """Module paths of every ``nn.ReLU`` in the model."""
        return tuple(name for name, module in self.layers.items() if isinstance(module, nn.ReLU))

    def default_layers(self, technique: str, *, from_store: bool = True) -> tuple[str, ...]:
        """The stored layers (when ``from_store``), else every ReLU module; an error if none."""
        stored = tuple(self.store.layers) if from_store and self.store is not None else ()
        layers = stored or self.relu_layers()
        if not layers:
            raise PyengineError(f"{technique}: no layers given and the model has no nn.ReLU modules; pass layers=[...]")
        return layers

    def module(self, name: str) -> nn.Module:
        return resolve_module(self.model, name)

    @contextmanager
    def hooks(self) -> Iterator[HookScope]:
        """``with ctx.hooks() as scope: scope.forward(module, fn)`` — removed on exit."""
        with HookScope() as scope:
            yield scope

    def input_batches(self, batch_size: int, *, max_rows: int = 0, technique: str = "") -> Iterator[torch.Tensor]:
        """Input batches on the device: from the data, else from ``inputs``."""
        limit = max_rows or None
        if self.data is not None:
            stop = min(len(self.data), limit or len(self.data))
            return (batch.inputs.to(self.device) for batch in self.data.batches(batch_size, 0, stop))
        if self.inputs is not None:
            return iter(self.inputs[:limit].to(self.device).split(batch_size))
        raise PyengineError(f"{technique or 'this technique'} needs data: pass data=<dataset> or inputs")

    def activations(self, layers: tuple[str, ...], *, batch_size: int, max_rows: int = 0,
                    technique: str = "") -> Iterator[dict[str, torch.Tensor]]:
        """Blocks ``{layer: activations}`` of at most ``batch_size`` rows: streamed from the
        store when it holds every layer, else from a fresh pass over the data (or inputs)."""
        limit = max_rows or None
        if self.store is not None and all(layer in self.store.layers for layer in layers):
            streams = [self.store.iter_layer(layer, rows=batch_size, device=self.device, stop=limit) for layer in layers]
            for blocks in zip(*streams):
                yield dict(zip(layers, blocks))
            return
        modules = {layer: self.module(layer) for layer in layers}
        batches = self.input_batches(batch_size, max_rows=max_rows, technique=technique)
        outputs: dict[str, torch.Tensor] = {}
        with self.hooks() as scope, torch.no_grad():
            for layer, module in modules.items():
                scope.forward(module, lambda m, a, out, layer=layer: outputs.__setitem__(layer, out.detach()))
            for inputs in batches:
                self.model(inputs)
                yield {layer: outputs[layer] for layer in layers}

    def progress(self, total: int | None, desc: str) -> Progress:
        return Progress(total, desc, enabled=self.show_progress)

    def require_inputs(self, technique: str) -> torch.Tensor:
        if self.inputs is None:
            raise PyengineError(f"{technique} needs inputs: pass a tensor as pyengine.run(..., inputs)")
        return self.inputs.to(self.device)
