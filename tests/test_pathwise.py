"""Pathwise explanation: exact path sums, autograd references, the native decomposition op."""

from __future__ import annotations

import copy
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vision_models import VGG, ResNet, build, calibrate, init_signal, make_vgg_layers, zoo_images

import pyengine
from conftest import hooks_on, requires_cuda
from pathwise_reference import reference_paths
from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.pathwise._chain import trace_chain, trace_network
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
    steps = [(step.pool, step.linear) for step in chain.steps]
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


@pytest.mark.parametrize(
    "model, fragment",
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)), "'1' (Sigmoid) runs sigmoid, which is not"),
        (nn.Sequential(nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2)), "'1' (SiLU) runs silu, which is not piecewise"),
        (nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)), "'1' (GELU) runs gelu, which is not piecewise"),
        (nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(), nn.Linear(3, 2)), "'1' (LeakyReLU) runs leaky_relu, which"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)),
         "'2' (BatchNorm1d) runs batch_norm, in training mode or without running statistics"),
    ],
)  # fmt: skip
def test_unsupported_models_are_named(model: nn.Module, fragment: str) -> None:
    model.eval()
    for name in ("path-linear", "hierarchical-decomposition"):
        with pytest.raises(PyengineError, match=re.escape(f"{name}: {fragment}")):
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


# --- residual networks, BatchNorm, what is refused ------------------------------------------------


class ResidualMLP(nn.Module):
    """relu(fc2(relu(fc1(x))) + x) then fc3: one ``self.relu`` called twice, ``h += x`` in place."""

    def __init__(self, seed: int = 0, width: int = 4, hidden: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.Linear(width, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.relu(self.fc1(x)))
        h += x
        return self.fc3(self.relu(h))


def test_residual_paths_are_the_terms_through_their_units() -> None:
    """Closed forms: a path through relu#1 unit v and relu#2 unit u carries w_u m2_u W2_uv m1_v W1_v;
    a path through relu#2 alone adds the skip term w_u m2_u x_u; through relu#1 alone it does not."""
    model = ResidualMLP().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w1, b1, w2, b2 = (p.detach() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias))
    target = 2
    w = model.fc3.weight.detach()[target]
    pairs = list(itertools.product(range(4), range(5)))
    paths = [{"relu#1": v, "relu#2": u} for u, v in pairs] + [{"relu#2": u} for u in range(4)]
    paths += [{"relu#1": v} for v in range(5)]
    for b in range(2):
        res = pyengine.run("path-linear", model, x[b : b + 1], target=target, paths=paths, progress=False)
        assert res.layers == ("relu#1", "relu#2")
        m1 = (w1 @ x[b] + b1 > 0).double()
        m2 = (w2 @ (m1 * (w1 @ x[b] + b1)) + b2 + x[b] > 0).double()
        through = w2 * m1 @ w1 + torch.eye(4, dtype=torch.float64)  # ∂h2/∂x: the branch and the skip
        expected_w = [w[u] * m2[u] * w2[u, v] * m1[v] * w1[v] for u, v in pairs]
        expected_b = [w[u] * m2[u] * w2[u, v] * m1[v] * b1[v] for u, v in pairs]
        expected_own = list(expected_b)
        expected_w += [w[u] * m2[u] * through[u] for u in range(4)]
        expected_b += [w[u] * m2[u] * (w2[u] @ (m1 * b1) + b2[u]) for u in range(4)]
        expected_own += [w[u] * m2[u] * b2[u] for u in range(4)]
        expected_w += [(w * m2) @ w2[:, v] * m1[v] * w1[v] for v in range(5)]
        expected_b += [(w * m2) @ w2[:, v] * m1[v] * b1[v] for v in range(5)]
        expected_own += [(w * m2) @ w2[:, v] * m1[v] * b1[v] for v in range(5)]
        torch.testing.assert_close(res.path_weight[0], torch.stack(expected_w), rtol=0, atol=1e-12)
        torch.testing.assert_close(res.path_bias[0], torch.stack(expected_b), rtol=0, atol=1e-12)
        torch.testing.assert_close(res.path_own_bias[0], torch.stack(expected_own), rtol=0, atol=1e-12)
        torch.testing.assert_close(res.weight[0], (w * m2) @ through, rtol=0, atol=1e-12)
        expected_bias = (w * m2) @ (w2 @ (m1 * b1) + b2) + model.fc3.bias.detach()[target]
        torch.testing.assert_close(res.bias_part[0], expected_bias, rtol=0, atol=1e-12)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class TorchvisionBottleneck(nn.Module):
    """torchvision's Bottleneck as written there: one ``self.relu`` called three times, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class BottleneckNet(nn.Module):
    """Stem (conv, BN, ReLU, max pool), a Bottleneck, a strided Bottleneck with a downsample, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        downsample = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(TorchvisionBottleneck(8, 2), TorchvisionBottleneck(8, 4, 2, downsample))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer1(x))
        return self.fc(torch.flatten(x, 1))


