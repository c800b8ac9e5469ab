"""Pathwise explanation of ReLU networks (Lim, Lee, Park, Choi; Cheng et al., IJCV 2023).

At an input x a ReLU network is linear, f(x) = W(x)·x + b(x): W(x) is the gradient, b(x) the
network linearised at x (``_chain.Linearised``) at input zero. That linear model is the sum of its
paths' linear models. A path is a set of hidden ReLU units (one or more per layer, layers may be
skipped); its model keeps the terms that pass through its units, at each of its layers: W^path is
the gradient with the backward signal masked to the path at its layers and carried between them by
vector-Jacobian products (so in a residual net, routes that bypass one of its layers are left out),
and b^path = (masked ∂f/∂a at the path's lowest layer) · a − W^path·x, the bias the path carries
from below. ``path-linear`` computes them on any ReLU network; ``hierarchical-decomposition`` finds
paths top-down (Algorithm 1, with a beam) in the native op ``hierarchical_paths``, on chains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pyengine import ops
from pyengine.attribution import TargetOptions, resolve_targets, target_scores
from pyengine.context import Context, Rows, RowSource
from pyengine.errors import PyengineError
from pyengine.figures import heatmap_figure, image_grid, overlay
from pyengine.plugins.pathwise._chain import Chain, Linearised, Network, trace_chain, trace_network
from pyengine.technique import Figure, Result, Technique, bad_option, option

MAX_FIGURE_INPUTS = 4


# --- the linear model of a path ------------------------------------------------------------------


@dataclass(frozen=True)
class PathModel:
    """A path's linear model at each input: W^path (B, *S), b^path (B,), and the part of
    b^path introduced by the bias of its lowest layer (B,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    own_bias: torch.Tensor


def unit_masks(network: Network, path: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer index: (B, *S_l) 0/1 masks from (B, units) index tensors (-1 = none)."""
    masks = {}
    for layer, units in path.items():
        activation = network.activations[layer]
        mask = torch.zeros(
            activation.shape[0], activation[0].numel() + 1, dtype=activation.dtype, device=activation.device
        )
        mask.scatter_(1, torch.where(units < 0, activation[0].numel(), units).to(activation.device), 1.0)
        masks[layer] = mask[:, :-1].reshape(activation.shape)
    return masks


def path_model(
    model: nn.Module, network: Network, x: torch.Tensor, targets: torch.Tensor, path: dict[int, torch.Tensor] | None
) -> tuple[PathModel, torch.Tensor]:
    """The linear model of ``path`` ({layer index: (B, units)}; None: the whole network) for
    output ``targets`` (B,), and the outputs f(x) (B,) of the linearised model.

    The path's terms go from the input to its units at its lowest layer, from there to its units at
    the next of its layers, ..., to the output, each stretch by every route the network has (skip
    connections included): the gradient at the top layer masked to its units, carried down to the
    next layer of the path by a vector-Jacobian product between the two layers' outputs (which
    leaves out routes that bypass the lower layer), masked again, and so on down to the input."""
    masks = unit_masks(network, path) if path else {}
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with Linearised(network) as replay:
            output = model(leaf)
        replay.check("pathwise")
        scores = target_scores(output, targets.reshape(-1, 1))[:, 0]
        upper: torch.Tensor = scores
        carried: torch.Tensor = torch.ones_like(scores)
        for layer in sorted(masks, reverse=True):
            node = replay.nodes[layer]
            if node is None:  # cannot happen after replay.check: every traced layer ran
                raise PyengineError(f"pathwise: ReLU layer {network.layers[layer]!r} did not run on the replay")
            carried = _vjp(upper, node, carried) * masks[layer]
            upper = node
        weight = _vjp(upper, leaf, carried)
    scores = scores.detach()
    weight_part = (weight * x).flatten(1).sum(1)
    if not masks:
        bias = target_scores(network.bias_output, targets.reshape(-1, 1))[:, 0]
        return PathModel(weight, bias, torch.zeros_like(bias)), scores
    lowest = min(masks)
    a, g = network.activations[lowest], carried.detach()
    bias = (g * a).flatten(1).sum(1) - weight_part
    own = (g * network.masks[lowest] * network.biases[lowest]).flatten(1).sum(1)
    return PathModel(weight, bias, own), scores


def _vjp(output: torch.Tensor, source: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """vector · ∂output/∂source, zero where output does not depend on source."""
    if not output.requires_grad:
        return torch.zeros_like(source)
    (grad,) = torch.autograd.grad(output, source, vector, retain_graph=True, allow_unused=True)
    return grad.detach() if grad is not None else torch.zeros_like(source)


def parse_path(network: Network, spec: Any, batch: int) -> dict[int, torch.Tensor]:
    """{layer name: unit or [units]} -> {layer index: (B, units)}; flat unit indices."""
    if not isinstance(spec, dict) or not spec:
        raise bad_option("paths", spec, "a list of {layer: unit or [units]} tables")
    parsed = {}
    for name, units in spec.items():
        if name not in network.layers:
            raise PyengineError(
                f"path layer {name!r} is not a ReLU layer of the model; ReLU layers: {', '.join(network.layers)}"
            )
        layer = network.layers.index(name)
        values = torch.as_tensor([units] if isinstance(units, int) else list(units), dtype=torch.long)
        size = network.activations[layer][0].numel()
        if values.numel() == 0 or int(values.min()) < 0 or int(values.max()) >= size:
            raise PyengineError(f"path units {units!r} at {name!r} are out of range: the layer has {size} units")
        parsed[layer] = values.expand(batch, -1)
    return parsed


# --- path-linear ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathLinearOptions(TargetOptions):
    paths: tuple[dict[str, Any], ...] = option(
        (), "paths whose linear models are computed: each {ReLU layer: unit or [units]} (flat unit indices)"
    )

    def validate(self) -> None:
        super().validate()
        values = [self.paths] if isinstance(self.paths, dict) else self.paths
        if not isinstance(values, (list, tuple)) or not all(isinstance(p, dict) and p for p in values):
            raise bad_option("paths", self.paths, "a list of {layer: unit or [units]} tables")
        self._set("paths", tuple(values))


@dataclass(frozen=True, kw_only=True)
class PathLinearResult(Result):
    layers: tuple[str, ...]
    targets: torch.Tensor  # (B,)
    output: torch.Tensor  # f(x) (B,)
    weight: torch.Tensor  # W(x) (B, *S)
    weight_part: torch.Tensor  # W(x)·x (B,)
    bias_part: torch.Tensor  # b(x) (B,)
    bias_share: torch.Tensor  # b(x) / f(x)
    mean_abs_bias_share: float  # mean |b| / (|W·x| + |b|)
    path_weight: torch.Tensor  # (B, P, *S)
    path_bias: torch.Tensor  # (B, P)
    path_own_bias: torch.Tensor  # (B, P): the part of path_bias from the lowest layer's own bias

    def summary(self) -> str:
        return (
            f"local linear model of {self.output.shape[0]} inputs: |b| / (|W·x| + |b|) = "
            f"{self.mean_abs_bias_share:.3f} on average (b / f median {self.bias_share.median():.3f}); "
            f"{self.path_weight.shape[1]} paths"
        )


def local_decomposition(
    ctx: Context, network: Network, x: torch.Tensor, targets: torch.Tensor, technique: str = "path-linear"
) -> tuple[PathModel, torch.Tensor]:
    """W(x) (the gradient) and b(x) (the linearised model at input zero) for ``targets``, and f(x);
    an error when W(x)·x + b(x) is not f(x) to rounding: the model is then not what was modelled."""
    whole, _ = path_model(ctx.model, network, x, targets, None)
    output = target_scores(network.output, targets.reshape(-1, 1))[:, 0]
    terms = (whole.weight * x).flatten(1)
    error = (terms.sum(1) + whole.bias - output).abs()
    scale = terms.abs().sum(1) + whole.bias.abs() + output.abs()
    tolerance = torch.finfo(output.dtype).eps ** 0.5
    worst = int((error - tolerance * scale).argmax())
    if not bool((error <= tolerance * scale).all()):
        raise PyengineError(
            f"{technique}: at input {worst}, W(x)·x + b(x) differs from f(x) by {float(error[worst]):.3g} "
            f"(scale {float(scale[worst]):.3g}): the model is not the piecewise-linear function pathwise "
            "analysis traced (an op it took for affine is not, or the forward pass is not deterministic)"
        )
    return whole, output


class PathLinear(Technique):
    name = "path-linear"
    summary = "the local linear model W(x)·x + b(x) of a ReLU net, its bias share, and the linear models of paths"
    Options = PathLinearOptions
    needs_data: ClassVar[bool] = True
    explains_inputs: ClassVar[bool] = True

    def run(self, ctx: Context, options: PathLinearOptions) -> PathLinearResult:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("t", "f", "w", "wx", "b", "pw", "pb", "po")}
        layers: tuple[str, ...] = ()
        shown = None
        for offset, rows in _with_offsets(
            ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name, split=True)
        ):
            x = rows.require_inputs()
            network = trace_network(ctx, x, self.name)
            layers = tuple(network.layers)
            targets = resolve_targets(options.target, ctx, rows.model_inputs(), rows.labels, offset)[:, 0]
            whole, output = local_decomposition(ctx, network, x, targets, self.name)
            models = [
                path_model(ctx.model, network, x, targets, parse_path(network, p, len(targets)))[0]
                for p in options.paths
            ]
            weight_part = (whole.weight * x).flatten(1).sum(1)
            for key, value in (
                ("t", targets),
                ("f", output),
                ("w", whole.weight),
                ("wx", weight_part),
                ("b", whole.bias),
            ):
                parts[key].append(value.cpu())
            if models:
                parts["pw"].append(torch.stack([m.weight for m in models], 1).cpu())
                parts["pb"].append(torch.stack([m.bias for m in models], 1).cpu())
                parts["po"].append(torch.stack([m.own_bias for m in models], 1).cpu())
            shown = x[:MAX_FIGURE_INPUTS].cpu() if shown is None else shown
        parts = _gathered(ctx, parts)
        output, weight, bias = torch.cat(parts["f"]), torch.cat(parts["w"]), torch.cat(parts["b"])
        weight_part = torch.cat(parts["wx"])
        n = output.shape[0]
        empty = torch.zeros(n, 0)
        share = bias.abs() / (weight_part.abs() + bias.abs()).clamp(min=1e-12)
        return PathLinearResult(
            layers=layers,
            targets=torch.cat(parts["t"]),
            output=output,
            weight=weight,
            weight_part=weight_part,
            bias_part=bias,
            bias_share=bias / torch.where(output == 0, 1e-12, output),
            mean_abs_bias_share=float(share.mean()),
            path_weight=torch.cat(parts["pw"]) if parts["pw"] else empty.reshape(n, 0, *weight.shape[1:]),
            path_bias=torch.cat(parts["pb"]) if parts["pb"] else empty,
            path_own_bias=torch.cat(parts["po"]) if parts["po"] else empty,
            figures=_path_linear_figures(shown, weight, weight_part, bias),
        )


def _with_offsets(source: RowSource) -> Iterator[tuple[int, Rows]]:
    """Each block of rows with the number of rows of the whole range before it."""
    offset = source.offset
    for rows in source:
        yield offset, rows
        offset += len(rows)


def _gathered(ctx: Context, parts: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Per-row results of this process's rows -> those of every row, in row order (one block each).
    The figures stay those of the first rows read, which are rank 0's, as in one process."""
    return {key: [ctx.gather_rows(torch.cat(values))] if values else [] for key, values in parts.items()}


def _path_linear_figures(
    shown: torch.Tensor | None, weight: torch.Tensor, weight_part: torch.Tensor, bias: torch.Tensor
) -> tuple[Figure, ...]:
    figures = [
        Figure(
            "Local linear model per input: weight part W(x)·x and bias part b(x)",
            lines={"W(x)·x": weight_part.tolist(), "b(x)": bias.tolist()},
            xlabel="input",
            ylabel="target output",
        )
    ]
    if shown is not None and shown.dim() == 4:
        figures.append(_heatmaps("W(x) = ∂f/∂x, the local model's weights", shown, weight[: shown.shape[0]]))
    return tuple(figures)


def _heatmaps(title: str, inputs: torch.Tensor, maps: torch.Tensor, caption: str = "") -> Figure:
    summed = maps.float().sum(1)  # channels summed
    shown = inputs[torch.arange(maps.shape[0]) % inputs.shape[0]]
    return heatmap_figure(
        title,
        shown,
        summed,
        units="weight of the target output per input value",
        caption=caption or "red: raises the target output, blue: lowers it",
    )


# --- hierarchical decomposition ----------------------------------------------------------------


def op_arguments(chain: Chain) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The native op's per-layer activations, weights, max-pool indices and geometry."""
    activations, weights, indices, geometry = [], [], [], []
    shapes = [a.shape[1:] for a in chain.activations] + [chain.output.shape[1:]]
    for layer, a in enumerate(chain.activations):
        step = chain.steps[layer]
        pooled, index, pool_geometry = a, a.new_empty(0, dtype=torch.long), [0, 1, 1, 1, 1, 0, 0, 1]
        if step.pool is not None:
            kernel, stride, padding = (_pair(getattr(step.pool, k)) for k in ("kernel_size", "stride", "padding"))
            if isinstance(step.pool, nn.MaxPool2d):
                pooled, index = F.max_pool2d(a, kernel, stride, padding, step.pool.dilation, return_indices=True)
                kind, count_padding = 1, 1
            else:
                pooled, kind, count_padding = step.pool(a), 2, int(step.pool.count_include_pad)
            pool_geometry = [kind, *kernel, *stride, *padding, count_padding]
        linear = step.linear
        if isinstance(linear, nn.Conv2d):
            conv = [
                1,
                *_shape3(shapes[layer + 1]),
                *linear.kernel_size,
                *linear.stride,
                *linear.padding,
                *linear.dilation,
            ]
        else:
            conv = [0, *_shape3(shapes[layer + 1]), 1, 1, 1, 1, 0, 0, 1, 1]
        geometry += [*_shape3(a.shape[1:]), *pool_geometry, *_shape3(pooled.shape[1:]), *conv]
        activations.append(a)
        weights.append(linear.weight.detach())
        indices.append(index)
    return activations, weights, indices, geometry


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _shape3(shape: torch.Size) -> tuple[int, int, int]:
    dims = tuple(shape)
    if len(dims) == 1:
        return dims[0], 1, 1
    if len(dims) == 3:
        return dims[0], dims[1], dims[2]
    raise PyengineError(
        f"hierarchical-decomposition: layer output of shape {dims}; expected (features,) or (channels, height, width)"
    )


@dataclass(frozen=True)
class HierarchicalOptions(TargetOptions):
    beam: int = option(1, "partial paths kept per layer; 1 is Algorithm 1")
    runner_up: bool = option(True, "also explain the most plausible other class (highest other output)")

    def validate(self) -> None:
        super().validate()
        self.require_int("beam")


@dataclass(frozen=True, kw_only=True)
class HierarchicalResult(Result):
    layers: tuple[str, ...]
    targets: torch.Tensor  # (B, T) explained outputs (target, then the runner-up)
    paths: torch.Tensor  # (B, T, beam, layers) flat unit index per ReLU layer
    scores: torch.Tensor  # (B, T, beam) summed importances
    path_weight: torch.Tensor  # (B, T, *S): W^path of the best path (one unit per layer)
    top_weight: torch.Tensor  # (B, T, *S): W^path of the best path's units in the top half of the layers only
    beam_weight: torch.Tensor  # (B, T, *S): W^path of the union of the beam's paths
    path_bias: torch.Tensor  # (B, T): b^path of the best path
    path_output_share: float  # mean (W^path·x + b^path) / f over inputs and targets

    def summary(self) -> str:
        first = ", ".join(f"{layer}:{int(u)}" for layer, u in zip(self.layers, self.paths[0, 0, 0]))
        return (
            f"{self.paths.shape[0]} inputs x {self.paths.shape[1]} targets, beam {self.paths.shape[2]}: "
            f"input 0 -> {first}; the best path alone carries {self.path_output_share:.2e} of the output on average"
        )


class HierarchicalDecomposition(Technique):
    name = "hierarchical-decomposition"
    summary = "top-down path of the most important unit per layer (Cheng et al. Algorithm 1, with a beam), native op"
    Options = HierarchicalOptions
    needs_data: ClassVar[bool] = True
    explains_inputs: ClassVar[bool] = True

    def run(self, ctx: Context, options: HierarchicalOptions) -> HierarchicalResult:
        collected: dict[str, list[torch.Tensor]] = {k: [] for k in ("t", "p", "s", "w", "tw", "bw", "b", "share")}
        layers: tuple[str, ...] = ()
        shown, chain_shown = None, None
        for offset, rows in _with_offsets(
            ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name, split=True)
        ):
            x = rows.require_inputs()
            chain = trace_chain(ctx, x, self.name)
            layers = tuple(chain.layers)
            targets = resolve_targets(options.target, ctx, rows.model_inputs(), rows.labels, offset)
            if options.runner_up:
                others = chain.output.reshape(len(x), -1).scatter(1, targets[:, :1].to(x.device), float("-inf"))
                targets = torch.cat([targets, others.argmax(1, keepdim=True).cpu()], 1)
            activations, weights, indices, geometry = op_arguments(chain)
            paths, scores = ops.hierarchical_paths(
                activations, weights, indices, geometry, targets.to(x.device), options.beam
            )
            weight, top_weight, beam_weight, bias, share = self._path_models(ctx, chain, x, targets, paths)
            for key, value in (
                ("t", targets),
                ("p", paths),
                ("s", scores),
                ("w", weight),
                ("tw", top_weight),
                ("bw", beam_weight),
                ("b", bias),
                ("share", share),
            ):
                collected[key].append(value.cpu())
            if shown is None:
                shown, chain_shown = x[:MAX_FIGURE_INPUTS].cpu(), chain
        collected = _gathered(ctx, collected)
        paths = torch.cat(collected["p"])
        targets, weight, beam_weight = torch.cat(collected["t"]), torch.cat(collected["w"]), torch.cat(collected["bw"])
        top_weight = torch.cat(collected["tw"])
        figures = _hierarchy_figures(
            shown,
            chain_shown,
            layers,
            targets,
            paths,
            {
                "the best path (one unit per layer)": weight,
                f"the best path's units in the top {(len(layers) + 1) // 2} layers": top_weight,
                f"the union of the beam's {paths.shape[2]} paths": beam_weight,
            },
        )
        return HierarchicalResult(
            layers=layers,
            targets=targets,
            paths=paths,
            scores=torch.cat(collected["s"]),
            path_weight=weight,
            top_weight=top_weight,
            beam_weight=beam_weight,
            path_bias=torch.cat(collected["b"]),
            path_output_share=float(torch.cat(collected["share"]).mean()),
            figures=figures,
        )

    def _path_models(
        self, ctx: Context, chain: Chain, x: torch.Tensor, targets: torch.Tensor, paths: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Per target: W^path of the best path, of its top half, of the beam's union; b^path; share of f."""
        weights, tops, beams, biases, shares = [], [], [], [], []
        n = len(chain.layers)
        for t in range(targets.shape[1]):
            best = {layer: paths[:, t, 0, layer : layer + 1] for layer in range(n)}
            top = {layer: units for layer, units in best.items() if layer >= n // 2}
            union = {layer: paths[:, t, :, layer] for layer in range(n)}
            model, output = path_model(ctx.model, chain, x, targets[:, t], best)
            weights.append(model.weight)
            biases.append(model.bias)
            tops.append(path_model(ctx.model, chain, x, targets[:, t], top)[0].weight)
            beams.append(path_model(ctx.model, chain, x, targets[:, t], union)[0].weight)
            carried = (model.weight * x).flatten(1).sum(1) + model.bias
            shares.append(carried / torch.where(output == 0, 1e-12, output))
        return tuple(torch.stack(v, 1) for v in (weights, tops, beams, biases, shares))


def _hierarchy_figures(
    shown: torch.Tensor | None,
    chain: Chain | None,
    layers: tuple[str, ...],
    targets: torch.Tensor,
    paths: torch.Tensor,
    weights: dict[str, torch.Tensor],
) -> tuple[Figure, ...]:
    if shown is None or chain is None or shown.dim() != 4:
        return ()
    n = shown.shape[0]
    figures = []
    for t, who in enumerate(("target", "runner-up")[: targets.shape[1]]):
        classes = ", ".join(str(int(c)) for c in targets[:n, t])
        for what, weight in weights.items():
            if "union" in what and paths.shape[2] == 1:
                continue
            figures.append(
                _heatmaps(
                    f"W^path of {what}, {who} class",
                    shown,
                    weight[:n, t],
                    f"classes {classes}; red raises the class output, blue lowers it",
                )
            )
    figures.append(_layer_stack(shown[0], chain, layers, paths[0, 0, 0]))
    return tuple(figures)


def _layer_stack(image: torch.Tensor, chain: Chain, layers: tuple[str, ...], units: torch.Tensor) -> Figure:
    """Input 0's best path over the layer stack: per layer, the unit's channel map with the
    unit marked (conv layers), or the layer's units with the chosen one marked (dense)."""
    size = image.shape[-2:]
    panels = [overlay(image, torch.zeros(size))]
    names = []
    for layer, (name, unit) in enumerate(zip(layers, units.tolist())):
        a = chain.activations[layer][0].detach().float().cpu()
        if a.dim() == 3:
            c, y, x = unit // (a.shape[1] * a.shape[2]), (unit // a.shape[2]) % a.shape[1], unit % a.shape[2]
            channel = a[c] / a[c].max().clamp(min=1e-12)
            marked = torch.zeros_like(channel)
            marked[y, x] = 1
            names.append(f"{name} channel {c} at ({y}, {x})")
        else:
            side = int(a.numel() ** 0.5) + 1
            channel = torch.zeros(side * side)
            channel[: a.numel()] = a / a.max().clamp(min=1e-12)
            marked = torch.zeros(side * side)
            marked[unit] = 1
            channel, marked = channel.reshape(side, side), marked.reshape(side, side)
            names.append(f"{name} unit {unit}")
        rgb = torch.stack([torch.maximum(channel, marked), channel * (1 - marked), channel * (1 - marked)])
        panels.append(F.interpolate(rgb[None], size=tuple(size), mode="nearest")[0])
    return Figure(
        "Input 0's best path over the layer stack (the chosen unit in red)",
        image=image_grid(torch.stack(panels), columns=len(panels)),
        caption="; ".join(names),
    )
