"""Gradient attributions: saliency, guided backprop, integrated gradients, Grad-CAM, SmoothGrad.

Each technique is ``attributor(ctx, options) -> attribute(inputs, targets)``; the shared driver
in ``pyengine.attribution`` handles targets, rows and results. Every pass is batched within the
memory budget, and every hook or override is removed when the pass ends.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pyengine import host
from pyengine.attribution import (
    Attribute,
    Attributed,
    AttributionOptions,
    AttributionResult,
    make_result,
    run_attribution,
    samples_per_pass,
    target_scores,
    token_scores,
)
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.inputs import ModelInputs
from pyengine.technique import Technique, bad_option, layer_tuple, option

REDUCTIONS = ("none", "max", "sum", "mean")
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


class PassSize:
    """Samples per pass, measured on the first inputs seen (the budget needs an example)."""

    def __init__(self, ctx: Context, options: AttributionOptions, backward: bool = True) -> None:
        self.ctx, self.options, self.backward, self.samples = ctx, options, backward, 0

    def __call__(self, example: ModelInputs) -> int:
        if not self.samples:
            self.samples = samples_per_pass(self.ctx, example, self.options, backward=self.backward)
        return self.samples


@dataclass(frozen=True)
class LayerOptions(AttributionOptions):
    """Options of techniques that attribute to the inputs or to a layer's output."""

    layers: tuple[str, ...] = option(
        (), "one layer: attribute to its output (Captum's Layer* techniques; token ids: the embedding); (): the inputs"
    )
    token_scores: str = option("sum", "per-token scores of (N, T, D) maps: sum over the features, or l2 (norm)")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        if self.token_scores not in ("sum", "l2"):
            raise bad_option("token_scores", self.token_scores, "sum or l2")


class GradientTechnique(Technique):
    """A technique that is one ``attribute(inputs, targets)`` function."""

    needs_data: ClassVar[bool] = True  # inputs or a dataset
    explains_inputs: ClassVar[bool] = True
    attribution: ClassVar[bool] = True
    Options: ClassVar[type[AttributionOptions]] = AttributionOptions
    # several processes split the rows; False where results depend on what earlier rows drew
    splits_rows: ClassVar[bool] = True
    map_units: ClassVar[str] = "attribution"  # what a map's values are: the heatmap's colour bar

    def attributor(self, ctx: Context, options: Any) -> Attribute:
        raise NotImplementedError

    def run(self, ctx: Context, options: Any) -> AttributionResult:
        maps = run_attribution(ctx, options, self.name, self.attributor(ctx, options), split=self.splits_rows)
        return make_result(self.name, *maps, AttributionResult, self.map_units, **layer_fields(options, maps[0]))


def attributed_layer(options: Any) -> str | None:
    """The layer whose output a technique attributes to (its ``layers`` option), None: the inputs."""
    layers = getattr(options, "layers", ())
    return layers[0] if layers else None


def layer_fields(options: Any, attributions: torch.Tensor) -> dict[str, Any]:
    """The result's ``layer`` and ``token_scores`` for techniques with a ``layer`` option."""
    layers = getattr(options, "layers", ())
    if not layers:
        return {}
    layer = layers[0]
    scores = token_scores(attributions, getattr(options, "token_scores", "sum"))
    return {"layer": layer, **({"token_scores": scores} if scores is not None else {})}


# --- saliency and guided backprop --------------------------------------------------------


@dataclass(frozen=True)
class SaliencyOptions(LayerOptions):
    abs: bool = option(True, "|gradient| (Captum's default)")
    times_values: bool = option(
        False, "gradient x input (Captum InputXGradient; with layer: LayerGradientXActivation); set abs=false"
    )
    reduce: str = option("none", "over channels: none, max (Simonyan et al.), sum, mean; broadcast back")

    def validate(self) -> None:
        super().validate()
        if self.reduce not in REDUCTIONS:
            raise bad_option("reduce", self.reduce, " / ".join(REDUCTIONS))


