"""Pathwise explanation: exact path sums, autograd references, the native decomposition op."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from conftest import hooks_on, requires_cuda
from pathwise_reference import reference_paths
from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.pathwise._chain import trace_chain
from pyengine.plugins.pathwise.paths import local_decomposition, op_arguments, path_model


def mlp(seed: int = 0, widths: tuple[int, ...] = (5, 4, 3, 2)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if k < len(widths) - 2 else [])
    return nn.Sequential(*layers).double().eval()


def cnn(seed: int = 0, pool: type[nn.Module] = nn.MaxPool2d) -> nn.Sequential:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(2, 2, 3, padding=1)),
                    ("relu1", nn.ReLU()),
                    ("pool1", pool(2)),
                    ("conv2", nn.Conv2d(2, 2, 3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(8, 3)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(3, 2)),
                ]
            )
        )
        .double()
        .eval()
    )


def context(model: nn.Module) -> Context:
    return Context(model=model, device=torch.device("cpu"))


def all_paths(sizes: list[int], start: int, batch: int) -> list[dict[int, torch.Tensor]]:
    """Every path with one unit at each layer from ``start`` to the top."""
    layers = range(start, len(sizes))
    return [
        {layer: torch.full((batch, 1), unit) for layer, unit in zip(layers, units)}
        for units in itertools.product(*(range(sizes[layer]) for layer in layers))
    ]


@pytest.mark.parametrize(
    "make, shape", [(mlp, (3, 5)), (cnn, (2, 2, 4, 4)), (lambda: cnn(1, nn.AvgPool2d), (2, 2, 4, 4))]
)
def test_paths_sum_exactly_to_the_local_linear_model(make, shape) -> None:
    model = make()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 1, 0][: shape[0]])
    chain = trace_chain(context(model), x, "test")
    whole, output = local_decomposition(context(model), chain, x, targets)
    torch.testing.assert_close((whole.weight * x).flatten(1).sum(1) + whole.bias, output, rtol=0, atol=1e-12)
    torch.testing.assert_close(output, model(x).gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-12)
    sizes = [a[0].numel() for a in chain.activations]
    weight_sum = sum(path_model(model, chain, x, targets, p)[0].weight for p in all_paths(sizes, 0, len(x)))
    torch.testing.assert_close(weight_sum, whole.weight, rtol=0, atol=1e-9)
    bias_sum = model[-1].bias.detach()[targets].clone()  # the output layer's own bias
    for start in range(len(sizes)):
        for path in all_paths(sizes, start, len(x)):
            bias_sum = bias_sum + path_model(model, chain, x, targets, path)[0].own_bias
    torch.testing.assert_close(bias_sum, whole.bias, rtol=0, atol=1e-9)


def test_single_units_and_chains_match_autograd() -> None:
    model = mlp(2, (5, 6, 4, 3))
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fc1, fc2, fc3 = model[0], model[2], model[4]
    h1 = fc1(x)
    active1 = (h1 > 0).double()
    h2 = fc2(torch.relu(h1))
    active2 = (h2 > 0).double()
    for b in range(2):
        target = 1
        # single unit u of layer 2: W = ∂f/∂h2[u] · ∂h2[u]/∂x, b = ∂f/∂h2[u] · (h2[u] − ∂h2[u]/∂x · x)
        df_dh2 = torch.autograd.functional.jacobian(lambda h, target=target: fc3(torch.relu(h))[target], h2[b])
        dh2_dx = torch.autograd.functional.jacobian(lambda v: fc2(torch.relu(fc1(v))), x[b])
        for u in range(4):
            res = pyengine.run("path-linear", model, x[b : b + 1], target=target, progress=False, paths=[{"3": u}])
            expected_w = df_dh2[u] * dh2_dx[u]
            torch.testing.assert_close(res.path_weight[0, 0], expected_w, rtol=1e-6, atol=1e-9)
            expected_b = df_dh2[u] * (h2[b, u] - dh2_dx[u] @ x[b])
            torch.testing.assert_close(res.path_bias[0, 0], expected_b.detach(), rtol=1e-6, atol=1e-9)
        # chain (v at layer 1, u at layer 2): ∂f/∂h2[u] φ(h2[u]) W2[u, v] φ(h1[v]) W1[v]
        for u, v in itertools.product(range(4), range(6)):
            res = pyengine.run(
                "path-linear", model, x[b : b + 1], target=target, progress=False, paths=[{"1": v, "3": u}]
            )
            expected_w = df_dh2[u] * fc2.weight[u, v] * active1[b, v] * fc1.weight[v]
            torch.testing.assert_close(res.path_weight[0, 0], expected_w.detach(), rtol=1e-6, atol=1e-9)
            expected_b = df_dh2[u] * fc2.weight[u, v] * active1[b, v] * fc1.bias[v]
            torch.testing.assert_close(res.path_bias[0, 0], expected_b.detach(), rtol=1e-6, atol=1e-9)
            assert active2[b, u] in (0.0, 1.0)


def test_bias_share_reported_per_input() -> None:
    model = mlp(4)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = pyengine.run("path-linear", model, x, target=0, progress=False)
    torch.testing.assert_close(res.weight_part + res.bias_part, res.output)
    torch.testing.assert_close(res.bias_share, res.bias_part / res.output)
    assert 0 <= res.mean_abs_bias_share <= 1 and res.figures


def tie_free(model: nn.Module, x: torch.Tensor) -> bool:
    """No two candidates of any step share an importance value (checked through all units)."""
    chain = trace_chain(context(model), x, "test")
    for a in chain.activations:
        values = a.flatten()
        if values[values > 0].unique().numel() != int((values > 0).sum()):
            return False
    return True


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize(
    "make, shape", [(mlp, (4, 5)), (cnn, (3, 2, 4, 4)), (lambda: cnn(5, nn.AvgPool2d), (3, 2, 4, 4))]
)
def test_native_decomposition_equals_the_reference(make, shape, beam: int) -> None:
    model = make()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert tie_free(model, x)
    chain = trace_chain(context(model), x, "test")
    targets = torch.tensor([[0, 1]]).repeat(shape[0], 1)
    activations, weights, indices, geometry = op_arguments(chain)
    paths, scores = ops.hierarchical_paths(activations, weights, indices, geometry, targets, beam)
    steps = [(step.pool, step.linear) for step in chain.steps[1:]]
    expected_paths, expected_scores = reference_paths(steps, chain.activations, targets, beam)
    assert torch.equal(paths, expected_paths)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-12, atol=1e-12)


def test_the_technique_on_the_demo_cnn_with_runner_up(small_cnn: nn.Module) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = pyengine.run("hierarchical-decomposition", small_cnn, x, beam=3, progress=False)
    logits = small_cnn(x)
    assert torch.equal(res.targets[:, 0], logits.argmax(1))
    assert torch.equal(res.targets[:, 1], logits.topk(2, dim=1).indices[:, 1])
    assert res.paths.shape == (3, 2, 3, 4) and res.layers == (
        "features.relu1",
        "features.relu2",
        "features.relu3",
        "classifier.relu4",
    )
    assert res.path_weight.shape == res.top_weight.shape == res.beam_weight.shape == (3, 2, 3, 16, 16)
    assert hooks_on(small_cnn) == []
    assert bool((res.scores[:, :, :-1] >= res.scores[:, :, 1:]).all())
    assert any("layer stack" in f.title for f in res.figures)


class FunctionalNet(nn.Module):
    """The MLP's weights, with ReLUs called functionally and in place."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = net[0], net[2], net[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(F.relu(self.fc1(x), inplace=True))))