def bottleneck_net() -> BottleneckNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = init_signal(BottleneckNet())
    return calibrate(model, zoo_images(32, 16, seed=5)).double()


def reference_through_first_block(
    net: BottleneckNet, x: torch.Tensor, target: int, first: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """W^path of the terms through the units ``first`` (0/1 mask) of layer1.0's first ReLU and then ``last``
    of layer1.1's last ReLU, written out by hand: the first block's skip input is held constant."""
    x = x.detach().clone().requires_grad_(True)
    stem = net.maxpool(torch.relu(net.bn1(net.conv1(x))))
    block = net.layer1[0]
    a1 = torch.relu(block.bn1(block.conv1(stem)))
    a1_var = a1.detach().requires_grad_(True)
    main = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(a1_var)))))
    a_last = net.layer1[1](torch.relu(main + stem.detach()))
    a_last_var = a_last.detach().requires_grad_(True)
    f = net.fc(torch.flatten(net.avgpool(a_last_var), 1))[:, target].sum()
    (g,) = torch.autograd.grad(f, a_last_var)
    (g,) = torch.autograd.grad(a_last, a1_var, g * last)
    (w,) = torch.autograd.grad(a1, x, g * first)
    return w


def test_torchvision_bottleneck_net_is_modelled_exactly() -> None:
    net = bottleneck_net()
    x = zoo_images(3, 16, seed=9).double()
    target = 1
    chain = trace_network(context(net), x, "test")
    assert chain.layers == ["relu", *(f"layer1.{b}.relu#{k}" for b in (0, 1) for k in (1, 2, 3))]
    assert chain.parents[3] == (0, 2) and chain.parents[6] == (3, 5) and chain.output_parents == (6,)
    sizes = {name: a[0].numel() for name, a in zip(chain.layers, chain.activations)}
    everything = {name: list(range(size)) for name, size in sizes.items()}
    first, last = "layer1.0.relu#1", "layer1.1.relu#3"
    u = int(chain.activations[6].flatten(1).gt(0).all(0).nonzero()[0])  # a last-layer unit active at every input
    channel = list(range(chain.activations[1][0, 0].numel()))  # the first block's first channel
    paths = [
        {name: everything[name]} for name in chain.layers
    ] + [
        {first: everything[first]},
        {"relu": everything["relu"], last: everything[last]},
        {first: everything[first], "layer1.0.relu#3": everything["layer1.0.relu#3"]},
        {first: channel, last: u},
    ]  # fmt: skip
    res = pyengine.run("path-linear", net, x, target=target, paths=paths, progress=False)
    assert hooks_on(net) == []
    f = net(x)[:, target]
    torch.testing.assert_close(res.output, f.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.weight_part + res.bias_part, res.output, rtol=0, atol=1e-9)
    leaf = x.clone().requires_grad_(True)
    (jacobian,) = torch.autograd.grad(net(leaf)[:, target].sum(), leaf)
    torch.testing.assert_close(res.weight, jacobian, rtol=0, atol=1e-12)
    # the constants: each layer's own bias carried to the output, plus fc's bias, make b(x)
    own = res.path_own_bias[:, : len(chain.layers)].sum(1) + net.fc.bias.detach()[target]
    torch.testing.assert_close(own, res.bias_part, rtol=0, atol=1e-9)
    n = len(chain.layers)
    ones = torch.ones_like(chain.activations[1])
    through_first = reference_through_first_block(net, x, target, ones, torch.ones_like(chain.activations[6]))
    torch.testing.assert_close(res.path_weight[:, n], through_first, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.path_weight[:, n + 1], res.weight, rtol=0, atol=1e-12)  # every term
    torch.testing.assert_close(res.path_weight[:, n + 2], through_first, rtol=0, atol=1e-12)
    units = [torch.zeros_like(a).flatten(1).index_fill(1, torch.tensor(k), 1.0).view_as(a) for a, k in
             ((chain.activations[1], channel), (chain.activations[6], [u]))]  # fmt: skip
    expected = reference_through_first_block(net, x, target, *units)
    torch.testing.assert_close(res.path_weight[:, n + 3], expected, rtol=0, atol=1e-12)
    assert expected.flatten(1).abs().amax(1).min() > 1e-4  # the units carry something at every input


