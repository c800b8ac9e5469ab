"""llc: estimates within 15% of the known learning coefficient, reproducible, weights restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset

# Stated hyperparameters: full batch, nβ = 20, ε = 2e-3, γ = 1, 8 chains x 2000 draws.
SETTINGS = dict(nbeta=20.0, epsilon=2e-3, gamma=1.0, chains=8, draws=2000, burn_in=200, batch_size=1000, progress=False)


class QuarticPlusQuadratic(nn.Module):
    """f(x; w) = w0² x0 + w1 x1 with true w = 0: K(w) = w0⁴ + w1², so λ = 1/4 + 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w[0] ** 2 * x[:, 0] + self.w[1] * x[:, 1]).unsqueeze(1)


def regression(seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """A regular model (linear regression, 6 parameters) at its minimum: λ = d / 2 = 3."""
    torch.manual_seed(seed)
    model = nn.Linear(5, 1)
    x = torch.randn(1000, 5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).squeeze(1)
    return model, TensorDataset(x, y)


def test_regular_model_gives_half_the_parameter_count() -> None:
    model, data = regression()
    result = pyengine.run("llc", model, data=data, **SETTINGS)
    assert result.llc == pytest.approx(3.0, rel=0.15)
    assert result.traces.shape == (8, 2000) and torch.isfinite(result.traces).all()


def test_degenerate_model_gives_its_known_coefficient() -> None:
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    result = pyengine.run("llc", QuarticPlusQuadratic(), data=TensorDataset(x, torch.zeros(1000)), **SETTINGS)
    assert result.llc == pytest.approx(0.75, rel=0.15)


def test_behavioral_loss_matches_on_a_noiseless_regression() -> None:
    model, data = regression(2)
    result = pyengine.run("llc", model, data=data, loss="behavioral", **SETTINGS)
    assert result.llc == pytest.approx(3.0, rel=0.15)


def test_seeded_runs_are_reproducible_and_weights_are_restored() -> None:
    model, data = regression(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = dict(SETTINGS, chains=2, draws=50, burn_in=10)
    first = pyengine.run("llc", model, data=data, seed=5, **small)
    second = pyengine.run("llc", model, data=data, seed=5, **small)
    third = pyengine.run("llc", model, data=data, seed=6, **small)
    assert torch.equal(first.traces, second.traces) and not torch.equal(first.traces, third.traces)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_divergence_is_reported(small_cnn: nn.Module, small_shapes: object) -> None:
    result = pyengine.run(
        "llc", small_cnn, data=small_shapes, epsilon=10.0, chains=1, draws=30, burn_in=0, progress=False
    )
    assert "diverged" in result.warning
    classifier = pyengine.run("llc", small_cnn, data=small_shapes, chains=2, draws=20, burn_in=5, progress=False)
    assert torch.isfinite(classifier.llc_per_chain).all() and classifier.nbeta == pytest.approx(
        64 / torch.log(torch.tensor(64.0)).item()
    )


def test_llc_options_are_checked() -> None:
    model, data = regression()
    with pytest.raises(
        pyengine.OptionsError, match="option loss='kl' is invalid: expected 'train', 'next-token' or 'behavioral'"
    ):
        pyengine.run("llc", model, data=data, loss="kl")
    with pytest.raises(pyengine.OptionsError, match="option epsilon=0 is invalid: expected a positive number"):
        pyengine.run("llc", model, data=data, epsilon=0)
