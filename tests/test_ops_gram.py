"""gram_accumulate / gram_eigh: parity with numpy float64, edge cases, errors, opcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from pyengine import ops

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def numpy_reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = x.detach().cpu().double().numpy()  # exact widening of every input dtype
    return values.T @ values, values.sum(axis=0)


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    scale = max(np.abs(expected).max(), 1e-300)
    return float(np.abs(actual.cpu().numpy() - expected).max() / scale)


def fresh(d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(d, d, dtype=torch.float64, device=device), torch.zeros(d, dtype=torch.float64, device=device))


def assert_streamed_gram_matches_numpy(x: torch.Tensor, split: list[int] | None = None) -> None:
    """Accumulate x (optionally in chunks of the given sizes) and compare with numpy float64."""
    gram, sums = fresh(x.shape[1], str(x.device))
    for chunk in torch.split(x, split) if split else [x]:
        ops.gram_accumulate(gram, chunk, sums)
    expected_gram, expected_sums = numpy_reference(x)
    assert relative_error(gram, expected_gram) <= 1e-10
    assert relative_error(sums, expected_sums) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1000, 77), (513, 130), (5, 3), (300, 1), (64, 64)])
def test_float64_parity_with_numpy(device: str, shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_streamed_gram_matches_numpy(x.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_accumulates_in_float64(device: str, dtype: torch.dtype) -> None:
    x = torch.randn(700, 45, generator=torch.Generator().manual_seed(2)) * 3
    assert_streamed_gram_matches_numpy(x.to(dtype).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_add_up_to_the_whole(device: str) -> None:
    x = torch.randn(1001, 70, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    assert_streamed_gram_matches_numpy(x.to(device), split=[1, 0, 333, 500, 167])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device: str) -> None:
    base = torch.randn(400, 90, dtype=torch.float32, generator=torch.Generator().manual_seed(4)).to(device)
    for x in (base[:, ::3], base.T[:, :200], base[::2, 10:50]):
        assert not x.is_contiguous()
        assert_streamed_gram_matches_numpy(x)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_chunk_changes_nothing(device: str) -> None:
    gram = torch.randn(6, 6, dtype=torch.float64).to(device)
    sums = torch.randn(6, dtype=torch.float64).to(device)
    before = gram.clone(), sums.clone()
    ops.gram_accumulate(gram, torch.zeros(0, 6, device=device), sums)
    assert torch.equal(gram, before[0]) and torch.equal(sums, before[1])


def test_accumulates_onto_existing_values() -> None:
    x = torch.randn(50, 9, dtype=torch.float64)
    start = torch.randn(9, 9, dtype=torch.float64)
    gram = start.clone()
    ops.gram_accumulate(gram, x)
    np.testing.assert_allclose(gram.numpy(), start.numpy() + x.numpy().T @ x.numpy(), rtol=1e-12, atol=1e-12)


def test_cpu_result_is_exactly_symmetric_and_thread_independent() -> None:
    x = torch.randn(3000, 200, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            gram, _ = fresh(200, "cpu")
            ops.gram_accumulate(gram, x)
            results.append(gram)
    finally:
        torch.set_num_threads(threads)
    for gram in results:
        assert torch.equal(gram, gram.T)
        torch.testing.assert_close(gram, results[0], rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize(
    ("gram", "x", "sums", "message"),
    [
        (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4), None, "x must be 2-D"),
        (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.int32), None, "x has dtype Int"),
        (torch.zeros(4, 4, dtype=torch.float32), torch.zeros(3, 4), None, "gram has dtype Float; expected Double"),
        (torch.zeros(5, 5, dtype=torch.float64), torch.zeros(3, 4), None, "expected gram of shape (4, 4)"),
        (torch.zeros(8, 8, dtype=torch.float64)[::2, ::2], torch.zeros(3, 4), None, "gram must be contiguous"),
        (
            torch.zeros(4, 4, dtype=torch.float64),
            torch.zeros(3, 4),
            torch.zeros(5, dtype=torch.float64),
            "expected (4,)",
        ),
        (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 4), torch.zeros(4), "sums has dtype Float"),
    ],
)
def test_bad_arguments_raise_clear_errors(
    gram: torch.Tensor, x: torch.Tensor, sums: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(RuntimeError, match=r"pyengine\.gram_accumulate: .*") as info:
        ops.gram_accumulate(gram, x, sums)
    assert message in str(info.value).splitlines()[0]


@requires_cuda
def test_device_mismatch_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        ops.gram_accumulate(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x = torch.randn(20, 6, device=device)
    gram, sums = fresh(6, device)
    torch.library.opcheck(torch.ops.pyengine.gram_accumulate.default, (gram, x, sums))
    torch.library.opcheck(torch.ops.pyengine.gram_accumulate.default, (gram.clone(), x.double(), None))
    spd = (x.T @ x).double() + torch.eye(6, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.pyengine.gram_eigh.default, (spd,), {"n": 20, "center_sums": sums + 1})


@pytest.mark.parametrize("device", DEVICES)
def test_eigh_matches_numpy_descending(device: str) -> None:
    x = torch.randn(500, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = x * torch.linspace(0.5, 6.0, 12, dtype=torch.float64)  # well-separated spectrum
    gram, sums = fresh(12, device)
    ops.gram_accumulate(gram, x.to(device), sums)
    values, vectors = ops.gram_eigh(gram)
    expected_values, expected_vectors = np.linalg.eigh(x.numpy().T @ x.numpy())
    expected_values, expected_vectors = expected_values[::-1], expected_vectors[:, ::-1]
    np.testing.assert_allclose(values.cpu().numpy(), expected_values, rtol=1e-10)
    overlap = np.abs(np.sum(vectors.cpu().numpy() * expected_vectors, axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)  # equal up to sign

    covariance = np.cov(x.numpy(), rowvar=False, bias=True)
    centred, _ = ops.gram_eigh(gram, n=500, center_sums=sums)
    np.testing.assert_allclose(centred.cpu().numpy(), np.linalg.eigvalsh(covariance)[::-1], rtol=1e-10)
    second_moment, _ = ops.gram_eigh(gram, n=500)
    np.testing.assert_allclose(second_moment.cpu().numpy(), expected_values / 500, rtol=1e-10)


def test_eigh_argument_errors() -> None:
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="centering needs n"):
        ops.gram_eigh(gram, center_sums=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="n must be the positive number of rows"):
        ops.gram_eigh(gram, n=0)
    with pytest.raises(RuntimeError, match="gram must be square"):
        ops.gram_eigh(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"center_sums has shape \(4,\)"):
        ops.gram_eigh(gram, n=3, center_sums=torch.zeros(4, dtype=torch.float64))


def test_build_info() -> None:
    info = ops.build_info()
    assert info["cxx_standard"] >= 202002
    assert int(str(info["pybind11"]).split(".")[0]) >= 3
    assert info["cuda"] == ops.HAS_CUDA