def test_functional_and_inplace_relus_are_layers() -> None:
    model = mlp(6)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    plain = pyengine.run("hierarchical-decomposition", model, x, beam=2, progress=False)
    functional = pyengine.run("hierarchical-decomposition", FunctionalNet(model), x, beam=2, progress=False)
    assert functional.layers == ("relu:0", "relu:1") and plain.layers == ("1", "3")
    assert torch.equal(functional.paths, plain.paths)
    torch.testing.assert_close(functional.path_weight, plain.path_weight)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) + x)


@pytest.mark.parametrize(
    "model, fragment",
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)), "layer '1' is a Sigmoid"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2)), "layer '2' is a BatchNorm1d"),
        (Residual(), "plain chain"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2)), "expected [MaxPool2d|AvgPool2d]"),
    ],
)
def test_unsupported_models_are_named(model: nn.Module, fragment: str) -> None:
    model.eval()
    for name in ("path-linear", "hierarchical-decomposition"):
        with pytest.raises(PyengineError, match=fragment.replace("[", r"\[").replace("|", r"\|")):
            pyengine.run(name, model, torch.randn(2, 4), progress=False)
        assert hooks_on(model) == []


def test_bad_paths_are_named() -> None:
    model = mlp()
    with pytest.raises(PyengineError, match="path layer 'relu9' is not a ReLU layer"):
        pyengine.run("path-linear", model, torch.randn(2, 5, dtype=torch.float64), paths=[{"relu9": 0}], progress=False)
    with pytest.raises(PyengineError, match="out of range: the layer has 4 units"):
        pyengine.run("path-linear", model, torch.randn(2, 5, dtype=torch.float64), paths=[{"1": 4}], progress=False)


@requires_cuda
def test_cuda_op_matches_cpu() -> None:
    model = cnn()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    chain = trace_chain(context(model), x, "test")
    args = op_arguments(chain)
    targets = torch.tensor([[0, 1]]).repeat(4, 1)
    cpu = ops.hierarchical_paths(*args, targets, 4)
    cuda = ops.hierarchical_paths(
        [a.cuda() for a in args[0]],
        [w.cuda() for w in args[1]],
        [i.cuda() for i in args[2]],
        args[3],
        targets.cuda(),
        4,
    )
    assert torch.equal(cuda[0].cpu(), cpu[0])
    torch.testing.assert_close(cuda[1].cpu(), cpu[1])
