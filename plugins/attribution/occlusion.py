"""``occlusion``: slide a window over the input, replace it by a baseline, record the drop.

The attribution of an element is the mean output drop over the windows covering it —
Captum's ``Occlusion`` definition, so maps are equal for equal window/stride/baseline. The
occluded batches are built and the drops scattered back by the native ops
``occlusion_batch`` / ``occlusion_accumulate``; one forward pass per batch of windows serves
every target, and batches are sized from a memory budget.

Token ids (N, T): windows of tokens (default one token) are replaced by a baseline token id
(``baseline=<id>``, e.g. the pad id); padding (attention mask 0) is never occluded and scores
0. Maps are floating point whatever the inputs' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pyengine import ops
from pyengine.attribution import (
    Attributed,
    AttributionOptions,
    AttributionResult,
    make_result,
    memory_budget_bytes,
    run_attribution,
    samples_per_pass,
    target_scores,
)
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.figures import gaussian_blur
from pyengine.inputs import ModelInputs, select_output
from pyengine.plugins.attribution import _incremental as incremental
from pyengine.technique import Technique, bad_option, layer_tuple, option

BASELINE_FORMS = "a number, 'mean', 'blur', or a tensor broadcastable to one input"
WINDOW_FRACTION = 8  # default window: 1/8 of each spatial side, all channels


def _int_tuple(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int) else value
    if (
        not isinstance(values, (tuple, list))
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    ):
        raise bad_option(name, value, "a positive integer or a tuple of them, e.g. (3, 8, 8) or (8, 8)")
    return tuple(values)


@dataclass(frozen=True)
class OcclusionOptions(AttributionOptions):
    window: Any = option(
        None, "window per non-batch dim, e.g. (3, 8, 8); (8, 8) covers all channels; default 1/8 of H, W"
    )
    stride: Any = option(None, "int or per dim; default half the window")
    baseline: Any = option("mean", BASELINE_FORMS + "; 'mean': each input's per-channel mean (Captum's default is 0)")
    output: str = option("logit", "score read from the model: 'logit' (the raw output, as Captum) or 'probability'")
    layout: str = option(
        "auto", "occluded batches: 'auto' (channels last for images into Conv2d models), 'channels-last', 'as-given'"
    )
    layers: tuple[str, ...] = option(
        (), "one layer: occlude its output instead (Captum's LayerFeatureAblation; (N, T, D): a token at a time)"
    )
    sweep: str = option(
        "auto",
        "'auto': incremental (recompute only what a window changes; exact) where the model allows, else plain; "
        "'incremental' (an error where it cannot run) or 'plain' (one full forward per window)",
    )
    full_above: float = option(0.5, "incremental: run a layer in full once a window changes more than this of its map")
    field_cap: float = option(
        1.0, "approximate (incremental): cap each changed region at this fraction of its map's side (1: exact)"
    )
    drilldown: float = option(
        0.0, "approximate: sweep at twice the stride, then at the stride only this most sensitive fraction (0: off)"
    )

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers, single=True))
        self._set("window", _int_tuple(self.window, "window"))
        self._set("stride", _int_tuple(self.stride, "stride"))
        if isinstance(self.baseline, str):
            if self.baseline not in ("mean", "blur"):
                raise bad_option("baseline", self.baseline, BASELINE_FORMS)
        elif isinstance(self.baseline, bool) or not isinstance(self.baseline, (int, float, torch.Tensor)):
            try:
                self._set("baseline", torch.as_tensor(self.baseline, dtype=torch.float32))
            except (TypeError, ValueError, RuntimeError):
                raise bad_option("baseline", self.baseline, BASELINE_FORMS) from None
        if self.output not in ("logit", "probability"):
            raise bad_option("output", self.output, "'logit' or 'probability'")
        if self.layout not in ("auto", "channels-last", "as-given"):
            raise bad_option("layout", self.layout, "'auto', 'channels-last' or 'as-given'")
        if self.sweep not in ("auto", "incremental", "plain"):
            raise bad_option("sweep", self.sweep, "'auto', 'incremental' or 'plain'")
        for name in ("full_above", "field_cap"):
            if not 0 < getattr(self, name) <= 1:
                raise bad_option(name, getattr(self, name), "a number in (0, 1]")
        if not 0 <= self.drilldown < 1:
            raise bad_option("drilldown", self.drilldown, "a fraction in [0, 1)")


def sweep_geometry(
    shape: tuple[int, ...], window: tuple[int, ...] | None, stride: tuple[int, ...] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Full-rank window and stride for one input of ``shape``. Shorter tuples cover the
    leading dimensions whole (``(8, 8)`` on (C, H, W) is ``(C, 8, 8)``)."""
    dims = len(shape)
    if window is None:
        spatial = min(2, dims - 1) if dims > 1 else 1
        window = tuple(max(1, s // WINDOW_FRACTION) for s in shape[dims - spatial :])
    if len(window) > dims:
        raise bad_option("window", window, f"at most {dims} sizes for inputs of shape {shape}")
    lead = dims - len(window)
    full_window = tuple(shape[:lead]) + window
    if stride is None:
        stride = tuple(max(1, w // 2) for w in window)
    elif len(stride) == 1 and len(window) > 1:
        stride = stride * len(window)
    if len(stride) > dims:
        raise bad_option("stride", stride, f"at most {dims} sizes for inputs of shape {shape}")
    full_stride = full_window[: dims - len(stride)] + stride
    for d in range(dims):
        if full_window[d] > shape[d]:
            raise bad_option("window", window, f"sizes that fit the input {shape}")
        if full_window[d] < shape[d] and full_stride[d] > full_window[d]:
            raise bad_option(
                "stride", stride, f"steps no larger than the window {full_window}, or some inputs are never occluded"
            )
    return full_window, full_stride


def coverage(shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """How many windows cover each element (the outer product of per-dimension counts)."""
    total = torch.ones((), dtype=torch.float64)
    for size, w, s in zip(shape, window, stride):
        starts = torch.arange(math.ceil((size - w) / s) + 1) * s
        position = torch.arange(size).unsqueeze(1)
        per_dim = ((position >= starts) & (position < starts + w)).sum(1).double()
        total = total.unsqueeze(-1) * per_dim
    return total


def baseline_tensor(baseline: Any, inputs: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """The values that replace occluded elements: (*S) shared, or (B, *S) per input."""
    shape = inputs.shape[1:]
    if baseline == "mean":  # per channel over positions; per input over features for (N, F)
        axes = tuple(range(2, inputs.dim())) if inputs.dim() > 2 else (1,)
        return inputs.mean(dim=axes, keepdim=True).expand_as(inputs).contiguous()
    if baseline == "blur":
        if inputs.dim() not in (3, 4):
            raise PyengineError(
                f"occlusion: baseline='blur' needs (N, C, H, W) or (N, C, L) inputs, got {tuple(inputs.shape)}"
            )
        return gaussian_blur(inputs, sigma=max(1.0, max(window[1:]) / 2))
    value = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    if value.dim() == inputs.dim() and value.shape[0] == inputs.shape[0] and value.shape[0] > 1:
        return value.expand_as(inputs).contiguous()
    try:
        return torch.broadcast_to(value, shape).contiguous()
    except RuntimeError:
        raise PyengineError(
            f"occlusion: baseline has shape {tuple(value.shape)}; expected a number or a shape "
            f"broadcastable to one input {tuple(shape)} (or {tuple(inputs.shape)})"
        ) from None


@dataclass(frozen=True, kw_only=True)
class OcclusionResult(AttributionResult):
    window: tuple[int, ...]
    stride: tuple[int, ...]
    windows: int  # windows per input
    samples_per_pass: int
    sweep: str = "plain"  # which sweep ran, and why
    flops_ratio: float = 1.0  # multiply-adds of the sweep that ran / the plain sweep's

    def scalars(self) -> dict[str, Any]:
        out = super().scalars()
        out.update(window=str(self.window), stride=str(self.stride))
        return out


class Occlusion(Technique):
    name = "occlusion"
    summary = "mean drop of the target output when a sliding window is replaced by a baseline (Zeiler & Fergus)"
    Options = OcclusionOptions
    needs_data: ClassVar[bool] = True
    explains_inputs: ClassVar[bool] = True
    attribution: ClassVar[bool] = True

    def run(self, ctx: Context, options: OcclusionOptions) -> OcclusionResult:
        geometry: dict[str, Any] = {}
        attributed = Attributed(ctx, options.layers[0] if options.layers else None, self.name, options.position)

        def sweep(inputs: ModelInputs, targets: torch.Tensor) -> torch.Tensor:
            if not options.layers and not inputs.main.is_floating_point():
                return token_occlusion(ctx, inputs, targets, options, geometry)
            x = attributed.values(inputs)
            if not geometry:
                tokens = bool(options.layers) and x.dim() == 3 and not inputs.main.is_floating_point()
                default = (1, x.shape[2]) if tokens and options.window is None else None
                window, stride = sweep_geometry(
                    tuple(x.shape[1:]), options.window or default, options.stride or default
                )
                cover = coverage(tuple(x.shape[1:]), window, stride).to(x.device)
                windows = math.prod(math.ceil((s - w) / st) + 1 for s, w, st in zip(x.shape[1:], window, stride))
                geometry.update(
                    window=window,
                    stride=stride,
                    cover=cover,
                    windows=windows,
                    samples=samples_per_pass(
                        ctx, inputs, options, backward=False, extra_bytes=x[:1].numel() * x.element_size()
                    ),
                )
            maps = None
            if options.sweep != "plain":
                maps = incremental_maps(ctx, attributed, inputs, x, targets, options, geometry)
            if maps is None:
                maps = occlusion_sweep(ctx, attributed, inputs, x, targets, options, geometry)
            if options.layers and inputs.mask is not None and x.dim() == 3 and x.shape[1] == inputs.mask.shape[1]:
                maps = maps * (inputs.mask != 0)[:, None, :, None].to(maps.device, maps.dtype)  # padding: 0
            return maps

        attributions, targets, index, shown = run_attribution(ctx, options, self.name, sweep, multi_target=True)
        return make_result(
            self.name,
            attributions,
            targets,
            index,
            shown,
            OcclusionResult,
            "drop of the target score when the pixel is occluded (mean over its windows)",
            window=geometry["window"],
            stride=geometry["stride"],
            windows=geometry["windows"],
            samples_per_pass=geometry["samples"],
            sweep=geometry.get("sweep", "plain"),
            flops_ratio=geometry.get("flops_ratio", 1.0),
        )


def memory_order(x: torch.Tensor, options: OcclusionOptions, model: torch.nn.Module) -> tuple[int, ...]:
    """The order of the non-batch dims in which occluded batches are laid out: channels last
    for images fed to a model with 2-D convolutions (oneDNN and cuDNN run those about twice
    as fast as NCHW here, see benchmarks/attribution.py), else as given."""
    wanted = options.layout == "channels-last" or (
        options.layout == "auto" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    )
    return (1, 2, 0) if wanted and x.dim() == 4 else tuple(range(x.dim() - 1))


def occlusion_sweep(
    ctx: Context,
    attributed: Attributed,
    inputs: ModelInputs,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: OcclusionOptions,
    geometry: dict[str, Any],
) -> torch.Tensor:
    """(B, T, *S) maps for inputs x (B, *S) and targets (B, T): one forward per batch of windows.

    The native ops see the inputs with their dims in memory order (e.g. H, W, C), so a batch
    comes out in that layout and is handed to the model as a strided view of shape (N, *S).
    """
    samples, n_windows = geometry["samples"], geometry["windows"]
    order = memory_order(x, options, ctx.model)
    to_memory = (0, *(d + 1 for d in order))
    to_logical = tuple(to_memory.index(d) for d in range(x.dim()))
    window = tuple(geometry["window"][d] for d in order)
    stride = tuple(geometry["stride"][d] for d in order)
    baseline = baseline_tensor(options.baseline, x, geometry["window"])
    baseline = baseline.permute(to_memory) if baseline.dim() == x.dim() else baseline.permute(order)
    laid_out = x.permute(to_memory).contiguous()
    sums = torch.zeros(x.shape[0], targets.shape[1], *laid_out.shape[1:], dtype=torch.float64, device=x.device)
    # recording a layer watches version counters, which inference tensors do not have
    with torch.inference_mode() if attributed.layer is None else torch.no_grad():
        for rows in range(0, x.shape[0], samples):  # more inputs than one pass holds: split them
            xs, ts = laid_out[rows : rows + samples], targets[rows : rows + samples]
            these = inputs.take(torch.arange(rows, rows + xs.shape[0]))
            bs = baseline[rows : rows + samples] if baseline.dim() == x.dim() else baseline
            per_pass = max(1, samples // xs.shape[0])
            reference = attributed_score(attributed, these, xs.permute(to_logical), ts, options.output)
            part = sums[rows : rows + samples]
            for first in range(0, n_windows, per_pass):
                count = min(per_pass, n_windows - first)
                occluded = ops.occlusion_batch(xs, bs, window, stride, first, count).permute(to_logical)
                repeated = these.take(torch.arange(xs.shape[0]).repeat(count))
                scores = attributed_score(attributed, repeated, occluded, ts.repeat(count, 1), options.output)
                drops = reference.unsqueeze(0) - scores.reshape(count, *ts.shape)
                ops.occlusion_accumulate(part, drops, window, stride, first)
    maps = sums.permute(0, 1, *(to_logical[d] + 1 for d in range(1, x.dim())))
    return (maps / geometry["cover"]).to(x.dtype)


def incremental_maps(
    ctx: Context,
    attributed: Attributed,
    inputs: ModelInputs,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: OcclusionOptions,
    geometry: dict[str, Any],
) -> torch.Tensor | None:
    """The maps by the incremental sweep (``_incremental``), or None (``geometry["sweep"]`` says
    why) where it cannot run: then the plain sweep runs; with sweep='incremental', an error."""
    reason = ""
    if attributed.layer is not None or inputs.extra or x.dim() != 4 or not x.is_floating_point():
        reason = "needs images (N, C, H, W) passed alone to the model"
    elif "graph" not in geometry:
        try:
            geometry["graph"] = incremental.trace(ctx.model)
        except incremental.NotIncremental as error:
            geometry["graph"] = None
            reason = str(error)
    elif geometry["graph"] is None:
        reason = geometry["sweep"].removeprefix("plain: ")
    plan = None
    if not reason:
        try:
            plan = _plan(geometry, x[:1], options, options.field_cap)  # also: the cache one image needs
        except incremental.NotIncremental as error:
            reason = str(error)
    if plan is None:
        if options.sweep == "incremental":
            raise PyengineError(f"occlusion: sweep='incremental' cannot run on this model: {reason}")
        geometry["sweep"] = f"plain: {reason}"
        return None
    # the cached values of every node: at most half the memory budget, in blocks of images
    budget = memory_budget_bytes(ctx.device, options.memory_mb)
    block = max(1, int(budget // 2 // max(plan.cache_bytes(), 1)))
    maps, ratios = [], []
    try:
        for first in range(0, x.shape[0], block):
            rows = torch.arange(first, min(first + block, x.shape[0]))
            xs, these, ts = x[rows.to(x.device)], inputs.take(rows), targets[rows.to(targets.device)]
            if options.drilldown:
                part, ratio = _drilldown(ctx, attributed, these, xs, ts, options, geometry)
            else:
                plan = plan if first == 0 and len(rows) == 1 else _plan(geometry, xs, options, options.field_cap)
                part, ratio = _incremental_pass(ctx, attributed, these, xs, ts, options, geometry, plan)
            maps.append(part)
            ratios.append(ratio)
    except (RuntimeError, incremental.NotIncremental) as error:  # an op combination the plan did not foresee
        if options.sweep == "incremental" or isinstance(error, torch.OutOfMemoryError):
            raise
        geometry["sweep"] = (
            f"plain: the incremental sweep failed ({type(error).__name__}: {str(error).splitlines()[0]})"
        )
        geometry["graph"] = None
        return None
    if not options.drilldown:
        mode = "exact" if options.field_cap >= 1 else f"approximate: field_cap={options.field_cap:g}"
        full = f"; in full from {plan.first_full}" if plan.first_full else ""
        geometry["sweep"] = f"incremental ({mode}){full}"
    geometry["flops_ratio"] = sum(ratios) / len(ratios)
    return torch.cat(maps)


def _window_grid(shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """(windows, 3) channel, row, column starts of Captum's grid, numbered row-major."""
    grids = [torch.arange(math.ceil((s - w) / st) + 1) * st for s, w, st in zip(shape, window, stride)]
    return torch.stack([g.flatten() for g in torch.meshgrid(*grids, indexing="ij")], 1)


def _plan(geometry: dict[str, Any], x: torch.Tensor, options: OcclusionOptions, cap: float) -> incremental.Plan:
    window = geometry["window"]
    corners = _window_grid(tuple(x.shape[1:]), window, geometry["stride"]).to(x.device)
    height, width = x.shape[2:]
    starts = torch.stack([corners[:, 1].clamp(max=height - window[1]), corners[:, 2].clamp(max=width - window[2])], 1)
    return incremental.make_plan(geometry["graph"], x, starts, (window[1], window[2]), options.full_above, cap)


def _first_regions(
    x: torch.Tensor,
    baseline: torch.Tensor,
    images: torch.Tensor,
    corners: torch.Tensor,
    starts: torch.Tensor,
    window: tuple[int, ...],
) -> torch.Tensor:
    """(entries, C, h, w): each entry's input box, the window's elements replaced by the baseline."""
    h, w = window[1], window[2]
    rows = starts[:, :1] + torch.arange(h, device=x.device)  # (entries, h)
    cols = starts[:, 1:] + torch.arange(w, device=x.device)
    crop = x.permute(0, 2, 3, 1)[images[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    base = baseline.permute(0, 2, 3, 1)[images[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    channel = torch.arange(x.shape[1], device=x.device)
    inside = (channel >= corners[:, :1]) & (channel < corners[:, :1] + window[0])  # (entries, C)
    in_rows = (rows >= corners[:, 1:2]) & (rows < corners[:, 1:2] + window[1])
    in_cols = (cols >= corners[:, 2:3]) & (cols < corners[:, 2:3] + window[2])
    mask = inside[:, :, None, None] & in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return torch.where(mask, base, crop)


def _incremental_pass(
    ctx: Context,
    attributed: Attributed,
    inputs: ModelInputs,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: OcclusionOptions,
    geometry: dict[str, Any],
    plan: incremental.Plan,
    chosen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """(B, T, C, H, W) summed drops over the windows / coverage, and the FLOPs ratio to plain.
    ``chosen``: (windows, B) bool, the (window, image) pairs to run (the others add nothing)."""
    window, stride = geometry["window"], geometry["stride"]
    corners = _window_grid(tuple(x.shape[1:]), window, stride).to(x.device)
    n_windows, n = corners.shape[0], x.shape[0]
    baseline = baseline_tensor(options.baseline, x, window)
    baseline = baseline.expand_as(x) if baseline.dim() == x.dim() - 1 else baseline
    sweep = incremental.Sweep(plan, n)
    sums = torch.zeros(n, targets.shape[1], *x.shape[1:], dtype=torch.float64, device=x.device)
    cover = torch.zeros(n, 1, *x.shape[1:], dtype=torch.float64, device=x.device)
    per_entry, cached = plan.bytes_per_window(), plan.cache_bytes()
    budget = memory_budget_bytes(ctx.device, options.memory_mb)
    entries = max(1, int((budget - cached) // max(per_entry, 1)))
    entries = min(entries, options.max_batch) if options.max_batch else entries
    step = max(1, entries // n)
    pairs = chosen if chosen is not None else torch.ones(n_windows, n, dtype=torch.bool, device=x.device)
    box_starts = next(s.box.starts for s in plan.steps.values() if s.kind == "input" and s.box is not None)
    with torch.inference_mode():
        reference = attributed_score(attributed, inputs, x, targets, options.output)
        for first in range(0, n_windows, step):
            count = min(step, n_windows - first)
            run = pairs[first : first + count].reshape(-1).nonzero()[:, 0]  # entries e = window * n + image
            drops = torch.zeros(count, n, targets.shape[1], dtype=torch.float64, device=x.device)
            if run.numel():
                windows, images = first + run // n, run % n
                region = _first_regions(x, baseline, images, corners[windows], box_starts[windows], window)
                out = select_output(sweep.run(images, windows, region), ctx.output, type(ctx.model).__name__)
                scores = target_scores(out.softmax(-1) if options.output == "probability" else out, targets[images])
                drops.view(-1, targets.shape[1])[run] = (reference[images] - scores).double()
            ops.occlusion_accumulate(sums, drops, window, stride, first)
            ones = pairs[first : first + count].double()[:, :, None].contiguous()
            ops.occlusion_accumulate(cover, ones, window, stride, first)
    full, done = plan.flops()
    ran = float(pairs.double().mean())
    return (sums / cover.clamp(min=1)).to(x.dtype), (done * ran / full if full else 1.0)


def _drilldown(
    ctx: Context,
    attributed: Attributed,
    inputs: ModelInputs,
    x: torch.Tensor,
    targets: torch.Tensor,
    options: OcclusionOptions,
    geometry: dict[str, Any],
) -> tuple[torch.Tensor, float]:
    """Adaptive drill-down (approximate): the windows at twice the stride first; then, at the
    stride, only the windows over the ``drilldown`` fraction of each image where the coarse map
    (first target, |channels summed|) is largest; elsewhere the coarse map stands."""
    window, stride = geometry["window"], geometry["stride"]
    coarse_stride = tuple(min(2 * s, w) if w < size else s for s, w, size in zip(stride, window, x.shape[1:]))
    coarse_geometry = {**geometry, "stride": coarse_stride}
    plan = _plan(coarse_geometry, x, options, options.field_cap)
    coarse, coarse_ratio = _incremental_pass(ctx, attributed, inputs, x, targets, options, coarse_geometry, plan)
    saliency = coarse[:, 0].abs().sum(1)  # (B, H, W)
    flat = saliency.flatten(1)
    keep = max(1, int(options.drilldown * flat.shape[1]))
    threshold = flat.topk(keep, dim=1).values[:, -1:]
    selected = (flat >= threshold).reshape_as(saliency)  # (B, H, W)
    corners = _window_grid(tuple(x.shape[1:]), window, stride).to(x.device)
    rows = corners[:, 1:2] + torch.arange(window[1], device=x.device)  # (windows, h)
    cols = corners[:, 2:3] + torch.arange(window[2], device=x.device)
    rows, cols = rows.clamp(max=x.shape[2] - 1), cols.clamp(max=x.shape[3] - 1)
    hits = selected[:, rows[:, :, None], cols[:, None, :]].flatten(2).any(2)  # (B, windows)
    fine_plan = _plan(geometry, x, options, options.field_cap)
    chosen = hits.T.contiguous()
    fine, fine_ratio = _incremental_pass(ctx, attributed, inputs, x, targets, options, geometry, fine_plan, chosen)
    covered = torch.zeros(x.shape[0], 1, *x.shape[1:], dtype=torch.float64, device=x.device)
    ops.occlusion_accumulate(covered, chosen.double()[:, :, None].contiguous(), window, stride, 0)
    coarse_windows = _window_grid(tuple(x.shape[1:]), window, coarse_stride).shape[0]
    fine_windows = corners.shape[0]
    geometry["sweep"] = (
        f"incremental (approximate: drilldown={options.drilldown:g}, field_cap={options.field_cap:g}; "
        f"{coarse_windows} windows at stride {coarse_stride}, then {int(chosen.sum())} of {fine_windows * x.shape[0]} "
        f"(window, input) pairs at stride {stride})"
    )
    ratio = (coarse_ratio * coarse_windows + fine_ratio * fine_windows) / fine_windows
    return torch.where(covered > 0, fine, coarse), ratio


def attributed_score(
    attributed: Attributed, inputs: ModelInputs, z: torch.Tensor, targets: torch.Tensor, output: str
) -> torch.Tensor:
    out = attributed.outputs(inputs, z)
    return target_scores(out.softmax(-1) if output == "probability" else out, targets)


def score_of(ctx: Context, inputs: ModelInputs, targets: torch.Tensor, output: str, position: int = -1) -> torch.Tensor:
    out = ctx.scores(inputs, position)
    return target_scores(out.softmax(-1) if output == "probability" else out, targets)


def token_occlusion(
    ctx: Context, inputs: ModelInputs, targets: torch.Tensor, options: OcclusionOptions, geometry: dict[str, Any]
) -> torch.Tensor:
    """(B, T_targets, T) float maps for token ids (B, T): each window of real tokens replaced by
    the baseline id, the mean drop over the windows covering a token; padding stays 0."""
    ids = inputs.main
    if ids.dim() != 2:
        raise PyengineError(f"occlusion: integer inputs of shape {tuple(ids.shape)}; expected token ids (N, T)")
    baseline = options.baseline
    if (
        isinstance(baseline, str)
        or float(torch.as_tensor(baseline).reshape(-1)[0]) < 0
        or torch.as_tensor(baseline).numel() != 1
    ):
        raise PyengineError(
            f"occlusion: baseline={baseline!r} cannot replace token ids; pass baseline=<token id> (e.g. the pad id)"
        )
    token = int(torch.as_tensor(baseline))
    length = ids.shape[1]
    window = (options.window or (1,))[-1]
    stride = (options.stride or (max(1, window // 2) if options.window else 1,))[-1]
    if window > length:
        raise bad_option("window", options.window, f"at most {length} tokens")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    real = (inputs.mask != 0) if inputs.mask is not None else torch.ones_like(ids, dtype=torch.bool)
    if not geometry:
        geometry.update(
            window=(window,),
            stride=(stride,),
            windows=len(starts),
            samples=samples_per_pass(ctx, inputs, options, backward=False),
        )
    n = ids.shape[0]
    sums = torch.zeros(n, targets.shape[1], length, dtype=torch.float64, device=ids.device)
    cover = torch.zeros(n, length, dtype=torch.float64, device=ids.device)
    per_pass = max(1, geometry["samples"] // n)
    with torch.inference_mode():
        reference = score_of(ctx, inputs, targets, options.output, options.position)
        for first in range(0, len(starts), per_pass):
            chunk = starts[first : first + per_pass]
            region = torch.zeros(len(chunk), n, length, dtype=torch.bool, device=ids.device)
            for k, start in enumerate(chunk):
                region[k, :, start : start + window] = True
            region &= real.unsqueeze(0)
            occluded = torch.where(region, torch.full_like(ids, token), ids.unsqueeze(0)).reshape(-1, length)
            repeated = inputs.with_main(occluded, torch.arange(n).repeat(len(chunk)))
            scores = score_of(ctx, repeated, targets.repeat(len(chunk), 1), options.output, options.position).reshape(
                len(chunk), n, -1
            )
            drops = (reference.unsqueeze(0) - scores).double()  # (windows, n, targets)
            sums += torch.einsum("wnt,wnl->ntl", drops, region.double())
            cover += region.double().sum(0)
    return (sums / cover.clamp(min=1).unsqueeze(1)).float()
