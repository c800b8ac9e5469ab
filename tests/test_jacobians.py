"""jacobian-gram: exact E[JᵀJ] against torch.func per-sample Jacobians; planted degeneracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset


def reference_jacobian_gram(model: nn.Sequential, split: int, x: torch.Tensor) -> torch.Tensor:
    """E[JᵀJ] of model[split:] w.r.t. the output of model[:split], by torch.func."""
    head, tail = model[:split], model[split:]
    h = head(x).detach()
    jacobians = torch.func.vmap(torch.func.jacrev(lambda v: tail(v.unsqueeze(0)).squeeze(0)))(h)  # (n, out, d)
    return torch.einsum("nod,noe->de", jacobians.double(), jacobians.double()) / x.shape[0]


def test_exact_sources_match_per_sample_jacobians_for_several_layers_at_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(300, 5)
    result = pyengine.run(
        "jacobian-gram", model, data=TensorDataset(x), layers=["1", "3"], batch_size=64, progress=False
    )
    assert result.sources == "exact"
    torch.testing.assert_close(result.gram["1"], reference_jacobian_gram(model, 2, x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.gram["3"], reference_jacobian_gram(model, 4, x), rtol=1e-5, atol=1e-7)


def test_random_sources_are_unbiased() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 40))
    x = torch.randn(400, 4)
    result = pyengine.run(
        "jacobian-gram", model, data=TensorDataset(x), layers=["1"], random_sources=16, progress=False
    )
    assert result.sources == "random"  # 40 outputs > 16 sources: auto draws random ones
    exact = pyengine.run("jacobian-gram", model, data=TensorDataset(x), layers=["1"], sources="exact", progress=False)
    error = (result.gram["1"] - exact.gram["1"]).abs().max() / exact.gram["1"].abs().max()
    assert float(error) < 0.1  # 16 sources x 400 inputs


def test_planted_dead_direction_lowers_the_rank() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Identity(), nn.Linear(6, 4))
    with torch.no_grad():
        model[2].weight[:, 4:] = 0  # units 4 and 5 never reach the output
    result = pyengine.run(
        "jacobian-gram", model, data=TensorDataset(torch.randn(100, 5)), layers=["1"], cutoffs=[1e-9], progress=False
    )
    assert result.rank["1 rel<1e-09"] == 4
    assert float(result.gram["1"][4:, :].abs().max()) == 0.0


def test_target_layer_and_errors() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(50, 3)
    towards_relu = pyengine.run(
        "jacobian-gram", model, data=TensorDataset(x), layers=["0"], target_layer="1", progress=False
    )
    mask = (model[0](x) > 0).double()
    torch.testing.assert_close(towards_relu.gram["0"], torch.diag(mask.mean(0)), rtol=1e-6, atol=1e-9)
    with pytest.raises(pyengine.PyengineError, match="the target does not depend on layer '2'"):
        pyengine.run("jacobian-gram", model, data=TensorDataset(x), layers=["2"], target_layer="1", progress=False)
    with pytest.raises(pyengine.OptionsError, match="option sources='all' is invalid"):
        pyengine.run("jacobian-gram", model, data=TensorDataset(x), sources="all")
