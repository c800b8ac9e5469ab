"""interaction-basis: outputs invariant through the basis; planted degeneracy shrinks it exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset


def network(plant: bool) -> nn.Sequential:
    """4 -> 6 (ReLU, layer "1") -> 8 (ReLU, layer "3") -> 8. Planted: unit 4 of layer "1"
    copies unit 3 (activation degeneracy) and unit 5 never reaches the next layer
    (Jacobian degeneracy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)).double()
    if plant:
        with torch.no_grad():
            model[0].weight[4], model[0].bias[4] = model[0].weight[3], model[0].bias[3]
            model[2].weight[:, 5] = 0
    return model


@pytest.mark.parametrize("plant", [False, True])
def test_outputs_are_invariant_through_the_basis(plant: bool) -> None:
    x = torch.randn(400, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = pyengine.run("interaction-basis", network(plant), data=TensorDataset(x), progress=False)
    assert set(result.basis_size) == {"1", "3"}
    assert all(change <= 1e-6 for change in result.output_change.values()), result.output_change
    c, c_inverse = result.basis["1"], result.inverse["1"]
    torch.testing.assert_close(c @ c_inverse, torch.eye(c.shape[0], dtype=torch.float64), rtol=0, atol=1e-8)


def test_planted_degenerate_directions_shrink_the_basis_by_exactly_that_amount() -> None:
    x = torch.randn(400, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = pyengine.run("interaction-basis", network(False), data=TensorDataset(x), progress=False)
    planted = pyengine.run("interaction-basis", network(True), data=TensorDataset(x), progress=False)
    assert plain.width["1"] == planted.width["1"] == 6
    assert plain.basis_size["1"] == 6
    assert planted.basis_size["1"] == 4  # one copied unit, one that never reaches the next layer


def test_edges_and_their_sparsity() -> None:
    x = torch.randn(300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = pyengine.run("interaction-basis", network(False), data=TensorDataset(x), progress=False)
    edges = result.edges["1->3"]
    assert edges.shape == (result.basis_size["3"], result.basis_size["1"])
    assert bool((edges >= 0).all()) and float(edges.sum()) > 0
    assert 0 < result.top1_share["1->3"] <= result.top10_share["1->3"] <= 1
    assert "layer 1: basis 6 of 6 units" in result.summary()


def test_options_are_checked() -> None:
    with pytest.raises(pyengine.OptionsError, match="option cutoff=2 is invalid"):
        pyengine.run("interaction-basis", network(False), data=TensorDataset(torch.zeros(4, 4)), cutoff=2)
