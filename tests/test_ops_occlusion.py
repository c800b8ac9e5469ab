"""occlusion_batch / occlusion_accumulate: parity with a pure-torch reference, errors, opcheck."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import requires_cuda
from pyengine import ops

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
# (input shape without batch, window, stride): exact tilings, cut-off edges, 1-D, 4-D
GEOMETRIES = [
    ((3, 8, 8), (3, 2, 2), (3, 2, 2)),
    ((3, 9, 7), (1, 4, 3), (1, 3, 2)),
    ((2, 5, 6), (2, 5, 6), (1, 1, 1)),
    ((11,), (4,), (3,)),
    ((2, 3, 4, 5), (1, 2, 3, 2), (1, 1, 2, 2)),
]


def window_masks(shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]) -> list[torch.Tensor]:
    """Every window's boolean mask, row-major over the grid, written plainly."""
    counts = [math.ceil((s - w) / st) + 1 for s, w, st in zip(shape, window, stride)]
    masks = []
    for k in itertools.product(*(range(c) for c in counts)):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[tuple(slice(i * st, i * st + w) for i, st, w in zip(k, stride, window))] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, window, stride", GEOMETRIES)
def test_batch_matches_reference(
    device: str, dtype: torch.dtype, shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(3, *shape).to(device, dtype)
    masks = window_masks(shape, window, stride)
    for baseline in (torch.randn(shape), torch.randn(3, *shape)):
        baseline = baseline.to(device, dtype)
        expected = torch.stack([torch.where(mask.to(device), baseline, inputs) for mask in masks])
        first, count = 1, len(masks) - 2 if len(masks) > 2 else len(masks) - 1
        out = ops.occlusion_batch(inputs, baseline, window, stride, first, count)
        assert out.shape == (count * 3, *shape) and out.dtype == dtype
        assert torch.equal(out.view(count, 3, *shape), expected[first : first + count])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, window, stride", GEOMETRIES)
def test_accumulate_matches_reference(
    device: str, shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    torch.manual_seed(1)
    masks = torch.stack(window_masks(shape, window, stride)).double()
    batch, targets = 2, 3
    drops = torch.randn(len(masks), batch, targets, dtype=torch.float64)
    expected = torch.einsum("pbt,p...->bt...", drops, masks)
    sums = torch.zeros(batch, targets, *shape, dtype=torch.float64, device=device)
    for first in range(0, len(masks), 3):  # chunks of three windows, the last one shorter
        ops.occlusion_accumulate(sums, drops[first : first + 3].float().to(device), window, stride, first)
    torch.testing.assert_close(sums.cpu(), expected, rtol=1e-6, atol=1e-6)  # drops went through float32


def test_non_contiguous_inputs_and_batch_of_one() -> None:
    inputs = torch.randn(4, 6, 2).transpose(1, 2)[:1]  # (1, 2, 6), strided
    baseline = torch.zeros(2, 6)
    out = ops.occlusion_batch(inputs, baseline, (2, 3), (2, 3), 0, 2)
    expected = inputs.clone().repeat(2, 1, 1)
    expected[0, :, :3] = 0
    expected[1, :, 3:] = 0
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (
            lambda: ops.occlusion_batch(torch.zeros(2, 3, 4), torch.zeros(3, 4), (5, 2), (1, 1), 0, 1),
            "must fit the input",
        ),
        (lambda: ops.occlusion_batch(torch.zeros(2, 3, 4), torch.zeros(3, 4), (2,), (1,), 0, 1), "one entry per input"),
        (
            lambda: ops.occlusion_batch(torch.zeros(2, 3, 8), torch.zeros(3, 8), (3, 2), (1, 3), 0, 1),
            "never be occluded",
        ),
        (lambda: ops.occlusion_batch(torch.zeros(2, 3, 4), torch.zeros(3, 4), (3, 2), (1, 2), 0, 5), "out of range"),
        (
            lambda: ops.occlusion_batch(torch.zeros(2, 3, 4), torch.zeros(2, 4), (3, 2), (1, 2), 0, 1),
            "baseline has shape",
        ),
        (
            lambda: ops.occlusion_batch(torch.zeros(2, 3, 4), torch.zeros(3, 4).double(), (3, 2), (1, 2), 0, 1),
            "baseline must be",
        ),
        (lambda: ops.occlusion_accumulate(torch.zeros(2, 1, 4), torch.zeros(1, 2, 1), (2,), (2,), 0), "dtype"),
        (
            lambda: ops.occlusion_accumulate(torch.zeros(2, 1, 4).double(), torch.zeros(1, 3, 1), (2,), (2,), 0),
            "drops has shape",
        ),
    ],
)
def test_bad_arguments_name_the_problem(call, fragment: str) -> None:
    with pytest.raises(RuntimeError, match=fragment):
        call()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    inputs = torch.randn(2, 3, 6, 5, device=device)
    baseline = torch.zeros(3, 6, 5, device=device)
    torch.library.opcheck(torch.ops.pyengine.occlusion_batch.default, (inputs, baseline, [3, 2, 2], [3, 2, 2], 1, 4))
    sums = torch.zeros(2, 1, 3, 6, 5, dtype=torch.float64, device=device)
    drops = torch.randn(4, 2, 1, device=device)
    torch.library.opcheck(torch.ops.pyengine.occlusion_accumulate.default, (sums, drops, [3, 2, 2], [3, 2, 2], 1))
