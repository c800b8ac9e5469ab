"""topk_update: streaming top-k equals brute force over everything in memory, ties included."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from pyengine import ops

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def brute_force(values: torch.Tensor, payload: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Per column: sort by value descending, ties by row (= id) ascending; pad with -inf / -1."""
    n, columns = values.shape
    top_values = torch.full((columns, k), float("-inf"), dtype=torch.float64)
    top_ids = torch.full((columns, k), -1, dtype=torch.long)
    top_payload = torch.zeros((columns, k), dtype=torch.long)
    for c in range(columns):
        column = values[:, c].double()
        keep = ~column.isnan()
        rows = torch.arange(n)[keep]
        order = torch.sort(column[keep], descending=True, stable=True).indices[:k]
        m = order.numel()
        top_values[c, :m], top_ids[c, :m], top_payload[c, :m] = (
            column[keep][order],
            rows[order],
            payload[rows[order], c],
        )
    return top_values, top_ids, top_payload


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 25, 100, 33])  # 25, 100 divide N = 100; 7, 33 leave a short chunk
def test_streaming_equals_brute_force_with_ties(device: str, dtype: torch.dtype, chunk: int) -> None:
    generator = torch.Generator().manual_seed(chunk)
    n, columns, k = 100, 6, 9
    values = torch.randint(0, 12, (n, columns), generator=generator).to(dtype)  # many exact ties
    values[5, 0] = float("nan")
    values[:, 5] = 3.0  # one column is all ties
    payload = torch.randint(0, 1000, (n, columns), generator=generator)
    top = ops.topk_empty(columns, k, device)
    for first in range(0, n, chunk):
        rows = slice(first, first + chunk)
        ops.topk_update(values[rows].to(device), torch.arange(n)[rows].to(device), payload[rows].to(device), *top)
    for got, expected in zip(top, brute_force(values, payload, k)):
        assert torch.equal(got.cpu(), expected)


def test_k_larger_than_the_rows_seen_and_strided_values() -> None:
    values = torch.randn(3, 8).t()  # (8, 3), strided
    top = ops.topk_empty(3, 10)
    ops.topk_update(values, torch.arange(100, 108), None, *top)
    assert torch.equal(top[1][:, 8:], torch.full((3, 2), -1)) and bool(top[0][:, 8:].isinf().all())
    expected = values.t().double().sort(dim=1, descending=True).values
    torch.testing.assert_close(top[0][:, :8], expected)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda t: ops.topk_update(torch.zeros(4, 3), torch.arange(5), None, *t), "one id per row"),
        (lambda t: ops.topk_update(torch.zeros(4, 2), torch.arange(4), None, *t), r"must all be \(2, k\)"),
        (lambda t: ops.topk_update(torch.zeros(4, 3), torch.arange(4).int(), None, *t), "ids has dtype"),
        (
            lambda t: ops.topk_update(torch.zeros(4, 3), torch.arange(4), torch.zeros(4, 2).long(), *t),
            "payload has shape",
        ),
    ],
)
def test_bad_arguments_name_the_problem(call, fragment: str) -> None:
    with pytest.raises(RuntimeError, match=fragment):
        call(ops.topk_empty(3, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    top = ops.topk_empty(3, 4, device)
    torch.library.opcheck(
        torch.ops.pyengine.topk_update.default,
        (
            torch.randn(10, 3, device=device),
            torch.arange(10, device=device),
            torch.zeros(10, 3, dtype=torch.long, device=device),
            *top,
        ),
    )
