"""``activation-maximization``: gradient ascent on the input for many objectives at once.

Each objective — a neuron, a channel (mean over positions), a class output, a direction in a
layer, or a weighted sum of these — gets its own image in one batch. Images are pixels or a
decorrelated Fourier spectrum (1/f scaled), squashed into the data's value range; the
regularizers are L2, total variation, jitter, random scale and rotation, and a blur every n
steps. Seeded, on any device, for any number of input channels; hooks are removed after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.figures import gaussian_blur, image_grid, upscale
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, layer_tuple, option

OBJECTIVE_FORMS = (
    "{'layer': L, 'channel': c} (mean over positions), {'layer': L, 'channel': c, 'y': i, 'x': j}, "
    "{'layer': L, 'unit': u} (dense), {'class': k}, {'layer': L, 'direction': [...]}, "
    "or {'terms': [objectives with a 'weight']}"
)


ROWS_SEARCHED = 1000  # rows searched for the best input when stop is 0


@dataclass(frozen=True)
class ActivationMaxOptions(RowOptions):
    stop: int = option(
        0, f"end of the rows searched for each objective's best input; 0: the first {ROWS_SEARCHED} (or all)"
    )
    compare: bool = option(True, "find each objective's best input among rows start..stop (the data's, or inputs)")
    objectives: tuple[dict[str, Any], ...] = option(
        (), "what to maximise: " + OBJECTIVE_FORMS + "; default: every channel of `layers`"
    )
    layers: tuple[str, ...] = option(
        (),
        "one layer for the default objectives; default: the last (N, C, H, W) output every path to the "
        "output goes through",
    )
    channels: tuple[int, ...] = option((), "channels for the default objectives; default: all")
    steps: int = option(128, "optimisation steps")
    lr: float = option(0.05, "Adam learning rate")
    parameterization: str = option("fourier", "'fourier' (decorrelated 1/f spectrum) or 'pixel'")
    l2: float = option(0.0, "L2 penalty on the image")
    tv: float = option(0.0, "total-variation penalty")
    jitter: int = option(2, "pixels of random translation per step")
    scale: float = option(0.05, "random zoom in [1 - scale, 1 + scale] per step")
    rotate: float = option(5.0, "random rotation in [-rotate, rotate] degrees per step")
    blur_every: int = option(0, "pixel parameterization: blur the image every n steps (0: never)")
    blur_sigma: float = option(0.5, "blur std, pixels")

    def validate(self) -> None:
        values = [self.objectives] if isinstance(self.objectives, dict) else list(self.objectives)
        if not all(isinstance(o, dict) and o for o in values):
            raise bad_option("objectives", self.objectives, OBJECTIVE_FORMS)
        self._set("objectives", tuple(values))
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        self._set("channels", (self.channels,) if isinstance(self.channels, int) else tuple(self.channels))
        if self.parameterization not in ("fourier", "pixel"):
            raise bad_option("parameterization", self.parameterization, "'fourier' or 'pixel'")
        self.require_int("steps")
        self.require_int("jitter", "blur_every", minimum=0)
        self.require_number("lr", positive=True)
        self.require_number("l2", "tv", "scale", "rotate", "blur_sigma")


@dataclass(frozen=True, kw_only=True)
class ActivationMaxResult(Result):
    names: tuple[str, ...]
    images: torch.Tensor  # (objectives, C, H, W)
    objective: torch.Tensor  # (objectives,) final objective of each image (no transforms)
    dataset_best: torch.Tensor  # (objectives,) best objective over compare_rows dataset inputs (nan: none)
    beats_dataset: float  # fraction of objectives whose image beats every compared dataset input
    curve: dict[str, torch.Tensor] = field(default_factory=dict)

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per objective: the optimised image's objective, the best compared dataset input's, which wins."""
        rows: list[tuple[object, ...]] = [("objective", "image", "best dataset input", "image wins")]
        for name, value, best in zip(self.names, self.objective.tolist(), self.dataset_best.tolist()):
            wins = "-" if math.isnan(best) else "yes" if value > best else "no"
            rows.append((name, f"{value:.4g}", "-" if math.isnan(best) else f"{best:.4g}", wins))
        return tuple(rows)

    def summary(self) -> str:
        return (
            f"{len(self.names)} objectives optimised; the image beats the best dataset input for "
            f"{self.beats_dataset:.0%} of them"
        )


