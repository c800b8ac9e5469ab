"""gram-spectrum: planted linear dependence gives exactly the true rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset
from pyengine.errors import PyengineError


class Planted(nn.Module):
    """Units a, 2a, b, a+b, c, c-b: six units spanning three directions."""

    def __init__(self) -> None:
        super().__init__()
        basis = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
        a, b, c = basis
        self.layer = nn.Linear(5, 6, bias=False)
        self.layer.weight.data = torch.stack([a, 2 * a, b, a + b, c, c - b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_planted_rank_is_recovered_exactly(tmp_path: Path) -> None:
    model = Planted()
    x = torch.randn(500, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    result = pyengine.run(
        "gram-spectrum", model, data=TensorDataset(x), layers=["layer"], center=False, cutoffs=[1e-6], progress=False
    )
    assert result.rank["layer rel<1e-06"] == 3
    assert result.units == {"layer": 6} and result.samples == {"layer": 500}
    assert "layer layer: 6 units, rank 3 at 1e-06" in result.summary()
    h = model(x).detach().double().numpy()
    expected = np.linalg.eigvalsh(h.T @ h / 500)[::-1]
    np.testing.assert_allclose(result.eigenvalues["layer"].numpy()[:3], expected[:3], rtol=1e-9)

    store = pyengine.capture(model, TensorDataset(x), ["layer"], tmp_path / "a.h5", dtype="float32", progress=False)
    from_store = pyengine.run("gram-spectrum", model, store=store, center=False, cutoffs=[1e-6], progress=False)
    torch.testing.assert_close(from_store.eigenvalues["layer"], result.eigenvalues["layer"], rtol=1e-9, atol=1e-12)


def test_centered_spectrum_is_the_covariance_spectrum() -> None:
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU())
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(2))
    result = pyengine.run("gram-spectrum", model, x, progress=False)
    h = model(x).detach().double().numpy()
    expected = np.linalg.eigvalsh(np.cov(h, rowvar=False, bias=True))[::-1]
    np.testing.assert_allclose(result.eigenvalues["1"].numpy(), expected, rtol=1e-8, atol=1e-12)
    variance_rank = result.rank["1 var0.9"]
    cumulative = np.cumsum(np.clip(expected, 0, None)) / np.clip(expected, 0, None).sum()
    assert variance_rank == int(np.searchsorted(cumulative, 0.9 - 1e-12) + 1)


def test_conv_layers_use_channels_as_units(small_cnn: nn.Module, small_shapes: object) -> None:
    result = pyengine.run("gram-spectrum", small_cnn, data=small_shapes, layers=["features.relu2"], progress=False)
    assert result.units == {"features.relu2": 8}
    assert result.samples == {"features.relu2": 96 * 8 * 8}
    flat = pyengine.run(
        "gram-spectrum", small_cnn, data=small_shapes, layers=["features.relu3"], units="flatten", progress=False
    )
    assert flat.units == {"features.relu3": 16 * 4 * 4}  # relu3 precedes pool3


def test_option_errors() -> None:
    with pytest.raises(pyengine.OptionsError, match="option units='pixels' is invalid"):
        pyengine.run("gram-spectrum", nn.ReLU(), torch.ones(2, 2), units="pixels")
    with pytest.raises(PyengineError, match="needs data"):
        pyengine.run("gram-spectrum", nn.ReLU())
