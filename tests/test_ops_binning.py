"""binned_statistics: parity with a pure-torch float64 reference, edge cases, errors, opcheck."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from pyengine import ops

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def reference(
    h: torch.Tensor, labels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's contract, written plainly in float64 torch."""
    values = h.double().cpu()
    low, high = low.double().cpu(), high.double().cpu()
    scale = torch.where(high > low, bins / (high - low), torch.zeros_like(high))
    position = torch.floor((values - low) * scale)
    index = torch.where(position >= bins - 1, bins - 1, torch.where(position > 0, position, 0)).long()
    t, (n, d) = labels.shape[0], values.shape
    counts = torch.zeros(t, d, 2, bins, dtype=torch.float64)
    sums = torch.zeros(t, d, 2, bins, dtype=torch.float64)
    for target in range(t):
        label = (labels[target].cpu() != 0).long().unsqueeze(1).expand(n, d)
        column = torch.arange(d).expand(n, d)
        counts[target].index_put_((column, label, index), torch.ones(n, d, dtype=torch.float64), accumulate=True)
        sums[target].index_put_((column, label, index), values, accumulate=True)
    return counts, sums


def assert_matches_reference(
    h: torch.Tensor, labels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int
) -> None:
    counts, sums = ops.binned_statistics(h, labels, low, high, bins)
    expected_counts, expected_sums = reference(h, labels, low, high, bins)
    assert torch.equal(counts.cpu(), expected_counts)
    torch.testing.assert_close(sums.cpu(), expected_sums, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_parity_every_dtype(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(500, 37, generator=g).to(dtype).to(device)
    labels = (torch.rand(3, 500, generator=g) < 0.4).to(device)
    low, high = h.float().amin(0) + 0.3, h.float().amax(0) - 0.3  # some values fall outside: edge bins
    assert_matches_reference(h, labels, low, high, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_integer_labels_constant_columns(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.relu(torch.randn(90, 400, generator=g)).to(device)
    h = base.T[:, ::3]  # (400, 30), strided
    h[:, 4] = 2.5  # a constant column: everything in bin 0
    labels = torch.randint(0, 3, (2, 400), generator=g).to(device)  # nonzero counts as 1
    low, high = h.amin(0), h.amax(0)
    assert_matches_reference(h, labels, low, high, 8)
    counts, _ = ops.binned_statistics(h, labels, low, high, 8)
    assert float(counts[:, 4, :, 1:].sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device: str) -> None:
    h = torch.zeros(0, 5, device=device)
    counts, sums = ops.binned_statistics(
        h,
        torch.zeros(1, 0, dtype=torch.bool, device=device),
        torch.zeros(5, device=device),
        torch.ones(5, device=device),
        4,
    )
    assert counts.shape == (1, 5, 2, 4) and float(counts.abs().sum() + sums.abs().sum()) == 0


LABELS = torch.zeros(1, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(4), LABELS, torch.zeros(1), torch.ones(1), 4), "h must be 2-D"),
        ((torch.zeros(4, 2), LABELS[:, :3], torch.zeros(2), torch.ones(2), 4), "expected labels of shape (targets, 4)"),
        ((torch.zeros(4, 2), LABELS, torch.zeros(3), torch.ones(2), 4), "low and high must have shape (2,)"),
        ((torch.zeros(4, 2), LABELS, torch.zeros(2), torch.ones(2), 0), "bins must be a positive integer"),
        (
            (torch.zeros(4, 2), torch.zeros(1, 4, dtype=torch.float32), torch.zeros(2), torch.ones(2), 4),
            "labels has dtype Float",
        ),
    ],
)
def test_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(RuntimeError, match=r"pyengine\.binned_statistics: ") as info:
        ops.binned_statistics(*args)
    assert message in str(info.value).splitlines()[0]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    h = torch.randn(30, 4, device=device)
    labels = torch.rand(2, 30, device=device) < 0.5
    torch.library.opcheck(torch.ops.pyengine.binned_statistics.default, (h, labels, h.amin(0), h.amax(0), 5))