@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn", "demo_cnn"])
def test_zoo_local_linear_model_is_exact(name: str) -> None:
    model = build(name, 32).double()
    x = zoo_images(3, 32, seed=2).double()
    chain = trace_network(context(model), x, "test")
    everything = [{layer: list(range(a[0].numel()))} for layer, a in zip(chain.layers, chain.activations)]
    res = pyengine.run("path-linear", model, x, target=3, paths=everything, progress=False)
    f = model(x)[:, 3].detach()
    torch.testing.assert_close(res.output, f, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.weight_part + res.bias_part, f, rtol=0, atol=1e-9)
    leaf = x.clone().requires_grad_(True)
    (jacobian,) = torch.autograd.grad(model(leaf)[:, 3].sum(), leaf)
    torch.testing.assert_close(res.weight, jacobian, rtol=0, atol=1e-12)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    own = res.path_own_bias.sum(1) + last_linear.bias.detach()[3]
    torch.testing.assert_close(own, res.bias_part, rtol=0, atol=1e-9)
    assert res.bias_part.abs().min() > 1e-3 and res.weight_part.abs().min() > 1e-3  # both parts carry signal


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("mobilenet_v3", "'features.0.2' (Hardswish) runs hardswish, which is not piecewise linear"),
        ("vit", "'encoder.layers.encoder_layer_0.ln_1' (LayerNorm) runs layer_norm, which is not piecewise linear"),
        ("convnext", "'stem.1' (LayerNorm2d) runs layer_norm, which is not piecewise linear"),
    ],
)
def test_zoo_models_that_are_not_piecewise_linear_are_named(name: str, fragment: str) -> None:
    model = build(name, 32)
    for technique in ("path-linear", "hierarchical-decomposition"):
        with pytest.raises(PyengineError, match=re.escape(f"{technique}: {fragment};")):
            pyengine.run(technique, model, zoo_images(2, 32), progress=False)
        assert hooks_on(model) == []


class Gated(nn.Module):
    """A squeeze-excitation-like gate: ``x * gate(x)``, with or without a sigmoid."""

    def __init__(self, sigmoid: bool) -> None:
        super().__init__()
        self.fc, self.sigmoid = nn.Linear(4, 4), sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x)
        return x * (torch.sigmoid(gate) if self.sigmoid else gate)


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Wrapped(nn.Module):
    """Linear, ReLU, then ``how`` applied in the forward itself, then Linear."""

    def __init__(self, how: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2, self.how = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.how(self.relu(self.fc1(x))))