Objective = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def build_objective(spec: dict[str, Any], ctx: Context) -> tuple[str, Objective, set[str]]:
    """(name, fn(activations by layer, outputs) -> (B,) values, layers it reads)."""
    if "terms" in spec:
        parts = [
            (float(t.get("weight", 1.0)), build_objective({k: v for k, v in t.items() if k != "weight"}, ctx))
            for t in spec["terms"]
        ]
        name = " + ".join(f"{w:g}*{p[0]}" for w, p in parts)
        layers = set().union(*(p[2] for _, p in parts))

        def weighted(acts: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            return torch.stack([w * p[1](acts, out) for w, p in parts]).sum(0)

        return name, weighted, layers
    if "class" in spec:
        k = int(spec["class"])
        return f"class {k}", lambda acts, out: out.reshape(out.shape[0], -1)[:, k], set()
    layer = spec.get("layer")
    if not isinstance(layer, str):
        raise bad_option("objectives", spec, OBJECTIVE_FORMS)
    ctx.module(layer)
    if "direction" in spec:
        direction = torch.as_tensor(spec["direction"], dtype=torch.float32)

        def along(acts: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            a = acts[layer]
            v = direction.to(a.device)
            if a.dim() > 2 and v.numel() == a.shape[1]:  # a channel direction, averaged over positions
                return (a.mean(dim=tuple(range(2, a.dim()))) * v).sum(1)
            return (a.flatten(1) * v.flatten()).sum(1)

        return f"{layer} direction", along, {layer}
    if "unit" in spec:
        u = int(spec["unit"])
        return f"{layer}:{u}", lambda acts, out: acts[layer].flatten(1)[:, u], {layer}
    if "channel" in spec:
        c = int(spec["channel"])
        if "y" in spec and "x" in spec:
            y, x = int(spec["y"]), int(spec["x"])
            return f"{layer} channel {c} at ({y}, {x})", lambda acts, out: acts[layer][:, c, y, x], {layer}
        return f"{layer} channel {c}", lambda acts, out: acts[layer][:, c].flatten(1).mean(1), {layer}
    raise bad_option("objectives", spec, OBJECTIVE_FORMS)


class FourierImage(nn.Module):
    """Images as scaled 2-D spectra (Olah et al.): low frequencies move first."""

    def __init__(
        self, batch: int, channels: int, height: int, width: int, generator: torch.Generator, device: torch.device
    ) -> None:
        super().__init__()
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        frequency = torch.sqrt(fx * fx + fy * fy)
        self.scale: torch.Tensor
        self.register_buffer("scale", (1.0 / frequency.clamp(min=1.0 / max(height, width))).to(device))
        shape = (batch, channels, height, width // 2 + 1, 2)
        self.spectrum = nn.Parameter((0.01 * torch.randn(shape, generator=generator)).to(device))
        self.size = (height, width)

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(spectrum, s=self.size, norm="ortho")


class PixelImage(nn.Module):
    def __init__(
        self, batch: int, channels: int, height: int, width: int, generator: torch.Generator, device: torch.device
    ) -> None:
        super().__init__()
        self.pixels = nn.Parameter((0.01 * torch.randn(batch, channels, height, width, generator=generator)).to(device))

    def forward(self) -> torch.Tensor:
        return self.pixels


def random_transform(images: torch.Tensor, options: ActivationMaxOptions, generator: torch.Generator) -> torch.Tensor:
    """Jitter, then a random zoom and rotation per image (bilinear, border padding)."""
    n = images.shape[0]
    if options.jitter:
        dy, dx = (int(v) for v in torch.randint(-options.jitter, options.jitter + 1, (2,), generator=generator))
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if options.scale or options.rotate:
        zoom = 1 + options.scale * (2 * torch.rand(n, generator=generator) - 1)
        angle = math.radians(options.rotate) * (2 * torch.rand(n, generator=generator) - 1)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
        )
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    return images


class ActivationMaximization(Technique):
    name = "activation-maximization"
    summary = "inputs optimised to maximise units, channels, classes or directions (regularised, many at once)"
    Options = ActivationMaxOptions
    needs_data: ClassVar[bool] = True

    def run(self, ctx: Context, options: ActivationMaxOptions) -> ActivationMaxResult:
        example = self._example(ctx, options)
        specs = options.objectives or self._channel_objectives(ctx, options, example)
        built = [build_objective(spec, ctx) for spec in specs]
        names = tuple(b[0] for b in built)
        layers = sorted(set().union(*(b[2] for b in built)))
        low, high = float(example.min()), float(example.max())
        generator = torch.Generator().manual_seed(ctx.seed)
        n, (channels, height, width) = len(built), example.shape[1:]
        image: FourierImage | PixelImage = (
            FourierImage(n, channels, height, width, generator, ctx.device)
            if options.parameterization == "fourier"
            else PixelImage(n, channels, height, width, generator, ctx.device)
        )
        optimiser = torch.optim.Adam(image.parameters(), lr=options.lr)

        def squash(raw: torch.Tensor) -> torch.Tensor:
            return low + (high - low) * torch.sigmoid(raw)

        trace = []
        with ctx.progress(options.steps, f"{self.name} ({len(built)} objectives)") as bar:
            for step in range(options.steps):
                optimiser.zero_grad()
                x = squash(image())
                acts, out = self._forward(ctx, layers, random_transform(x, options, generator))
                values = torch.stack([fn(acts, out)[k] for k, (_, fn, _) in enumerate(built)])
                loss = -values.sum() + options.l2 * x.square().sum() + options.tv * total_variation(x)
                loss.backward()
                optimiser.step()
                trace.append(float(values.detach().mean()))
                if options.blur_every and options.parameterization == "pixel" and (step + 1) % options.blur_every == 0:
                    with torch.no_grad():
                        if isinstance(image, PixelImage):
                            image.pixels.copy_(gaussian_blur(image.pixels, options.blur_sigma))
                bar.update()
        with torch.no_grad():
            final_images = squash(image()).detach()
            acts, out = self._forward(ctx, layers, final_images, grad=False)
            final = torch.stack([fn(acts, out)[k] for k, (_, fn, _) in enumerate(built)]).cpu()
        best = self._dataset_best(ctx, options, built, layers)
        beats = float((final > best).double().mean()) if not best.isnan().all() else float("nan")
        figures = (
            Figure(
                "Activation maximization: one image per objective",
                caption="left to right, top to bottom: " + "; ".join(names),
                image=_grid(final_images.cpu()),
            ),
            Figure("Mean objective per step", lines={"objective": trace}, xlabel="step", ylabel="objective"),
        )
        return ActivationMaxResult(
            names=names,
            images=final_images.cpu(),
            objective=final,
            dataset_best=best,
            beats_dataset=beats,
            curve={"mean_objective": torch.tensor(trace)},
            figures=figures,
        )

    def _example(self, ctx: Context, options: ActivationMaxOptions) -> torch.Tensor:
        """The first block of rows: the image shape and value range."""
        rows = ctx.rows(
            options.batch_size, start=options.start, stop=options.stop, at_most=ROWS_SEARCHED, technique=self.name
        )
        first = next(iter(rows))
        example = first.require_inputs().cpu()
        if example.dim() != 4 or not example.is_floating_point() or first.extra:
            raise PyengineError(
                f"{self.name}: optimises an image passed alone to the model, (N, C, H, W) floats; these inputs are "
                f"{example.dtype} of shape {tuple(example.shape)}"
                + (f" with {', '.join(first.extra)}" if first.extra else "")
                + " (token ids have no pixels to optimise: use max-patches for the texts that drive a feature)"
            )
        return example

    def _channel_objectives(
        self, ctx: Context, options: ActivationMaxOptions, example: torch.Tensor
    ) -> list[dict[str, Any]]:
        layer = options.layers[0] if options.layers else ctx.spatial_layer(self.name)
        acts, _ = self._forward(ctx, [layer], example[:1].to(ctx.device), grad=False)
        width = acts[layer].shape[1]
        channels = options.channels or tuple(range(width))
        if max(channels) >= width:
            raise PyengineError(f"{self.name}: channel {max(channels)} is out of range: {layer!r} has {width} channels")
        return [{"layer": layer, "channel": c} for c in channels]

    def _forward(
        self, ctx: Context, layers: list[str], x: torch.Tensor, grad: bool = True
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with ctx.record(layers, grad=grad) as seen, torch.set_grad_enabled(grad):
            out = ctx.model(x)
            acts = {layer: seen[layer] for layer in layers}
        return acts, out

    def _dataset_best(
        self, ctx: Context, options: ActivationMaxOptions, built: list[Any], layers: list[str]
    ) -> torch.Tensor:
        best = torch.full((len(built),), float("nan"))
        if not options.compare:
            return best
        best.fill_(float("-inf"))
        rows = ctx.rows(
            options.batch_size, start=options.start, stop=options.stop, at_most=ROWS_SEARCHED, technique=self.name
        )
        with torch.no_grad():
            for block in rows:
                acts, out = self._forward(ctx, layers, block.require_inputs(), grad=False)
                values = torch.stack([fn(acts, out) for _, fn, _ in built]).amax(1).cpu()
                best = torch.maximum(best, values)
        return best


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()


def _grid(images: torch.Tensor) -> torch.Tensor:
    shown = images[:32]
    shown = (shown - shown.amin((1, 2, 3), keepdim=True)) / (
        shown.amax((1, 2, 3), keepdim=True) - shown.amin((1, 2, 3), keepdim=True)
    ).clamp(min=1e-12)
    if shown.shape[1] not in (1, 3):
        shown = shown.mean(1, keepdim=True)
    return image_grid(upscale(shown, 64), columns=8)
