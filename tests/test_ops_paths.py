"""hierarchical_paths: opcheck (schema, fake, dispatch) on an MLP and on a CNN with max pooling."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from pyengine.plugins.pathwise._chain import trace_chain
from pyengine.plugins.pathwise.paths import op_arguments
from test_pathwise import cnn, context, mlp

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make, shape", [(mlp, (3, 5)), (cnn, (3, 2, 4, 4))])
def test_opcheck(device: str, make, shape: tuple[int, ...]) -> None:
    model = make()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    activations, weights, indices, geometry = op_arguments(trace_chain(context(model), x, "test"))
    targets = torch.tensor([[0, 1]]).repeat(shape[0], 1)
    torch.library.opcheck(
        torch.ops.pyengine.hierarchical_paths.default,
        (
            [a.to(device) for a in activations],
            [w.to(device) for w in weights],
            [i.to(device) for i in indices],
            geometry,
            targets.to(device),
            3,
        ),
    )