class EveryOtherCall(nn.Module):
    """A stateful forward: an extra ReLU on every other call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.relu(h) if self.calls % 2 else h


@pytest.mark.parametrize(
    "model, fragment",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Gated(sigmoid=True)), "'2' (Gated) runs sigmoid, which is not"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Gated(sigmoid=False)),
         "'2' (Gated) runs mul, which combines 2 input-dependent tensors (not piecewise linear)"),
        (Wrapped(Square.apply), "the forward of Wrapped runs mul, which combines 2 input-dependent tensors"),
        (Wrapped(torch.Tensor.detach), "the forward of Wrapped runs detach, which cuts input-dependent values off"),
        (Wrapped(lambda h: h / h.sum(1, keepdim=True)), "runs div, which divides by an input-dependent tensor"),
        (Wrapped(lambda h: h.clamp(max=1)), "the forward of Wrapped runs clamp, which pathwise analysis cannot model"),
        (Wrapped(lambda h: nn.functional.dropout(h, 0.5, training=True)), "runs dropout, in training mode"),
        (Wrapped(lambda h: torch.relu(h) if h.sum().item() > 0 else h), "the forward of Wrapped runs item, which "
         "reads input-dependent values into Python (the pass could branch on them)"),
        (Wrapped(EveryOtherCall()),
         "ran 1 ReLU and 0 max pool calls on a second pass over the same inputs, 2 and 0 on the first"),
    ],
)  # fmt: skip
def test_what_is_not_piecewise_linear_is_named(model: nn.Module, fragment: str) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    for technique in ("path-linear", "hierarchical-decomposition"):
        with pytest.raises(PyengineError, match=re.escape(fragment)):
            pyengine.run(technique, model, x, progress=False)
        assert hooks_on(model) == []


def test_attention_and_train_mode_batchnorm_are_named() -> None:
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    model = Wrapped(lambda h: attention(h[:, None], h[:, None], h[:, None], need_weights=False)[0][:, 0])
    with pytest.raises(PyengineError, match=r"runs multi_head_attention_forward, which is not piecewise linear"):
        pyengine.run("path-linear", model, torch.randn(2, 4), progress=False)
    norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    with pytest.raises(PyengineError, match=r"'1' \(BatchNorm1d\) runs batch_norm, in training mode"):
        trace_network(context(norm), torch.randn(3, 4), "test")
    assert norm.training and hooks_on(norm) == []


def test_an_op_taken_for_affine_that_is_not_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence: W(x)·x + b(x) must be f(x), else the run is refused."""
    from pyengine.plugins.pathwise import _trace

    monkeypatch.setattr(_trace, "NOT_PIECEWISE_LINEAR", _trace.NOT_PIECEWISE_LINEAR - {"sigmoid"})
    monkeypatch.setattr(_trace, "JOINTLY_AFFINE", _trace.JOINTLY_AFFINE | {"sigmoid"})
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sigmoid(), nn.Linear(4, 2)).double()
    with pytest.raises(PyengineError, match=r"path-linear: at input \d, W\(x\)·x \+ b\(x\) differs from f\(x\)"):
        pyengine.run("path-linear", model, torch.randn(3, 4, dtype=torch.float64), progress=False)


