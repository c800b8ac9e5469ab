"""Faithfulness of attribution maps: deletion/insertion curves (RISE) and the pointing game.

``deletion_insertion`` and ``pointing_game`` take any attribution map; the ``faithfulness``
technique runs attribution techniques on held-out images and scores each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from pyengine import host
from pyengine.attribution import AttributionOptions, normalise_target, resolve_targets, samples_per_pass, target_scores
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.figures import gaussian_blur
from pyengine.inputs import ModelInputs
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, option


def attribution_techniques() -> list[str]:
    """Every registered attribution technique (any plugin's)."""
    return [name for name, technique in host.techniques().items() if technique.attribution]


def pixel_scores(attributions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, P) importance per pixel: channels summed for (B, C, ...) inputs, else per feature."""
    maps = attributions.float()
    if inputs.dim() >= 3:
        maps = maps.sum(1)
    return maps.reshape(maps.shape[0], -1)


def pointing_game(
    attributions: torch.Tensor, inputs: torch.Tensor, boxes: torch.Tensor, tolerance: float = 0.0
) -> torch.Tensor:
    """(B,) bool: the map's maximum (channels summed; first in row-major order on ties) lies in the
    box (x0, y0, x1, y1), taking the pixel's centre, with ``tolerance`` pixels of slack."""
    if inputs.dim() != 4:
        raise PyengineError(f"pointing game needs (N, C, H, W) images, got {tuple(inputs.shape)}")
    width = inputs.shape[-1]
    peak = pixel_scores(attributions, inputs).argmax(1)
    y, x = (peak // width).double() + 0.5, (peak % width).double() + 0.5
    b = boxes.double().to(peak.device)
    return (
        (x >= b[:, 0] - tolerance)
        & (x <= b[:, 2] + tolerance)
        & (y >= b[:, 1] - tolerance)
        & (y <= b[:, 3] + tolerance)
    ).cpu()


def deletion_insertion(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 20,
    samples: int = 256,
    probability: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE curves, (B, steps + 1) each: the target score as the most important pixels are
    removed (set to 0) from the input, and as they are inserted into a blurred copy of it.
    Step k changes the top round(k * P / steps) of the P pixels; ``samples`` images per pass."""
    b = inputs.shape[0]
    pixels = pixel_scores(attributions, inputs)
    order = pixels.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    counts = [round(k * order.shape[1] / steps) for k in range(steps + 1)]
    canvas = (
        gaussian_blur(inputs, sigma=max(1.0, inputs.shape[-1] / 16))
        if inputs.dim() in (3, 4)
        else torch.zeros_like(inputs)
    )
    pixel_shape = (b, 1, *inputs.shape[2:]) if inputs.dim() >= 3 else inputs.shape
    curves = torch.zeros(2, b, steps + 1, dtype=torch.float64)
    jobs = [(kind, k) for kind in (0, 1) for k in range(steps + 1)]
    per_pass = max(1, samples // b)
    with torch.inference_mode():
        for first in range(0, len(jobs), per_pass):
            chunk = jobs[first : first + per_pass]
            images = []
            for kind, k in chunk:
                changed = (rank < counts[k]).to(inputs.device).reshape(pixel_shape)
                images.append(
                    torch.where(changed, torch.zeros_like(inputs), inputs)
                    if kind == 0
                    else torch.where(changed, inputs, canvas)
                )
            output = model(torch.cat(images))
            output = output.softmax(-1) if probability else output
            scores = target_scores(output, targets.reshape(-1, 1).repeat(len(chunk), 1)).reshape(len(chunk), b)
            for (kind, k), row in zip(chunk, scores.double().cpu()):
                curves[kind, :, k] = row
    return curves[0], curves[1]


def area_under(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of (B, K + 1) curves over fractions 0 .. 1."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


DEFAULT_IMAGES = 200  # images scored when stop is 0


@dataclass(frozen=True)
class FaithfulnessOptions(RowOptions):
    stop: int = option(0, f"end of the images scored (exclusive); 0: the first {DEFAULT_IMAGES} (or all, if fewer)")
    batch_size: int = option(50, "images per attribution call")
    techniques: tuple[str, ...] = option(
        (), "attribution techniques scored; default: every registered one that applies to the model"
    )
    technique_options: dict[str, dict[str, Any]] = option({}, "technique name -> its options")
    target: Any = option("label", "the explained class: 'label', 'predicted' or an index")
    curves: bool = option(True, "deletion/insertion curves (the pointing game needs only the maps)")
    steps: int = option(20, "deletion/insertion steps")
    score: str = option("probability", "curve score: softmax 'probability' or raw 'logit'")
    tolerance: float = option(0.0, "pointing-game slack, pixels")
    memory_mb: float = option(0.0, "budget for internal passes, MiB; 0: half the free GPU memory, or 64 MiB on CPU")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.techniques, str):
            self._set("techniques", (self.techniques,))
        self._set("techniques", tuple(self.techniques))
        known = attribution_techniques()
        unknown = [name for name in self.techniques if name not in known]
        if unknown:
            raise bad_option("techniques", unknown[0], "registered attribution techniques: " + ", ".join(known))
        if not isinstance(self.technique_options, dict):
            raise bad_option("technique_options", self.technique_options, "a table: technique name -> options")
        self._set("target", normalise_target(self.target))
        if isinstance(self.target, torch.Tensor):
            raise bad_option("target", self.target.tolist(), "'label', 'predicted' or one class index")
        self.require_int("steps")
        self.require_number("tolerance", "memory_mb")
        if self.score not in ("probability", "logit"):
            raise bad_option("score", self.score, "'probability' or 'logit'")


@dataclass(frozen=True, kw_only=True)
class FaithfulnessResult(Result):
    images: int
    pointing: dict[str, float]  # technique -> fraction of images whose maximum is in the box
    deletion_auc: dict[str, float]  # lower is better
    insertion_auc: dict[str, float]  # higher is better
    deletion_curves: dict[str, torch.Tensor]  # technique -> (steps + 1,) mean curve
    insertion_curves: dict[str, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)  # default techniques that refused: name -> why

    def lines(self) -> list[str]:
        out = [
            f"{self.images} held-out images; pointing game = fraction whose attribution maximum lies in the "
            "object's box; deletion AUC (lower is better), insertion AUC (higher is better)"
        ]
        for name in sorted(set(self.pointing) | set(self.deletion_auc)):
            parts = [f"pointing {self.pointing[name]:.3f}" if name in self.pointing else "pointing n/a"]
            if name in self.deletion_auc:
                parts.append(f"deletion {self.deletion_auc[name]:.3f}, insertion {self.insertion_auc[name]:.3f}")
            out.append(f"{name}: " + ", ".join(parts))
        out += [f"{name}: skipped: {why}" for name, why in self.skipped.items()]
        return out

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per technique: pointing game, deletion AUC (lower is better), insertion AUC (higher is better)."""
        names = sorted(set(self.pointing) | set(self.deletion_auc))
        rows: list[tuple[object, ...]] = [("technique", "pointing game", "deletion AUC", "insertion AUC")]
        for name in names:
            rows.append(
                (
                    name,
                    round(self.pointing[name], 3) if name in self.pointing else "n/a",
                    round(self.deletion_auc[name], 3) if name in self.deletion_auc else "n/a",
                    round(self.insertion_auc[name], 3) if name in self.insertion_auc else "n/a",
                )
            )
        return tuple(rows)

    def summary(self) -> str:
        best = max(self.pointing, key=self.pointing.__getitem__) if self.pointing else ""
        head = f"pointing game best {best} {self.pointing[best]:.3f}" if best else "no boxes: pointing game skipped"
        return (
            f"faithfulness of {len(self.deletion_auc) or len(self.pointing)} techniques on {self.images} images: {head}"
        )


class Faithfulness(Technique):
    name = "faithfulness"
    summary = "pointing game and deletion/insertion AUC of attribution techniques on held-out images"
    Options = FaithfulnessOptions
    needs_data: ClassVar[bool] = True

    def run(self, ctx: Context, options: FaithfulnessOptions) -> FaithfulnessResult:
        inputs, targets, boxes = self._rows(ctx, options)
        pointing: dict[str, float] = {}
        deletion: dict[str, float] = {}
        insertion: dict[str, float] = {}
        deletion_curves: dict[str, torch.Tensor] = {}
        insertion_curves: dict[str, torch.Tensor] = {}
        budget = AttributionOptions(memory_mb=options.memory_mb, target=0)
        samples = samples_per_pass(
            ctx, ModelInputs(inputs), budget, backward=False, extra_bytes=2 * inputs[:1].numel() * inputs.element_size()
        )  # each curve image and its mask
        names = options.techniques or tuple(attribution_techniques())
        skipped: dict[str, str] = {}  # default techniques that refused this model
        # Two steps per technique: its maps (its own bar shows beside this one), then the curves.
        with ctx.progress(2 * len(names), f"{self.name} (maps, curves per technique)") as bar:
            for name in names:
                try:
                    maps = self._attributions(ctx, name, options, inputs, targets)
                except PyengineError as error:
                    if options.techniques:  # asked for by name: its refusal is the answer
                        raise
                    skipped[name] = str(error)  # a default that does not apply to this model
                    bar.update(2)
                    continue
                bar.update(1)
                # Several processes score their parts of the rows; the means are over every row.
                if boxes is not None:
                    hits = ctx.gather_rows(pointing_game(maps, inputs, boxes, options.tolerance).double())
                    pointing[name] = float(hits.mean())
                if options.curves:
                    removed, inserted = deletion_insertion(
                        ctx.forward,
                        inputs,
                        maps,
                        targets,
                        steps=options.steps,
                        samples=samples,
                        probability=options.score == "probability",
                    )
                    removed, inserted = ctx.gather_rows(removed), ctx.gather_rows(inserted)
                    deletion[name], insertion[name] = (
                        float(area_under(removed).mean()),
                        float(area_under(inserted).mean()),
                    )
                    deletion_curves[name], insertion_curves[name] = removed.mean(0), inserted.mean(0)
                bar.update(1)
        if skipped and len(skipped) == len(names):
            raise PyengineError(
                f"{self.name}: no attribution technique applies to this model; {next(iter(skipped.values()))}"
            )
        figures = []
        if options.curves:
            x = [k / options.steps for k in range(options.steps + 1)]
            for title, curves in (
                ("Deletion: score as the top pixels are removed", deletion_curves),
                ("Insertion: score as the top pixels are restored", insertion_curves),
            ):
                figures.append(
                    Figure(
                        title,
                        lines={k: v.tolist() for k, v in curves.items()},
                        x=x,
                        xlabel="fraction of pixels",
                        ylabel=f"target {options.score}",
                    )
                )
        return FaithfulnessResult(
            images=int(ctx.all_reduce(torch.tensor(inputs.shape[0]))),
            pointing=pointing,
            deletion_auc=deletion,
            insertion_auc=insertion,
            deletion_curves=deletion_curves,
            insertion_curves=insertion_curves,
            skipped=skipped,
            figures=tuple(figures),
        )

    def _rows(
        self, ctx: Context, options: FaithfulnessOptions
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        source = ctx.rows(
            options.batch_size,
            start=options.start,
            stop=options.stop,
            at_most=DEFAULT_IMAGES,
            technique=self.name,
            split=True,
        )
        rows = source.all()
        inputs = rows.require_inputs()
        if inputs.dim() not in (3, 4) or not inputs.is_floating_point() or rows.extra:
            raise PyengineError(
                f"{self.name}: deletion/insertion of pixels and the pointing game need images (N, C, H, W) passed "
                f"alone to the model; got {inputs.dtype} inputs of shape {tuple(inputs.shape)}"
                + (f" with {', '.join(rows.extra)}" if rows.extra else "")
            )
        targets = resolve_targets(options.target, ctx, rows.model_inputs(), rows.labels, source.offset)[:, 0]
        return inputs, targets, rows.boxes

    def _attributions(
        self, ctx: Context, name: str, options: FaithfulnessOptions, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        technique = host.get_technique(name)
        given = dict(options.technique_options.get(name, {}))
        if "target" in given:
            raise bad_option("technique_options", options.technique_options, f"no target for {name}: set it here")
        accepted = {f.name for f in fields(technique.Options)}
        shared = {
            k: v for k, v in (("memory_mb", options.memory_mb), ("batch_size", options.batch_size)) if k in accepted
        }
        result = ctx.run(name, inputs, show_progress=True, **{**shared, **given, "target": targets})
        maps = getattr(result, "attributions", None)
        if not isinstance(maps, torch.Tensor) or maps.shape != inputs.shape:
            raise PyengineError(f"faithfulness: technique {name!r} gives no attributions shaped like the inputs")
        return maps.to(inputs.device)
