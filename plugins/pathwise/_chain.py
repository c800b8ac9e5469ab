"""A ReLU network at an input x: its ReLU layers, which layers feed which, and its local linearisation.

``trace_network`` runs the model once under the op tracer (``_trace``: every input-dependent op is a
ReLU, a max pool or affine, else the run is refused naming the module), reads from the autograd graph
of that pass which earlier ReLU layers (or the input) feed each layer and the output — residual adds,
in place or not, and concatenations are sums of such inputs — and computes each layer's own bias.
``Linearised`` replays the model with every ReLU a fixed 0/1 mask and every max pool a fixed
selection, both taken at x: an affine function of the input (and of every ReLU layer's output) that
equals the model at x. ``trace_chain`` also requires a plain chain of ReLU layers and builds the
steps between them for the native op (BatchNorm in eval mode folded into the Linear/Conv2d before it).

ReLU layers are named by their module path (``layer1.0.relu#2`` for the second call of a module run
several times per pass), or ``relu:<k>`` for the k-th functional call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.pathwise._trace import (
    DROPOUTS,
    MAX_POOLS,
    RELUS,
    Op,
    Trace,
    Tracer,
    is_inplace_relu,
    name_layers,
    op_name,
    select,
    wants_indices,
)

INPUT = -1  # the input, as a parent of a ReLU layer


@dataclass
class Network:
    """The traced model at x. ``parents[l]``: the layers whose outputs feed layer l's pre-activation
    through affine maps alone (``INPUT`` for the input), in execution order; ``biases[l]``: the part of
    that pre-activation that is constant (the layer's own bias, c_l: its value when the input and every
    ReLU output are zero, max pools selecting as at x); ``bias_output``: the linearised model at input
    zero, b(x) for every output."""

    layers: list[str]
    activations: list[torch.Tensor]  # a_l (B, *S_l)
    preactivations: list[torch.Tensor]  # h_l (B, *S_l)
    parents: list[tuple[int, ...]]
    output_parents: tuple[int, ...]
    output: torch.Tensor = field(repr=False)
    biases: list[torch.Tensor] = field(repr=False)
    output_bias: torch.Tensor = field(repr=False)  # c_out: the constant part of the output
    bias_output: torch.Tensor = field(repr=False)  # b(x)
    trace: Trace = field(repr=False)

    @cached_property
    def masks(self) -> list[torch.Tensor]:
        """Per layer, where its ReLU passes its input: (B, *S_l) 0/1."""
        return [(a > 0).to(a.dtype) for a in self.activations]


@dataclass
class Step:
    """From one ReLU layer's output to the next pre-activations (or the output): [pool] then a
    Linear|Conv2d, with an eval-mode BatchNorm after it folded into its weight and bias."""

    pool: nn.MaxPool2d | nn.AvgPool2d | None
    linear: nn.Linear | nn.Conv2d
    linear_name: str


@dataclass
class Chain(Network):
    """A network whose ReLU layers form a chain; ``steps[l]`` maps layer l's output to layer l + 1's
    pre-activations, the last one to the output."""

    steps: list[Step] = field(default_factory=list, repr=False)


class Linearised(TorchFunctionMode):
    """Replays a traced pass with ReLU k as ``h * mask_k`` (or zero with ``zero_sources``) and max pools
    selecting at the traced indices. ``nodes[l]`` holds layer l's output in the autograd graph (a
    tensor later in-place ops of the model do not touch); ``pre[l]`` its input (with ``zero_sources``)."""

    def __init__(self, network: Network, *, zero_sources: bool = False) -> None:
        super().__init__()
        self.trace, self.zero_sources = network.trace, zero_sources
        self.masks = network.masks
        self.layer_of_call = {relu.call: k for k, relu in enumerate(network.trace.relus)}
        self.nodes: list[torch.Tensor | None] = [None] * len(network.layers)
        self.pre: list[torch.Tensor | None] = [None] * len(network.layers)
        self.relu_calls = self.pool_calls = 0

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        if name in RELUS:
            call, self.relu_calls = self.relu_calls, self.relu_calls + 1
            layer = self.layer_of_call.get(call)
            if layer is None:
                return func(*args, **kwargs)
            source = args[0]
            if self.zero_sources:
                self.pre[layer] = source.detach().clone()
                node = torch.zeros_like(source)
            else:
                node = source * self.masks[layer]
            self.nodes[layer] = node
            return source.copy_(node) if is_inplace_relu(name, args, kwargs) else node.clone()
        if name in MAX_POOLS:
            call, self.pool_calls = self.pool_calls, self.pool_calls + 1
            indices = self.trace.selections.get(call)
            if indices is None:
                return func(*args, **kwargs)
            pooled = select(name, args[0], indices)
            return (pooled, indices) if wants_indices(name, args, kwargs) else pooled
        return func(*args, **kwargs)

    def check(self, technique: str) -> None:
        """The replay ran the traced pass's ReLUs and max pools (no input-dependent control flow)."""
        if (self.relu_calls, self.pool_calls) != (self.trace.relu_calls, self.trace.pool_calls):
            raise PyengineError(
                f"{technique}: the model ran {self.relu_calls} ReLU and {self.pool_calls} max pool calls on a "
                f"second pass over the same inputs, {self.trace.relu_calls} and {self.trace.pool_calls} on the "
                "first; pathwise analysis needs a forward pass that does not depend on the input's values"
            )