class TwoHeads(nn.Module):
    """The output reads two ReLU layers: fc3(cat(a1, a2))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = F.relu(self.fc1(x))
        return self.fc3(torch.cat([a1, F.relu(self.fc2(a1))], 1))


@pytest.mark.parametrize(
    "model, fragment",
    [
        (build("resnet50", 32), "ReLU layer 'layer1.0.relu#3' takes input from 'relu', 'layer1.0.relu#2'; the top"),
        (ResidualMLP(), "ReLU layer 'relu#2' takes input from the input, 'relu#1'; the top-down walk"),
        (TwoHeads(), "the output takes input from 'relu:0', 'relu:1'; the top-down walk needs a plain chain"),
        (build("vgg16_bn", 32), "before 'classifier.1': expected [MaxPool2d|AvgPool2d] then one Linear|Conv2d (and an "
         "eval-mode BatchNorm) between ReLU layers, found max_pool2d -> adaptive_avg_pool2d -> flatten -> linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2)),
         "after the last ReLU: expected [MaxPool2d|AvgPool2d] then one Linear|Conv2d (and an eval-mode BatchNorm) "
         "between ReLU layers, found linear -> linear"),
    ],
)  # fmt: skip
def test_hierarchical_refuses_what_path_linear_models(model: nn.Module, fragment: str) -> None:
    """Residual, branching and other non-chain ReLU nets: path-linear is exact, the top-down walk refuses."""
    model = model.double().eval()
    x = zoo_images(2, 32).double() if isinstance(model, (ResNet, VGG)) else torch.randn(2, 4).double()
    res = pyengine.run("path-linear", model, x, progress=False)
    torch.testing.assert_close(res.weight_part + res.bias_part, res.output, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.output, model(x).gather(1, res.targets[:, None])[:, 0].detach())
    with pytest.raises(PyengineError, match=re.escape(f"hierarchical-decomposition: {fragment}")):
        pyengine.run("hierarchical-decomposition", model, x, progress=False)
    assert hooks_on(model) == []


def bn_cnn(seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU-max pool twice, then Linear-BN-ReLU-Linear: BatchNorm after every Linear/Conv2d."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip
    return calibrate(init_signal(model), zoo_images(32, 16, seed=1)).double()


def folded_by_hand(model: nn.Sequential) -> nn.Sequential:
    """The same network with each BatchNorm folded into the Linear/Conv2d before it."""
    layers: list[nn.Module] = []
    for module in model:
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            linear = layers[-1]
            assert isinstance(linear, (nn.Linear, nn.Conv2d))
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            bias = linear.bias if linear.bias is not None else torch.zeros_like(module.running_mean)
            folded = (
                type(linear)(linear.in_features, linear.out_features)
                if isinstance(linear, nn.Linear)
                else (nn.Conv2d(linear.in_channels, linear.out_channels, linear.kernel_size, padding=linear.padding))
            )
            folded = folded.double()
            with torch.no_grad():
                folded.weight.copy_(linear.weight * scale.reshape(-1, *[1] * (linear.weight.dim() - 1)))
                folded.bias.copy_((bias - module.running_mean) * scale + module.bias)
            layers[-1] = folded
        else:
            layers.append(module)
    return nn.Sequential(*layers).eval()


def test_batchnorm_in_eval_mode_is_folded_for_the_top_down_walk() -> None:
    model = bn_cnn()
    by_hand = folded_by_hand(model)
    x = zoo_images(4, 16, seed=3).double()
    torch.testing.assert_close(by_hand(x), model(x), rtol=0, atol=1e-12)
    res = pyengine.run("hierarchical-decomposition", model, x, beam=3, progress=False)
    expected = pyengine.run("hierarchical-decomposition", by_hand, x, beam=3, progress=False)
    assert res.layers == ("2", "6", "11") and expected.layers == ("1", "4", "8")
    assert torch.equal(res.paths, expected.paths)
    torch.testing.assert_close(res.scores, expected.scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.path_weight, expected.path_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.path_bias, expected.path_bias, rtol=1e-12, atol=1e-12)


def test_torchvision_vgg_with_batchnorm_walks_top_down() -> None:
    """VGG-BN as torchvision writes it, at a size where its 7x7 average pool is the identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = init_signal(VGG(make_vgg_layers([8, "M", 16, "M"]), hidden=16))
    model = calibrate(model, zoo_images(32, 28, seed=1)).double()
    by_hand = copy.deepcopy(model)
    by_hand.features = folded_by_hand(model.features)
    x = zoo_images(3, 28, seed=4).double()
    res = pyengine.run("hierarchical-decomposition", model, x, beam=2, progress=False)
    expected = pyengine.run("hierarchical-decomposition", by_hand, x, beam=2, progress=False)
    assert res.layers == ("features.2", "features.6", "classifier.1", "classifier.4")
    assert torch.equal(res.paths, expected.paths)
    torch.testing.assert_close(res.path_weight, expected.path_weight, rtol=1e-12, atol=1e-12)
    chain = trace_chain(context(model), x, "test")
    reference, _ = reference_paths([(s.pool, s.linear) for s in chain.steps], chain.activations, res.targets, 2)
    assert torch.equal(res.paths, reference)
