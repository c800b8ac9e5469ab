"""What attribution techniques share (host API): targets, memory-bounded batching, the
result type and its heatmap figure, and the guided-ReLU override.

A technique supplies ``attribute(inputs, targets) -> maps`` for a chunk of rows (``ModelInputs``:
the inputs (N, *S) with their attention mask) with one target each; ``run_attribution`` does the
rest: the rows (``ctx.rows``), target resolution (an index, per-input indices, several per
input, ``"predicted"`` or ``"label"``), a progress bar, and the result. Set
``Technique.attribution = True`` on such a technique: smoothgrad and faithfulness then find it
in the registry.

``Attributed`` is what gradients are taken for: the inputs, or with ``layer=`` the values a
layer returns (Captum's Layer* semantics: the model runs on the same inputs with that layer's
output replaced by the values differentiated). Token-id inputs need a layer (the embedding).
A causal LM's (N, T, V) output is explained at each row's last real token (the next-token
prediction there).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.figures import heatmap_figure, spatial_map
from pyengine.inputs import ModelInputs, explained_scores
from pyengine.technique import Figure, Result, RowOptions, bad_option, option

Attribute = Callable[[ModelInputs, torch.Tensor], torch.Tensor]
AnyAttributionResult = TypeVar("AnyAttributionResult", bound="AttributionResult")
TARGET_FORMS = (
    "a class index, 'predicted', 'label', a list/tensor of one index per input, "
    "or a 2-D list/tensor (inputs or 1, targets)"
)
CPU_BUDGET_MB = 64.0  # larger passes only thrash the caches on a CPU (measured on the demo CNN)
MAX_FIGURE_INPUTS = 8


@dataclass(frozen=True)
class TargetOptions(RowOptions):
    """Rows and the output explained."""

    target: Any = option("predicted", "the explained output: " + TARGET_FORMS)
    position: int = option(
        -1, "sequence models' per-token outputs: the token position explained; -1: each row's last real token"
    )

    def validate(self) -> None:
        super().validate()
        self._set("target", normalise_target(self.target))
        self.require_int("position", minimum=-1)


@dataclass(frozen=True)
class AttributionOptions(TargetOptions):
    """Options every attribution technique takes: rows, target, the memory budget."""

    memory_mb: float = option(0.0, "budget for internal passes, MiB; 0: half the free GPU memory, or 64 MiB on CPU")
    max_batch: int = option(0, "at most this many samples per forward pass; 0: from the memory budget")

    def validate(self) -> None:
        super().validate()
        self.require_int("max_batch", minimum=0)
        self.require_number("memory_mb")


def normalise_target(target: Any) -> int | str | torch.Tensor:
    """An int, 'predicted', 'label', or a long tensor of shape (B,) or (B or 1, T)."""
    if isinstance(target, str):
        if target not in ("predicted", "label"):
            raise bad_option("target", target, TARGET_FORMS)
        return target
    if isinstance(target, bool):
        raise bad_option("target", target, TARGET_FORMS)
    if isinstance(target, int):
        if target < 0:
            raise bad_option("target", target, "a non-negative class index")
        return target
    try:
        tensor = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise bad_option("target", target, TARGET_FORMS) from None
    if (
        tensor.is_floating_point()
        or tensor.is_complex()
        or tensor.dtype == torch.bool
        or tensor.dim() not in (1, 2)
        or tensor.numel() == 0
        or int(tensor.min()) < 0
    ):
        raise bad_option("target", target, TARGET_FORMS)
    return tensor.long().cpu()


def target_scores(
    output: torch.Tensor, targets: torch.Tensor, inputs: ModelInputs | None = None, position: int = -1
) -> torch.Tensor:
    """The model output at each row's targets: output (N, K) or (N,), targets (N, T) -> (N, T);
    a per-token output over token ids is read at ``position`` (-1: each row's last real token)."""
    output = explained_scores(output, inputs, position)
    flat = output.reshape(output.shape[0], -1)
    if int(targets.max()) >= flat.shape[1]:
        raise PyengineError(f"target {int(targets.max())} is out of range: the model has {flat.shape[1]} outputs")
    return flat.gather(1, targets.to(flat.device))


def resolve_targets(
    spec: int | str | torch.Tensor,
    ctx: Context,
    inputs: ModelInputs,
    labels: torch.Tensor | None,
    offset: int,
    position: int = -1,
) -> torch.Tensor:
    """(B, T) target indices for rows ``offset .. offset + B`` of the whole run."""
    b = len(inputs)
    if isinstance(spec, int):
        return torch.full((b, 1), spec, dtype=torch.long)
    if spec == "predicted":
        with torch.no_grad():
            output = ctx.scores(inputs, position)
        return output.reshape(b, -1).argmax(1, keepdim=True).cpu()
    if spec == "label":
        if labels is None or int(labels.min()) < 0:
            raise PyengineError(
                "target='label' needs labelled dataset rows: pass data=<dataset> without inputs "
                "(start/stop select the rows), or class indices"
            )
        return labels.long().reshape(b, 1).cpu()
    table = torch.as_tensor(spec)
    table = table.reshape(-1, 1) if table.dim() == 1 else table
    if table.shape[0] == 1:
        return table.expand(b, -1)
    return table[offset : offset + b]


def memory_budget_bytes(device: torch.device, memory_mb: float) -> float:
    if memory_mb:
        return memory_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2
    return CPU_BUDGET_MB * 2**20


def samples_per_pass(
    ctx: Context, example: ModelInputs, options: AttributionOptions, *, backward: bool, extra_bytes: int = 0
) -> int:
    """How many samples one forward (and backward) pass may take within the memory budget.

    Measured on one sample: the outputs of every leaf module. Without gradients the peak is
    about the input plus the two largest consecutive outputs; with gradients every output is
    kept and gets a gradient of its own.
    """
    one = example.take([0])
    with ctx.trace() as traced, torch.no_grad():
        ctx.forward(one)
    sizes = [c.output.numel() * c.output.element_size() for c in traced.calls if isinstance(c.output, torch.Tensor)]
    input_bytes = one.main.numel() * one.main.element_size()
    largest = sorted(sizes, reverse=True)[:2]
    per_sample = 2 * (input_bytes + sum(sizes)) if backward else input_bytes + sum(largest)
    per_sample += extra_bytes
    budget = memory_budget_bytes(ctx.device, options.memory_mb)
    samples = max(1, int(budget // max(per_sample, 1)))
    return min(samples, options.max_batch) if options.max_batch else samples


TABLE_ROWS = 64  # inputs listed in an attribution result's table


@dataclass(frozen=True, kw_only=True)
class AttributionResult(Result):
    """Attribution maps shaped like the inputs or the attributed layer's output ((B, T, *S) with
    several targets per input)."""

    technique: str
    attributions: torch.Tensor
    targets: torch.Tensor  # (B,) or (B, T) class indices explained
    index: torch.Tensor  # (B,) dataset rows (or positions in the given inputs)
    layer: str = ""  # the layer whose output is attributed ("": the inputs)
    token_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (B, T) for (B, T, D) maps

    def summary(self) -> str:
        shape = "x".join(str(s) for s in self.attributions.shape)
        values = self.attributions.float()
        return f"{shape} attributions, mean |a| {values.abs().mean():.3g}, max |a| {values.abs().max():.3g}"

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per input and target: the row, the class, the map's sum, its largest |value|, the share of
        |attribution| that is positive."""
        rows: list[tuple[object, ...]] = [("row", "target", "sum", "max |a|", "positive share")]
        targets = self.targets if self.targets.dim() == 2 else self.targets[:, None]
        maps = self.attributions.float()
        maps = maps if self.targets.dim() == 2 else maps[:, None]
        for k in range(min(targets.shape[0], TABLE_ROWS)):
            for t in range(targets.shape[1]):
                values = maps[k, t]
                total = float(values.abs().sum())
                share = float(values.clamp(min=0).sum()) / total if total > 0 else float("nan")
                rows.append(
                    (
                        int(self.index[k]),
                        int(targets[k, t]),
                        f"{float(values.sum()):.4g}",
                        f"{float(values.abs().max()):.3g}",
                        f"{share:.0%}",
                    )
                )
        return tuple(rows)


def run_attribution(
    ctx: Context,
    options: AttributionOptions,
    technique: str,
    attribute: Attribute,
    *,
    multi_target: bool = False,
    split: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explain every row: returns (attributions, targets, index, first inputs).

    ``attribute(x, t)`` maps N inputs with one target each (t: (N,)) to N maps; with several
    targets per input the rows are repeated. A ``multi_target`` attribute takes all targets
    at once, t: (N, T), and returns (N, T, *S).
    Several processes explain their contiguous parts of the rows (``split``; else each explains
    them all); each gets every row's result.
    """
    source = ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=technique, split=split)
    if isinstance(options.target, torch.Tensor) and options.target.shape[0] not in (1, source.total):
        raise PyengineError(
            f"{technique}: target has {options.target.shape[0]} rows but there are {source.total} "
            "inputs; expected one row per input or a single row"
        )
    maps: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    shown: list[torch.Tensor] = []
    offset = source.offset
    with ctx.progress(source.count, technique) as bar:
        for rows in source:
            inputs = rows.model_inputs()
            targets = resolve_targets(options.target, ctx, inputs, rows.labels, offset, options.position)
            if multi_target:
                out = attribute(inputs, targets)
            else:
                n, t = targets.shape
                repeated = inputs.take(torch.arange(n).repeat_interleave(t)) if t > 1 else inputs
                out = attribute(repeated, targets.reshape(-1))
                out = out.reshape(n, t, *out.shape[1:])
            maps.append((out[:, 0] if targets.shape[1] == 1 else out).detach().to(map_dtype(inputs.main)).cpu())
            all_targets.append(targets[:, 0] if targets.shape[1] == 1 else targets)
            indices.append(rows.index)
            if sum(s.shape[0] for s in shown) < MAX_FIGURE_INPUTS:
                shown.append(inputs.main[:MAX_FIGURE_INPUTS].detach().cpu())
            offset += len(rows)
            bar.update(len(rows))
    gather = ctx.gather_rows if split else (lambda tensor: tensor)
    return (
        gather(torch.cat(maps)),
        gather(torch.cat(all_targets)),
        gather(torch.cat(indices)),
        gather(torch.cat(shown))[:MAX_FIGURE_INPUTS],
    )


def map_dtype(inputs: torch.Tensor) -> torch.dtype:
    """Maps keep the inputs' floating dtype."""
    return inputs.dtype if inputs.is_floating_point() else torch.float32


def overlay_figure(
    technique: str, inputs: torch.Tensor, attributions: torch.Tensor, targets: torch.Tensor, units: str = "attribution"
) -> tuple[Figure, ...]:
    """Inputs with their heatmaps (first target), when the inputs are images and the maps theirs;
    one colour scale in ``units`` (what a map's values are) for all of them."""
    if inputs.dim() not in (3, 4) or not inputs.is_floating_point() or attributions.dim() < inputs.dim():
        return ()
    if attributions.shape[-inputs.dim() + 1 :] != inputs.shape[1:]:
        return ()
    if inputs.dim() == 3:  # (N, H, W) grey images
        inputs, attributions = inputs[:, None], attributions.unsqueeze(-3)
    first = attributions if attributions.shape[1:] == inputs.shape[1:] else attributions[:, 0]
    n = inputs.shape[0]
    wanted = targets if targets.dim() == 1 else targets[:, 0]
    caption = (
        "targets "
        + ", ".join(str(int(t)) for t in wanted[:n])
        + "; red: raises the target score, blue: lowers it (channels summed)"
    )
    maps = torch.stack([spatial_map(first[k]) for k in range(n)])
    title = f"{technique}: attributions over the inputs"
    return (heatmap_figure(title, inputs[:n], maps, units=units, caption=caption),)


def make_result(
    technique: str,
    attributions: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    shown: torch.Tensor,
    result_type: type[AnyAttributionResult],
    units: str = "attribution",
    **extra: Any,
) -> AnyAttributionResult:
    """The technique's result with its heatmap figure (``units``: what the maps' values are)."""
    figures = overlay_figure(technique, shown, attributions[: shown.shape[0]], targets, units)
    return result_type(
        technique=technique, attributions=attributions, targets=targets, index=index, figures=figures, **extra
    )


# --- what gradients are taken for: the inputs, or a layer's output ------------------------------


class Attributed:
    """The inputs (``layer`` None) or the values ``layer`` returns, as the variable z that
    attributions are computed for: ``values`` gives z for some rows, ``scores`` the target
    scores with z in its place (the model run on the same inputs), ``gradients`` dscore/dz."""

    def __init__(self, ctx: Context, layer: str | None, technique: str, position: int = -1) -> None:
        self.ctx, self.layer, self.technique, self.position = ctx, layer, technique, position
        if layer is not None:
            ctx.module(layer)

    def values(self, inputs: ModelInputs) -> torch.Tensor:
        if self.layer is None:
            if not inputs.main.is_floating_point():
                raise PyengineError(
                    f"{self.technique}: the inputs are {inputs.main.dtype} (token ids?), and gradients need floating "
                    f"point values; pass layers=<module> to attribute to its output, e.g. {embedding_hint(self.ctx)}"
                )
            return inputs.main
        with torch.no_grad(), self.ctx.record([self.layer]) as seen:
            self.ctx.forward(inputs)
            value = seen[self.layer]
        if not value.is_floating_point():
            raise PyengineError(
                f"{self.technique}: layer {self.layer!r} returns {value.dtype} values; expected a floating point "
                "output to attribute to"
            )
        return value.detach()

    def outputs(self, inputs: ModelInputs, z: torch.Tensor) -> torch.Tensor:
        """(N, K) scores targets index (``ctx.scores``) with ``z`` (N rows) in place of the
        attributed values."""
        if self.layer is None:
            return self.ctx.scores(inputs.with_main(z), self.position)
        with self.ctx.record([self.layer], edit={self.layer: lambda _: z}):
            return self.ctx.scores(inputs, self.position)

    def scores(self, inputs: ModelInputs, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, T) scores of ``targets`` (N, T) with ``z`` (N rows) in place of the attributed values."""
        return target_scores(self.outputs(inputs, z), targets)

    def gradients(
        self, inputs: ModelInputs, z: torch.Tensor, targets: torch.Tensor, samples: int, *, guided: bool = False
    ) -> torch.Tensor:
        """d score[target] / dz for each row, ``samples`` rows per pass; ``guided``: through
        guided ReLUs (an error if the model applies none)."""
        grads = []
        for start in range(0, len(inputs), samples):
            rows = torch.arange(start, min(start + samples, len(inputs)))
            part = z[rows.to(z.device)].detach().requires_grad_(True)
            with torch.enable_grad():
                mode = GuidedReLUs()
                with mode if guided else nullcontext():
                    score = self.scores(inputs.take(rows), part, targets[rows].reshape(-1, 1)).sum()
                if guided and not mode.guided:
                    raise PyengineError(
                        f"guided-backprop: {type(self.ctx.model).__name__} applies no ReLU, so guided backpropagation "
                        "would equal the plain gradient; use saliency"
                    )
                grads.append(torch.autograd.grad(score, part)[0])
        return torch.cat(grads)


def embedding_hint(ctx: Context) -> str:
    """The model's first ``nn.Embedding`` (quoted), where token-id models are usually attributed."""
    name = next((n for n, m in ctx.model.named_modules() if isinstance(m, nn.Embedding)), None)
    return repr(name) if name else "the embedding module"


def token_scores(attributions: torch.Tensor, how: str) -> torch.Tensor | None:
    """Per-token scores of (N, T, D) layer attributions: summed over the features or their L2 norm."""
    if attributions.dim() < 3:
        return None
    flat = attributions.flatten(2)
    return flat.sum(-1) if how == "sum" else flat.norm(dim=-1)


# --- guided ReLU: positive gradients only, where the forward input was positive -------------


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _GuidedReLUInPlace(_GuidedReLU):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        x.clamp_(min=0)
        ctx.save_for_backward(x)
        return x


class GuidedReLUs(TorchFunctionMode):
    """While active, every ReLU — ``nn.ReLU`` (in place or not), ``F.relu``, ``torch.relu``,
    ``Tensor.relu(_)`` — gets the guided backward pass; ``guided`` counts them."""

    _OUT_OF_PLACE = (torch.relu, torch.Tensor.relu)
    _IN_PLACE = (torch.relu_, torch.Tensor.relu_, F.relu_)

    def __init__(self) -> None:
        super().__init__()
        self.guided = 0

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.relu or func in self._OUT_OF_PLACE or func in self._IN_PLACE:
            self.guided += 1
        if func is F.relu:
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            return (_GuidedReLUInPlace if inplace else _GuidedReLU).apply(args[0])
        if func in self._OUT_OF_PLACE:
            return _GuidedReLU.apply(args[0])
        if func in self._IN_PLACE:
            return _GuidedReLUInPlace.apply(args[0])
        return func(*args, **kwargs)
