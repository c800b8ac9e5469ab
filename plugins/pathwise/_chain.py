"""A ReLU network as a chain: trace the layers a forward pass runs, check that pathwise
analysis supports them, and run forward passes that mask the backward signal to chosen units.

Supported: Linear, Conv2d (groups 1, zero padding), ReLU (module or functional: ``F.relu``,
``torch.relu``, ``Tensor.relu(_)``), MaxPool2d, AvgPool2d, Flatten, Dropout (eval), Identity,
executed one after another. ReLU layers are named by their module path, or ``relu:<k>`` for
the k-th functional call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pyengine.context import Context
from pyengine.errors import PyengineError

LINEAR = (nn.Linear, nn.Conv2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)
SUPPORTED = (*LINEAR, nn.ReLU, *POOLS, *PASS_THROUGH)
_RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_)


@dataclass
class Call:
    """One executed layer: a module, or a functional ReLU (module None)."""

    name: str
    module: nn.Module | None
    input: torch.Tensor
    output: torch.Tensor

    @property
    def is_relu(self) -> bool:
        return self.module is None or isinstance(self.module, nn.ReLU)


@dataclass
class Step:
    """From one ReLU layer's output (or the input) to the next pre-activations."""

    pool: nn.MaxPool2d | nn.AvgPool2d | None
    linear: nn.Linear | nn.Conv2d
    linear_name: str


@dataclass
class Chain:
    """The traced network: ReLU layer names, their outputs a_l, and the steps between them.

    ``steps[0]`` maps the input to the first pre-activations, ``steps[l]`` layer l - 1's
    output to layer l's pre-activations, and the last one to the model output.
    """

    layers: list[str]
    activations: list[torch.Tensor]
    steps: list[Step]
    output: torch.Tensor = field(repr=False)


class _ReluCalls(TorchFunctionMode):
    """Calls ``on_relu(k, input, output) -> output`` for the k-th ReLU of a forward pass."""

    def __init__(self, on_relu: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.on_relu, self.count = on_relu, 0

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        k, self.count = self.count, self.count + 1
        return self.on_relu(k, args[0], out)


def trace_chain(ctx: Context, x: torch.Tensor, technique: str) -> Chain:
    """Run the model once on x, recording every layer; errors name what is not supported."""
    calls: list[Call] = []
    running_relu: list[str] = []  # the nn.ReLU module whose forward is running, if any
    leaves = {name: m for name, m in ctx.model.named_modules() if name and not any(True for _ in m.children())}

    def record_module(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(module, SUPPORTED):
                raise PyengineError(
                    f"{technique}: layer {name!r} is a {type(module).__name__}, which pathwise analysis "
                    "does not support; supported: Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, Flatten, "
                    "Dropout, Identity"
                )
            if not isinstance(module, nn.ReLU):
                calls.append(Call(name, module, args[0], output))

        return hook

    def before_relu(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            running_relu.append(name)

        return hook

    def on_relu(k: int, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        calls.append(Call(running_relu.pop() if running_relu else f"relu:{k}", None, source, out))
        return out

    # Pre-hooks name a functional ReLU call by the nn.ReLU module running it, which the
    # post-call order of ``ctx.trace`` cannot tell; the scope removes every hook.
    with ctx.hooks() as scope, torch.no_grad():
        for name, module in leaves.items():
            scope.forward(module, record_module(name))
            if isinstance(module, nn.ReLU):
                scope.forward_pre(module, before_relu(name))
        with _ReluCalls(on_relu):
            output = ctx.model(x)
    return _build_chain(calls, x, output, technique)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.data_ptr() == b.data_ptr()


def _build_chain(calls: list[Call], x: torch.Tensor, output: torch.Tensor, technique: str) -> Chain:
    previous = x
    for call in calls:
        if not _same_storage(call.input, previous):
            raise PyengineError(
                f"{technique}: layer {call.name!r} does not take the previous layer's output; pathwise "
                "analysis needs a plain chain of layers (no branches, residuals or other functional ops)"
            )
        previous = call.output
    if not calls or not _same_storage(previous, output):
        raise PyengineError(f"{technique}: the model's output is not its last layer's output; expected a plain chain")
    layers: list[str] = []
    activations: list[torch.Tensor] = []
    steps: list[Step] = []
    pending: list[Call] = []
    ends: list[Call | None] = [*calls, None]
    for end in ends:
        if end is not None and not end.is_relu:
            pending.append(end)
            continue
        where = f"before {end.name!r}" if end is not None else "after the last ReLU"
        steps.append(_step(pending, where, first=not steps, technique=technique))
        pending = []
        if end is not None:
            layers.append(end.name)
            activations.append(end.output.detach())
    if not layers:
        raise PyengineError(f"{technique}: the model has no ReLU layer")
    return Chain(layers, activations, steps, output.detach())


def _step(calls: list[Call], where: str, *, first: bool, technique: str) -> Step:
    """The layers between two ReLUs: [pool] [flatten/dropout/identity] Linear|Conv2d [flatten/dropout/identity]."""
    kinds = [c for c in calls if not isinstance(c.module, PASS_THROUGH)]
    linear = [c for c in kinds if isinstance(c.module, LINEAR)]
    pools = [c for c in kinds if isinstance(c.module, POOLS)]
    shape_ok = (
        len(linear) == 1
        and kinds[-1] is linear[0]
        and (first or len(pools) <= 1)
        and (not pools or kinds[0] is pools[0])
    )
    if not shape_ok or (first and pools):
        found = " -> ".join(type(c.module).__name__ for c in calls) or "nothing"
        raise PyengineError(
            f"{technique}: {where}: expected [MaxPool2d|AvgPool2d] then one Linear|Conv2d between ReLU "
            f"layers (a ReLU directly after the input's Linear|Conv2d), found {found}"
        )
    module = linear[0].module
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise PyengineError(f"{technique}: {where}: {linear[0].name!r} is not a Linear or Conv2d layer")
    if isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        raise PyengineError(f"{technique}: conv layer {linear[0].name!r} must have groups=1 and numeric zero padding")
    pool = pools[0].module if pools else None
    if pool is not None and not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        raise PyengineError(f"{technique}: {where}: {pools[0].name!r} is not a MaxPool2d or AvgPool2d layer")
    if pool is not None and (pool.ceil_mode or getattr(pool, "divisor_override", None) is not None):
        raise PyengineError(
            f"{technique}: pooling layer {pools[0].name!r}: ceil_mode and divisor_override are not supported"
        )
    return Step(pool, module, linear[0].name)


class MaskedForward(TorchFunctionMode):
    """While active, the k-th ReLU's output gets a backward hook multiplying its gradient by
    ``masks[k]`` (where given), and ``outputs[k]`` holds that output."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.masks, self.count = masks, 0
        self.outputs: dict[int, torch.Tensor] = {}

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _RELUS:
            k, self.count = self.count, self.count + 1
            self.outputs[k] = out
            if k in self.masks and out.requires_grad:
                mask = self.masks[k]
                out.register_hook(lambda grad, mask=mask: grad * mask)
        return out