def reduce_channels(maps: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none" or maps.dim() < 3:
        return maps
    reduced = {
        "max": lambda m: m.amax(1, keepdim=True),
        "sum": lambda m: m.sum(1, keepdim=True),
        "mean": lambda m: m.mean(1, keepdim=True),
    }[how](maps)
    return reduced.expand_as(maps).contiguous()


def saliency_maps(grads: torch.Tensor, values: torch.Tensor, options: SaliencyOptions) -> torch.Tensor:
    """Saliency from the gradients at ``values``: times the values, |.|, reduced over channels."""
    grads = grads * values if options.times_values else grads
    return reduce_channels(grads.abs() if options.abs else grads, options.reduce)


class Saliency(GradientTechnique):
    name = "saliency"
    summary = "gradient of the target output with respect to the input"
    Options = SaliencyOptions
    map_units = "gradient of the target score per input value (absolute unless abs=false)"

    def attributor(self, ctx: Context, options: SaliencyOptions) -> Attribute:
        size = PassSize(ctx, options)

        attributed = Attributed(ctx, attributed_layer(options), self.name, options.position)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            z = attributed.values(inputs)
            return saliency_maps(attributed.gradients(inputs, z, t, size(inputs)), z, options)

        return attribute


class GuidedBackprop(GradientTechnique):
    name = "guided-backprop"
    summary = "gradient through ReLUs that pass only positive gradients (Springenberg et al.)"
    map_units = "guided gradient of the target score per input value"

    Options = LayerOptions

    def attributor(self, ctx: Context, options: LayerOptions) -> Attribute:
        size = PassSize(ctx, options)
        attributed = Attributed(ctx, attributed_layer(options), self.name, options.position)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            return attributed.gradients(inputs, attributed.values(inputs), t, size(inputs), guided=True)

        return attribute


# --- integrated gradients -------------------------------------------------------------------


def quadrature(method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) on [0, 1] for the path integral, as Captum defines them."""
    if method == "gausslegendre":
        nodes, gauss_weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * gauss_weights)
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    rule = method.removeprefix("riemann_")
    if rule == "trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, steps, dtype=torch.float64), weights
    low, high = {
        "left": (0.0, 1 - 1 / steps),
        "right": (1 / steps, 1.0),
        "middle": (1 / (2 * steps), 1 - 1 / (2 * steps)),
    }[rule]
    return torch.linspace(low, high, steps, dtype=torch.float64), weights


def as_baseline(baseline: float | torch.Tensor, inputs: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """A scalar or a tensor broadcastable to the inputs, as a tensor like the inputs."""
    value = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        return torch.broadcast_to(value, inputs.shape)
    except RuntimeError:
        raise PyengineError(
            f"{name} has shape {tuple(value.shape)}; expected a scalar or a shape broadcastable to "
            f"the inputs {tuple(inputs.shape)}"
        ) from None


@dataclass(frozen=True)
class IntegratedGradientsOptions(LayerOptions):
    n_steps: int = option(50, "points on the path from the baseline to the input")
    method: str = option("gausslegendre", "quadrature: gausslegendre or riemann_left/right/middle/trapezoid")
    baseline: Any = option(
        0.0,
        "a number or a tensor broadcastable to the inputs; with layer: inputs whose layer output is the baseline "
        "(token ids: a token id, e.g. the pad id, for every real token), or a tensor like the layer's output",
    )

    def validate(self) -> None:
        super().validate()
        if self.method not in IG_METHODS:
            raise bad_option("method", self.method, " / ".join(IG_METHODS))
        self.require_int("n_steps", minimum=2 if self.method.startswith("riemann") else 1)
        if not isinstance(self.baseline, (int, float, torch.Tensor)) or isinstance(self.baseline, bool):
            try:
                self._set("baseline", torch.as_tensor(self.baseline, dtype=torch.float32))
            except (TypeError, ValueError, RuntimeError):
                raise bad_option(
                    "baseline", self.baseline, "a number or a tensor broadcastable to the inputs"
                ) from None


@dataclass(frozen=True, kw_only=True)
class IntegratedGradientsResult(AttributionResult):
    delta: torch.Tensor  # per input: sum of attributions - (f(x) - f(baseline))
    max_abs_delta: float
    mean_relative_delta: float  # |delta| / |f(x) - f(baseline)|, averaged

    def summary(self) -> str:
        return (
            f"{super().summary()}; completeness gap max {self.max_abs_delta:.3g} "
            f"(mean relative {self.mean_relative_delta:.3g})"
        )


def integrated_gradients(
    attributed: Attributed,
    inputs: ModelInputs,
    t: torch.Tensor,
    baseline: torch.Tensor,
    alphas: torch.Tensor,
    weights: torch.Tensor,
    samples: int,
) -> torch.Tensor:
    """Σ_k w_k ∇f(z0 + α_k (z − z0)) ⊙ (z − z0) for the attributed values z (inputs or a layer's
    output) of each row, ``samples`` path points per pass."""
    z = attributed.values(inputs)
    n, steps = z.shape[0], alphas.shape[0]
    diff = z - baseline
    total = torch.zeros_like(z, dtype=torch.float64)
    pairs = torch.arange(n * steps)  # step-major, like Captum
    for chunk in pairs.split(samples):
        step, row = chunk // n, chunk % n
        alpha = alphas[step].to(z.dtype).to(z.device).view(-1, *([1] * (z.dim() - 1)))
        points = baseline[row] + alpha * diff[row]
        grads = attributed.gradients(inputs.take(row), points, t[row], samples)
        weight = weights[step].to(z.device).view(-1, *([1] * (z.dim() - 1)))
        total.index_add_(0, row.to(z.device), grads.double() * weight)
    return (total * diff.double()).to(z.dtype)


def layer_baseline(attributed: Attributed, baseline: float | torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
    """The baseline of the attributed values: for the inputs a number or tensor broadcast to
    them; for a layer its output on baseline inputs (token ids: ``baseline`` in place of every
    real token, padding kept; float inputs: the inputs' baseline), or a tensor shaped like it."""
    if attributed.layer is None:
        return as_baseline(baseline, inputs.main)
    z = attributed.values(inputs)
    if isinstance(baseline, torch.Tensor) and baseline.dim() > 0:
        return as_baseline(baseline.to(z.dtype), z, "baseline (a tensor, at the layer)")
    main = inputs.main
    if main.is_floating_point():
        return attributed.values(inputs.with_main(as_baseline(baseline, main).contiguous()))
    value = float(torch.as_tensor(baseline))
    if value != int(value) or value < 0:
        raise PyengineError(
            f"baseline={baseline!r} is invalid for token-id inputs: expected a token id (e.g. the pad id)"
        )
    mask = inputs.mask
    real = torch.ones_like(main, dtype=torch.bool) if mask is None else mask != 0
    ids = torch.where(real, torch.full_like(main, int(value)), main)
    return attributed.values(inputs.with_main(ids))


class IntegratedGradients(GradientTechnique):
    name = "integrated-gradients"
    summary = "path integral of gradients from a baseline (Sundararajan et al.), with its completeness gap"
    Options = IntegratedGradientsOptions

    def attributor(
        self,
        ctx: Context,
        options: IntegratedGradientsOptions,
        gaps: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Attribute:
        """With ``gaps``, also records (sum of attributions - output change, output change) per row."""
        size = PassSize(ctx, options)
        alphas, weights = quadrature(options.method, options.n_steps)
        attributed = Attributed(ctx, attributed_layer(options), self.name, options.position)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            baseline = layer_baseline(attributed, options.baseline, inputs)
            maps = integrated_gradients(attributed, inputs, t, baseline, alphas, weights, size(inputs))
            if gaps is not None:  # completeness: f with the values z minus f with the baseline z0
                with torch.no_grad():
                    targets = t.reshape(-1, 1)
                    z = attributed.values(inputs)
                    change = (
                        attributed.scores(inputs, z, targets)
                        - attributed.scores(inputs, baseline.contiguous(), targets)
                    )[:, 0].double()
                gaps.append(((maps.double().flatten(1).sum(1) - change).cpu(), change.cpu()))
            return maps

        return attribute

    def run(self, ctx: Context, options: IntegratedGradientsOptions) -> IntegratedGradientsResult:
        gaps: list[tuple[torch.Tensor, torch.Tensor]] = []
        attributions, targets, index, shown = run_attribution(
            ctx, options, self.name, self.attributor(ctx, options, gaps)
        )
        # several processes: each gathered its rows' gaps; all rows', in row order
        delta = ctx.gather_rows(torch.cat([d for d, _ in gaps])).reshape(targets.shape)
        change = ctx.gather_rows(torch.cat([c for _, c in gaps])).reshape(targets.shape)
        relative = delta.abs() / change.abs().clamp(min=1e-12)
        return make_result(
            self.name,
            attributions,
            targets,
            index,
            shown,
            IntegratedGradientsResult,
            "target score change (a map sums to f(x) - f(baseline))",
            **layer_fields(options, attributions),
            delta=delta,
            max_abs_delta=float(delta.abs().max()),
            mean_relative_delta=float(relative.mean()),
        )


# --- Grad-CAM ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradCamOptions(AttributionOptions):
    layers: tuple[str, ...] = option(
        (), "one (N, C, H, W) layer; default: the last such output every path to the output goes through"
    )
    relu: bool = option(True, "keep positive evidence only (Selvaraju et al.); Captum's default is False")
    interpolate: str = option("bilinear", "upsampling to the input size: bilinear, nearest, bicubic")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        if self.interpolate not in INTERPOLATIONS:
            raise bad_option("interpolate", self.interpolate, " / ".join(INTERPOLATIONS))


@dataclass(frozen=True, kw_only=True)
class GradCamResult(AttributionResult):
    layer: str
    layer_attributions: torch.Tensor  # (B, 1, h, w) before upsampling


def grad_cam(ctx: Context, layer_name: str, inputs: ModelInputs, t: torch.Tensor, relu: bool) -> torch.Tensor:
    """(N, 1, *spatial) maps: ReLU? of Σ_k mean(∂y/∂A_k) A_k at the layer's output A."""
    x = inputs.main
    with ctx.record([layer_name], grad=True) as seen, torch.enable_grad():
        output = ctx.forward(inputs)
        activation = seen[layer_name]
        if activation.dim() != x.dim():
            raise PyengineError(
                f"grad-cam: layer {layer_name!r} gives output of shape {tuple(activation.shape)}, not a feature "
                f"map laid out like the {x.dim()}-D inputs (N, channels, *spatial) — e.g. a transformer's "
                "(N, tokens, features); pass a convolutional layer"
            )
        grads = torch.autograd.grad(target_scores(output, t.reshape(-1, 1), inputs).sum(), activation)[0]
    weights = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
    cam = (weights * activation.detach()).sum(1, keepdim=True)
    return cam.clamp(min=0) if relu else cam


class GradCam(GradientTechnique):
    name = "grad-cam"
    summary = "class activation map of a conv layer weighted by pooled gradients (Selvaraju et al.)"
    Options = GradCamOptions

    def attributor(
        self, ctx: Context, options: GradCamOptions, layer_maps: list[torch.Tensor] | None = None
    ) -> Attribute:
        example = ctx.example(self.name)
        if example.dim() not in (3, 4) or not example.is_floating_point():
            raise PyengineError(
                f"grad-cam: inputs of shape {tuple(example.shape[1:])} and dtype {example.dtype} per row; expected "
                "(C, L) or (C, H, W) images (for token models: saliency with layers=... and times_values=true, "
                "gradient x activation)"
            )
        layer_name = options.layers[0] if options.layers else ctx.spatial_layer(self.name)
        ctx.module(layer_name)
        self.layer = layer_name
        size = PassSize(ctx, options)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            x = inputs.main
            samples = size(inputs)
            cams = torch.cat(
                [
                    grad_cam(ctx, layer_name, part, ts, options.relu)
                    for part, ts in zip(inputs.split(samples), t.split(samples))
                ]
            )
            if layer_maps is not None:
                layer_maps.append(cams.detach().cpu())
            mode = "linear" if x.dim() == 3 and options.interpolate == "bilinear" else options.interpolate
            up = F.interpolate(
                cams, size=x.shape[2:], mode=mode, **({} if mode == "nearest" else {"align_corners": False})
            )
            return up.expand_as(x).contiguous()

        return attribute

    def run(self, ctx: Context, options: GradCamOptions) -> GradCamResult:
        layer_maps: list[torch.Tensor] = []
        attributions, targets, index, shown = run_attribution(
            ctx, options, self.name, self.attributor(ctx, options, layer_maps)
        )
        cams = ctx.gather_rows(torch.cat(layer_maps))  # several processes: every row's, in row order
        cams = cams.reshape(*targets.shape, *cams.shape[1:])
        return make_result(
            self.name,
            attributions,
            targets,
            index,
            shown,
            GradCamResult,
            "gradient-weighted activation of the layer (target score units)",
            layer=self.layer,
            layer_attributions=cams,
        )


# --- SmoothGrad -------------------------------------------------------------------------------


def smoothable() -> list[str]:
    """Registered attribution techniques smoothgrad can average (any plugin's)."""
    return [name for name, technique in host.techniques().items() if technique.attribution and name != SmoothGrad.name]


@dataclass(frozen=True)
class SmoothGradOptions(AttributionOptions):
    base: str = option("saliency", "the attribution technique averaged (any registered attribution technique)")
    base_options: dict[str, Any] = option({}, "the base technique's own options")
    samples: int = option(25, "noisy copies per input")
    noise: float = option(0.15, "noise std as a fraction of each input's value range (Smilkov et al.)")
    stdev: float = option(0.0, "absolute noise std (Captum's stdevs); overrides noise when > 0")
    square: bool = option(False, "average squared maps (SmoothGrad-Squared)")
    layers: tuple[str, ...] = option(
        (), "one layer: add the noise to its output and attribute to it (bases saliency, guided-backprop)"
    )

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        if self.layers and self.base not in LAYER_NOISE_BASES:
            raise bad_option("base", self.base, f"{' or '.join(LAYER_NOISE_BASES)} with layers (noise at the layer)")
        choices = smoothable()
        if self.base not in choices:
            raise bad_option("base", self.base, " / ".join(choices))
        if not isinstance(self.base_options, dict):
            raise bad_option("base_options", self.base_options, "a table of the base technique's options")
        shared = sorted(set(self.base_options) & {"target", "start", "stop", "batch_size", "layers", "position"})
        if shared:
            raise bad_option("base_options", self.base_options, f"no {shared[0]!r}: set it on smoothgrad itself")
        self.require_int("samples")
        self.require_number("noise", "stdev")


class SmoothGrad(GradientTechnique):
    name = "smoothgrad"
    summary = "an attribution technique averaged over noisy copies of the input (Smilkov et al.)"
    Options = SmoothGradOptions
    splits_rows = False  # the noise is one stream over the rows: every process draws all of it
    map_units = "the base technique's maps, averaged over noisy inputs"

    def attributor(self, ctx: Context, options: SmoothGradOptions) -> Attribute:
        base_class = host.get_technique(options.base)
        accepted = {f.name for f in fields(base_class.Options)}
        inherited = {
            k: v for k, v in (("memory_mb", options.memory_mb), ("max_batch", options.max_batch)) if k in accepted
        }
        base_options = {**inherited, **options.base_options}
        base_class.options(**base_options, target=0)  # bad base options fail before any work
        chunk = "batch_size" in accepted

        if options.layers:
            return self._at_layer(ctx, options, options.layers[0], base_options)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            x = inputs.main
            if not x.is_floating_point():
                raise PyengineError(
                    f"smoothgrad: the inputs are {x.dtype} (token ids?); noise needs floating point inputs: add it "
                    "at a layer (layers=<embedding>) or use integrated-gradients with layers=<embedding>"
                )
            flat = x.flatten(1)
            sigma = options.stdev or options.noise * (flat.amax(1) - flat.amin(1))
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
            total = torch.zeros_like(x, dtype=torch.float64)
            for _ in range(options.samples):
                noise = torch.randn(x.shape, generator=ctx.rng, dtype=x.dtype).to(x.device)
                rows: dict[str, Any] = {"batch_size": x.shape[0]} if chunk else {}
                result = ctx.run(options.base, inputs.with_main(x + sigma * noise), target=t, **rows, **base_options)
                maps = base_attributions(result, options.base, x).double()
                total += maps.square() if options.square else maps
            return (total / options.samples).to(x.dtype)

        return attribute

    def _at_layer(
        self, ctx: Context, options: SmoothGradOptions, layer: str, base_options: dict[str, Any]
    ) -> Attribute:
        """Noise added to ``layer``'s output (its values' range per row sets the scale), the
        base's maps taken at the noisy values: saliency's gradients (with its own options) or
        guided-backprop's, averaged."""
        attributed = Attributed(ctx, layer, self.name, options.position)
        base = host.get_technique(options.base).options(**base_options, target=0)
        size = PassSize(ctx, options)

        def attribute(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
            z = attributed.values(inputs)
            flat = z.flatten(1)
            sigma = options.stdev or options.noise * (flat.amax(1) - flat.amin(1))
            sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).reshape(-1, *([1] * (z.dim() - 1)))
            total = torch.zeros_like(z, dtype=torch.float64)
            for _ in range(options.samples):
                noisy = z + sigma * torch.randn(z.shape, generator=ctx.rng, dtype=z.dtype).to(z.device)
                guided = options.base == GuidedBackprop.name
                grads = attributed.gradients(inputs, noisy, t, size(inputs), guided=guided)
                maps = saliency_maps(grads, noisy, base) if isinstance(base, SaliencyOptions) else grads
                total += maps.double().square() if options.square else maps.double()
            return (total / options.samples).to(z.dtype)

        return attribute


LAYER_NOISE_BASES = (Saliency.name, GuidedBackprop.name)


def base_attributions(result: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    maps = getattr(result, "attributions", None)
    if not isinstance(maps, torch.Tensor) or maps.shape != x.shape:
        raise PyengineError(f"smoothgrad: technique {name!r} gives no attributions shaped like the inputs")
    return maps.to(x.device)
