"""relu-sync and its bitset ops: planted synchronized units, dense-reference parity, opcheck."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import pyengine
from conftest import requires_cuda
from pyengine import ops
from pyengine.data import TensorDataset

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def dense_disagreements(h: torch.Tensor, fires_above: float = 0.0) -> torch.Tensor:
    fires = (h > fires_above).double().cpu()
    return (fires.T @ (1 - fires) + (1 - fires).T @ fires).round().long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 63, 64, 65, 1000])
def test_bitset_counts_equal_the_dense_reference(device: str, dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 45, generator=g).to(dtype).to(device)
    bits = ops.pack_firing(h)
    assert bits.shape == (45, (rows + 63) // 64) and bits.dtype == torch.int64
    r = torch.arange(rows, device=device)
    unpacked = ((bits[:, r // 64] >> (r % 64)) & 1).T.bool()
    assert torch.equal(unpacked, h > 0)
    assert torch.equal(ops.firing_disagreements(bits).cpu(), dense_disagreements(h))
    assert torch.equal(ops.pack_firing(h, 0.5).cpu(), ops.pack_firing((h.double() > 0.5).double()).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_wide(device: str) -> None:
    h = torch.randn(300, 140, device=device).T  # (140, 300) strided: 300 units
    assert torch.equal(ops.firing_disagreements(ops.pack_firing(h)).cpu(), dense_disagreements(h))


def test_op_errors_and_opcheck() -> None:
    with pytest.raises(RuntimeError, match="pyengine.pack_firing: h must be 2-D"):
        ops.pack_firing(torch.zeros(3))
    with pytest.raises(RuntimeError, match="pyengine.firing_disagreements: bits has dtype Int; expected Long"):
        ops.firing_disagreements(torch.zeros(3, 2, dtype=torch.int32))
    h = torch.randn(70, 5)
    torch.library.opcheck(torch.ops.pyengine.pack_firing.default, (h, 0.1))
    torch.library.opcheck(torch.ops.pyengine.firing_disagreements.default, (ops.pack_firing(h),))


class Planted(nn.Module):
    """Units 0~1 (1 = 2 x unit 0), 2~3 (copies), 4~5 (0.5 x), 6 dead, 7 always on, 8-9 free."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(10, 6, generator=g), torch.randn(10, generator=g)
        w[1], b[1] = 2 * w[0], 2 * b[0]
        w[3], b[3] = w[2], b[2]
        w[5], b[5] = 0.5 * w[4], 0.5 * b[4]
        w[6], b[6] = 0, -1.0
        w[7], b[7] = 0, 1.0
        self.fc = nn.Linear(6, 10)
        self.fc.weight.data, self.fc.bias.data = w, b
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


def test_planted_groups_are_found_exactly(tmp_path: Path) -> None:
    model = Planted()
    x = torch.randn(777, 6, generator=torch.Generator().manual_seed(1))
    result = pyengine.run("relu-sync", model, data=TensorDataset(x), progress=False)
    group = result.group["relu"]
    members = sorted(sorted(torch.nonzero(group == g).flatten().tolist()) for g in range(result.groups["relu"]))
    assert members == [[0, 1], [2, 3], [4, 5]]
    assert result.dead["relu"] == 1 and result.always_on["relu"] == 1 and result.samples["relu"] == 777
    fires = (model(x) > 0).double()
    torch.testing.assert_close(result.firing_rate["relu"].double(), fires.mean(0), atol=1e-6, rtol=0)
    expected = 1 - dense_disagreements(model(x).detach()).double() / 777
    torch.testing.assert_close(result.agreement["relu"].double(), expected, atol=1e-6, rtol=0)
    assert "layer relu: 10 units, 3 synchronized groups (sizes 2, 2, 2), 1 dead, 1 always on" in result.summary()

    store = pyengine.capture(model, TensorDataset(x), ["relu"], tmp_path / "a.h5", batch_size=50, progress=False)
    from_store = pyengine.run("relu-sync", model, store=store, batch_size=33, progress=False)
    assert torch.equal(from_store.group["relu"], group)


def test_threshold_links_nearly_synchronized_units() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1000, 4, generator=g)
    h[:, 1] = h[:, 0]
    h[:10, 1] = -h[:10, 0]  # disagrees on 10 of 1000 inputs
    data = TensorDataset(h)
    identity = nn.Sequential(nn.Identity())
    exact = pyengine.run("relu-sync", identity, data=data, layers=["0"], progress=False)
    loose = pyengine.run("relu-sync", identity, data=data, layers=["0"], agreement=0.99, progress=False)
    assert exact.groups["0"] == 0 and loose.groups["0"] == 1
    assert sorted(torch.nonzero(loose.group["0"] == 0).flatten().tolist()) == [0, 1]


def test_conv_channels_are_units(small_cnn: nn.Module, small_shapes: object) -> None:
    result = pyengine.run("relu-sync", small_cnn, data=small_shapes, layers=["features.relu2"], progress=False)
    assert result.agreement["features.relu2"].shape == (8, 8)
    assert result.samples["features.relu2"] == 96 * 8 * 8
