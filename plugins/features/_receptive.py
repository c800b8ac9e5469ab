"""Receptive fields of conv units, computed from the layers a forward pass runs.

Exact for any chain of Conv2d / MaxPool2d / AvgPool2d (padding, stride, dilation) with
elementwise layers (ReLU, BatchNorm2d, Dropout, ...) in between: along each spatial axis the
unit at position i of the layer sees input pixels [start + i * jump, start + i * jump + size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pyengine.context import Context
from pyengine.errors import PyengineError

ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ReceptiveField:
    """Per spatial axis (height, width): field size, jump between adjacent units, and the input
    coordinate where unit 0's field starts (negative when it begins in the padding)."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Unit (y, x)'s field clipped to a height x width input: y0, y1, x0, x1 (end exclusive)."""
        y0, x0 = self.start[0] + y * self.jump[0], self.start[1] + x * self.jump[1]
        return max(y0, 0), min(y0 + self.size[0], height), max(x0, 0), min(x0 + self.size[1], width)

    def through(self, module: nn.Module) -> ReceptiveField:
        """The field after one more Conv2d or pooling layer."""
        kernel, stride, padding = (_pair(getattr(module, k)) for k in ("kernel_size", "stride", "padding"))
        dilation = _pair(getattr(module, "dilation", 1))
        size = [s + (k - 1) * d * j for s, k, d, j in zip(self.size, kernel, dilation, self.jump)]
        jump = [j * s for j, s in zip(self.jump, stride)]
        start = [st - p * j for st, p, j in zip(self.start, padding, self.jump)]
        return ReceptiveField((size[0], size[1]), (jump[0], jump[1]), (start[0], start[1]))


def receptive_field(
    ctx: Context, layer: str, example: torch.Tensor, technique: str = "receptive field"
) -> ReceptiveField:
    """The receptive field of the units of ``layer`` (its output), for inputs like ``example``."""
    target = ctx.module(layer)
    with ctx.trace(until=target) as traced, torch.no_grad():
        ctx.model(example[:1])
    order = [(call.name, call.module) for call in traced.calls]
    if not order or order[-1][1] is not target:
        raise PyengineError(f"{technique}: layer {layer!r} did not run in the forward pass")
    field = ReceptiveField((1, 1), (1, 1), (0, 0))
    for name, module in order:
        if module is target and any(True for _ in module.children()):
            continue  # a container: its leaves were recorded before it
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            if getattr(module, "ceil_mode", False) or isinstance(getattr(module, "padding", 0), str):
                raise PyengineError(f"{technique}: {name!r} uses ceil_mode or string padding; not supported")
            field = field.through(module)
        elif not isinstance(module, ELEMENTWISE):
            raise PyengineError(
                f"{technique}: units of {layer!r} see the whole input through {name!r} "
                f"({type(module).__name__}); receptive fields need Conv2d/pooling layers only"
            )
    return field