def trace_network(ctx: Context, x: torch.Tensor, technique: str) -> Network:
    """Trace the model on x (errors name what cannot be modelled), then its own biases and b(x)."""
    model = ctx.model
    if not x.is_floating_point():
        raise PyengineError(f"{technique}: inputs of dtype {x.dtype}; pathwise analysis needs floating-point inputs")
    names = {id(m): n for n, m in model.named_modules()}
    scope: list[tuple[str, nn.Module]] = []

    def enter(module: nn.Module, args: Any) -> None:
        scope.append((names[id(module)], module))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        scope.pop()

    leaf = x.detach().clone().requires_grad_(True)
    tracer = Tracer(technique, model, scope)
    tracer.mark(leaf)
    with ctx.hooks() as hooks, torch.enable_grad():
        for module in model.modules():
            hooks.forward_pre(module, enter)
            hooks.forward(module, leave)
        with tracer:
            output = model(leaf)
    trace = tracer.trace
    if not isinstance(output, torch.Tensor):
        raise PyengineError(f"{technique}: the model returned a {type(output).__name__}; expected a tensor")
    if not trace.relus:
        raise PyengineError(f"{technique}: the model has no ReLU layer on the way from its input to its output")
    if output.grad_fn is None or any(relu.node is None for relu in trace.relus):
        raise PyengineError(f"{technique}: the model's forward runs without gradients; pathwise analysis needs them")
    layers = name_layers(trace.relus)
    found = _graph_parents(trace, leaf, output)
    network = Network(
        layers=layers,
        activations=[relu.post for relu in trace.relus],
        preactivations=[relu.pre for relu in trace.relus],
        parents=found[:-1],
        output_parents=found[-1],
        output=output.detach(),
        biases=[],
        output_bias=output.new_empty(0),
        bias_output=output.new_empty(0),
        trace=trace,
    )
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        with Linearised(network, zero_sources=True) as own:
            network.output_bias = model(zeros).detach()
        own.check(technique)
        with Linearised(network) as replay:
            network.bias_output = model(zeros).detach()
        replay.check(technique)
    network.biases = [b if b is not None else torch.zeros_like(a) for b, a in zip(own.pre, network.activations)]
    return network


def _graph_parents(trace: Trace, leaf: torch.Tensor, output: torch.Tensor) -> list[tuple[int, ...]]:
    """Per ReLU layer, then for the output: the ReLU layers (INPUT: the input) reached first on the
    autograd graph going backwards from its input: what feeds it through affine ops alone."""
    layer_of_node = {id(relu.node): k for k, relu in enumerate(trace.relus)}
    starts = [[n for n, _ in relu.node.next_functions] for relu in trace.relus] + [[output.grad_fn]]
    found = []
    for start in starts:
        stack, seen, parents = list(start), set(), set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in layer_of_node:
                parents.add(layer_of_node[id(node)])
            elif getattr(node, "variable", None) is leaf:
                parents.add(INPUT)
            else:
                stack.extend(n for n, _ in node.next_functions)
        found.append(tuple(sorted(parents)))
    for relu in trace.relus:
        relu.node = None  # lets the traced pass's graph go
    return found


def trace_chain(ctx: Context, x: torch.Tensor, technique: str) -> Chain:
    """Trace the model on x and require a plain chain of ReLU layers, with the native op's steps."""
    network = trace_network(ctx, x, technique)
    layers = network.layers
    for k, parents in enumerate([*network.parents, network.output_parents]):
        if parents != (k - 1,):
            what = f"ReLU layer {layers[k]!r}" if k < len(layers) else "the output"
            sources = ", ".join("the input" if p == INPUT else repr(layers[p]) for p in parents) or "nothing"
            raise PyengineError(
                f"{technique}: {what} takes input from {sources}; the top-down walk needs a plain chain of "
                "ReLU layers (each fed by the one before), not residual or other branching networks "
                "(path-linear handles those)"
            )
    steps = []
    for layer in range(len(layers)):
        ops = [op for op in network.trace.ops if op.after_layers == layer + 1]
        target = network.preactivations[layer + 1] if layer + 1 < len(layers) else network.output
        where = f"before {layers[layer + 1]!r}" if layer + 1 < len(layers) else "after the last ReLU"
        steps.append(_step(ops, network.activations[layer], target, where, technique))
    return Chain(**{f: getattr(network, f) for f in network.__dataclass_fields__}, steps=steps)


# --- the steps of a chain --------------------------------------------------------------------------

SHAPE_ONLY = frozenset({"flatten", "view", "reshape", "contiguous", "clone", "squeeze", "unsqueeze"}) | DROPOUTS
POOL_ARGS = {
    "max": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}
DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "count_include_pad": True, "groups": 1}
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
LINEAR_ARGS = ("input", "weight", "bias")
NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
TORCH_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")


def _bind(op: Op, names: Sequence[str]) -> dict[str, Any]:
    bound = {name: DEFAULTS.get(name) for name in names}
    bound.update(zip(names, op.args))
    bound.update(op.kwargs)
    return bound


def _step(ops: list[Op], a: torch.Tensor, target: torch.Tensor, where: str, technique: str) -> Step:
    """[max_pool2d|avg_pool2d] then conv2d|linear then [batch_norm], reshapes and eval dropout anywhere."""
    kinds = [op for op in ops if op.name not in SHAPE_ONLY and not _identity_pool(op)]
    pool = kinds.pop(0) if kinds and kinds[0].name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d") else None
    linear = kinds.pop(0) if kinds and kinds[0].name in ("conv2d", "linear") else None
    norm = kinds.pop(0) if kinds and kinds[0].name == "batch_norm" else None
    if linear is None or kinds:
        found = " -> ".join(op.name for op in ops) or "nothing"
        raise PyengineError(
            f"{technique}: {where}: expected [MaxPool2d|AvgPool2d] then one Linear|Conv2d (and an eval-mode "
            f"BatchNorm) between ReLU layers, found {found}"
        )
    pool_module = _pool(pool, technique) if pool is not None else None
    module = _linear(linear, norm, technique)
    pooled = pool_module(a) if pool_module is not None else a
    modelled = module(pooled if isinstance(module, nn.Conv2d) else pooled.flatten(1))
    scale = float(target.abs().max()) if target.numel() else 0.0
    error = float((modelled - target).abs().max()) if modelled.shape == target.shape else float("inf")
    if not error <= torch.finfo(target.dtype).eps ** 0.5 * max(scale, 1e-30):
        raise PyengineError(
            f"{technique}: {where}: the input as modelled ({' -> '.join(op.name for op in ops)}) differs from the "
            f"real one by {error / max(scale, 1e-30):.3g} relative; pathwise analysis cannot model this network"
        )
    return Step(pool_module, module, linear.where)


def _identity_pool(op: Op) -> bool:
    """An adaptive average pool to the size it is given (torchvision VGG's 7x7 pool on a 7x7 map)."""
    if op.name != "adaptive_avg_pool2d" or len(op.input_shape) < 2:
        return False
    size = _bind(op, ("input", "output_size"))["output_size"]
    size = (size, size) if isinstance(size, int) or size is None else tuple(size)
    return all(s is None or s == n for s, n in zip(size, op.input_shape[-2:]))


def _pool(op: Op, technique: str) -> nn.MaxPool2d | nn.AvgPool2d:
    kind = "avg" if op.name == "avg_pool2d" else "max"
    bound = _bind(op, POOL_ARGS[kind])
    if bound["ceil_mode"] or bound.get("divisor_override") is not None:
        raise PyengineError(f"{technique}: pooling layer {op.where}: ceil_mode and divisor_override are not supported")
    stride = bound["stride"] if bound["stride"] not in (None, []) else bound["kernel_size"]
    if kind == "max":
        return nn.MaxPool2d(bound["kernel_size"], stride, bound["padding"], bound["dilation"])
    return nn.AvgPool2d(bound["kernel_size"], stride, bound["padding"], count_include_pad=bound["count_include_pad"])


def _linear(op: Op, norm: Op | None, technique: str) -> nn.Linear | nn.Conv2d:
    """The Linear|Conv2d of ``op`` with the BatchNorm ``norm`` after it folded in (detached copies)."""
    conv = op.name == "conv2d"
    bound = _bind(op, CONV_ARGS if conv else LINEAR_ARGS)
    weight = bound["weight"].detach()
    bias = bound["bias"].detach() if bound["bias"] is not None else weight.new_zeros(weight.shape[0])
    if norm is not None:
        n = _bind(norm, NORM_ARGS if norm.func is torch.nn.functional.batch_norm else TORCH_NORM_ARGS)
        scale = (n["running_var"].detach() + (n["eps"] if n["eps"] is not None else 1e-5)).rsqrt()
        if n["weight"] is not None:
            scale = scale * n["weight"].detach()
        shift = -n["running_mean"].detach() * scale + (n["bias"].detach() if n["bias"] is not None else 0)
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
        bias = bias * scale.to(bias.dtype) + shift.to(bias.dtype)
    if conv:
        if bound["groups"] != 1 or isinstance(bound["padding"], str):
            raise PyengineError(f"{technique}: conv layer {op.where} must have groups=1 and numeric zero padding")
        module: nn.Linear | nn.Conv2d = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=bound["stride"] if bound["stride"] is not None else 1,
            padding=bound["padding"],
            dilation=bound["dilation"],
            device="meta",
        )
    else:
        module = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.bias = nn.Parameter(bias, requires_grad=False)
    return module
