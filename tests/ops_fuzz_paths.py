"""hierarchical_paths arguments for tests/ops_fuzz.py: a valid one- or two-layer network
(pooling none / max / avg, dense or conv), then mutated: geometry values, max-pool indices and
targets replaced by extreme or off-by-one ints, tensors of any dtype, layout or device."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

INT64_MAX = 2**63 - 1
EXTREME = [-1, 0, 2**31, 2**32, 2**62, INT64_MAX, -(2**63)]
FLOATS = [torch.float64, torch.float64, torch.float32, torch.float16]
Draw = Callable[..., object]


def integer(draw: Draw, low: int, high: int) -> int:
    return int(draw(st.integers(low, high)))


def pooling(draw: Draw, c: int, h: int, w: int) -> tuple[list[int], tuple[int, int, int]]:
    kind = integer(draw, 0, 2)
    if kind == 0:
        return [0, 1, 1, 1, 1, 0, 0, 1], (c, h, w)
    kernel = [integer(draw, 1, min(2, h)), integer(draw, 1, min(2, w))]
    stride = [integer(draw, 1, 2), integer(draw, 1, 2)]
    padding = [integer(draw, 0, kernel[0] // 2), integer(draw, 0, kernel[1] // 2)]
    mid = (c, (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1)
    return [kind, *kernel, *stride, *padding, integer(draw, 0, 1)], mid


def mapping(draw: Draw, mid: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """The map's geometry (out shape, kernel, stride, padding, dilation) and weight shape."""
    channels = integer(draw, 1, 3)
    size = mid[0] * mid[1] * mid[2]
    if draw(st.booleans()):
        return [0, channels, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1], [channels, size]
    kernel, stride, padding, dilation, out = [], [], [], [], []
    for extent in mid[1:]:
        k, d, p, s = integer(draw, 1, 3), integer(draw, 1, 2), integer(draw, 0, 1), integer(draw, 1, 2)
        if d * (k - 1) + 1 > extent + 2 * p:
            k, d = 1, 1
        for values, value in ((kernel, k), (stride, s), (padding, p), (dilation, d)):
            values.append(value)
        out.append((extent + 2 * p - d * (k - 1) - 1) // s + 1)
    return [1, channels, *out, *kernel, *stride, *padding, *dilation], [channels, mid[0], *kernel]


def paths_arguments(draw: Draw, tensor: Callable[..., torch.Tensor], some_int: Callable[..., int]) -> tuple:
    batch, layers = integer(draw, 0, 3), integer(draw, 1, 2)
    shape = (integer(draw, 1, 2), integer(draw, 1, 4), integer(draw, 1, 4))
    activations, weights, indices, geometry, planes = [], [], [], [], []
    for _ in range(layers):
        pool, mid = pooling(draw, *shape)
        conv, weight_shape = mapping(draw, mid)
        a = tensor(draw, [batch, *shape], FLOATS + [torch.int64]).relu() if draw(st.booleans()) else None
        if a is None:
            a = torch.randn(batch, *shape, dtype=torch.float64).relu()
        index = torch.empty(0, dtype=torch.long)
        if pool[0] == 1 and a.device.type == "cpu" and a.is_floating_point():
            index = F.max_pool2d(a.double(), pool[1:3], pool[3:5], pool[5:7], return_indices=True)[1]
        activations.append(a)
        weights.append(tensor(draw, weight_shape, FLOATS))
        indices.append(index)
        planes.append(shape[1] * shape[2])
        geometry += [*shape, *pool[:7], pool[7], *mid, *conv]
        shape = (conv[1], conv[2], conv[3])
    outputs = shape[0] * shape[1] * shape[2]
    for _ in range(integer(draw, 0, 3)):  # mutated geometry values
        geometry[integer(draw, 0, len(geometry) - 1)] = int(draw(st.sampled_from(EXTREME + [1, 2, 3])))
    for index, plane in zip(indices, planes):  # off by one (the next channel), or far out
        if index.numel() and draw(st.booleans()):
            value = int(draw(st.sampled_from([-1, plane - 1, plane, plane + 1, 2**62, INT64_MAX])))
            index.view(-1)[integer(draw, 0, index.numel() - 1)] = value
    targets = torch.randint(0, outputs, (batch, integer(draw, 0, 3)))
    if targets.numel() and draw(st.booleans()):
        targets.view(-1)[0] = int(draw(st.sampled_from(EXTREME + [outputs])))
    return activations, weights, indices, geometry, targets, some_int(draw, 1, 4)
