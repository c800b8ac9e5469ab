"""What the probes read: per-layer unit activations and concept labels, with splits.

Activations come from the store (streamed in blocks) or from a fresh pass over the data. A
row's feature vector has one value per unit (``pyengine.units``: a conv map's channels, a
transformer's features), its positions pooled by ``reduce``: by default the max over a conv
map's space, the mean over a sequence's tokens ('first' takes a ViT's class token, 'last' the
last token, as TransformerLens users probe a causal model). Categorical concepts become
binary ones, ``texture=striped`` (one versus the rest).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pyengine.errors import PyengineError
from pyengine.plugins.probing._fit import Split, control_labels, stratified_split
from pyengine.technique import RowOptions, bad_option, layer_tuple, option
from pyengine.units import POOLING_DOC, POOLINGS, UNITS_DOC

if TYPE_CHECKING:
    from pyengine.context import Context
    from pyengine.units import UnitAxes


@dataclass(frozen=True)
class ProbeOptions(RowOptions):
    """Options every probe shares."""

    batch_size: int = option(256, "rows per step")
    layers: tuple[str, ...] = option(
        (), "layers probed; default: the stored layers, else every nonlinearity's output (ReLU, GELU, ...)"
    )
    concepts: tuple[str, ...] = option((), "'texture=striped' or 'colour' (all its categories); default: all")
    labels: Mapping[str, Any] | None = option(None, "user concepts: name -> (N,) ints, aligned with the rows probed")
    units: str = option("auto", UNITS_DOC)
    reduce: str = option("auto", POOLING_DOC)
    split: tuple[float, float, float] = option((0.6, 0.2, 0.2), "train, validation, test fractions")
    control: str = option("input", "control-task types: 'input' (every row its own) or 'label' (the class)")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        self._set("concepts", (self.concepts,) if isinstance(self.concepts, str) else tuple(self.concepts))
        if self.reduce not in ("auto", *POOLINGS):
            raise bad_option("reduce", self.reduce, "one of " + ", ".join(repr(p) for p in ("auto", *POOLINGS)))
        if self.units not in ("auto", "channels", "last"):
            raise bad_option("units", self.units, "'auto', 'channels' or 'last'")
        split = tuple(float(f) for f in self.split)
        if len(split) != 3 or min(split) < 0 or split[0] <= 0 or split[2] <= 0 or abs(sum(split) - 1) > 1e-6:
            raise bad_option("split", self.split, "three fractions (train, val, test) summing to 1, train and test > 0")
        self._set("split", split)
        if self.control not in ("input", "label"):
            raise bad_option("control", self.control, "'input' or 'label'")


@dataclass(frozen=True)
class ProbeData:
    features: dict[str, torch.Tensor]  # layer -> (N, units), float32, on the context device
    targets: dict[str, torch.Tensor]  # binary concept -> (N,) in {0, 1}
    categorical: dict[str, torch.Tensor]  # concept -> (N,) class codes (for softmax probes)
    split: Split
    controls: dict[str, torch.Tensor]  # binary concept -> control-task labels
    types: torch.Tensor  # (N,) control-task input types
    seed: int
    unit_axis: dict[str, str]  # layer -> where its units are ('channels', 'last', 'units', 'dim k')
    pooling: dict[str, str]  # layer -> how its positions were pooled ('max', 'mean', 'first', 'last'; '-': none)

    def train_val_test(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return values[self.split.train], values[self.split.val], values[self.split.test]


def _read(
    ctx: Context, layers: tuple[str, ...], options: ProbeOptions
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, list[str]]], torch.Tensor, UnitAxes]:
    """Per-unit features, concepts (codes, category names) and class labels of the probed rows."""
    axes = ctx.unit_axes(options.units, "probing", layers)
    source = ctx.activations(
        layers,
        batch_size=options.batch_size,
        start=options.start,
        stop=options.stop,
        technique="probing",
        split=True,
    )
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    codes: dict[str, list[torch.Tensor]] = {}
    class_labels: list[torch.Tensor] = []
    tokens = token_mode(ctx, options)
    with ctx.progress(source.count, "probe activations") as bar:
        for rows, values in source:
            labels = rows.labels if rows.labels is not None else torch.full((len(rows),), -1, dtype=torch.long)
            if tokens:  # one row per real token: its features unpooled, its own code, its id as control type
                real = rows.mask.bool() if rows.mask is not None else None
                expected = int(real.sum()) if real is not None else len(rows) * values_width(values)
                for layer, matrix in axes.matrices(values, rows.mask).items():
                    if matrix.shape[0] != expected:
                        raise PyengineError(
                            f"probing: token-level concepts need (B, T, D) layers with one row per token; {layer!r} "
                            f"gives {tuple(values[layer].shape)}"
                        )
                    parts[layer].append(matrix)
                for name, value in rows.concepts.items():
                    if value.dim() == 2:
                        codes.setdefault(name, []).append(value[real.cpu()] if real is not None else value.flatten())
                ids = rows.inputs
                types = ids[real].cpu() if ids is not None and real is not None else torch.zeros(0, dtype=torch.long)
                codes.setdefault(TOKEN_TYPES, []).append(types)
                counts = real.sum(1).cpu() if real is not None else torch.full((len(rows),), values_width(values))
                class_labels.append(labels.cpu().repeat_interleave(counts))
            else:
                for layer, pooled in axes.pooled(values, options.reduce, rows.mask).items():
                    parts[layer].append(pooled)
                for name, value in rows.concepts.items():
                    if value.dim() == 1:
                        codes.setdefault(name, []).append(value.cpu())
                class_labels.append(labels.cpu())
            bar.update(len(rows))
    # Several processes read their parts of the rows; every one gets all the (pooled) features, in
    # row order, and fits the same probes as one process would.
    concepts = {
        name: (ctx.gather_rows(torch.cat(values)), list(source.concept_names.get(name, ())))
        for name, values in codes.items()
    }
    features = {layer: ctx.gather_rows(torch.cat(p)) for layer, p in parts.items()}
    return features, concepts, ctx.gather_rows(torch.cat(class_labels)), axes


TOKEN_TYPES = "__token_ids__"  # token mode: each token row's id (the control task's word type)


def token_mode(ctx: Context, options: ProbeOptions) -> bool:
    """Probe tokens, not rows: the concepts chosen are token-level (one code per token). Mixing
    them with row-level ones is an error; by default row-level concepts win when both exist."""
    if ctx.data is None or ctx.given is not None:
        return False
    example = ctx.data.batch([0]).concepts
    per_token = {name for name, value in example.items() if value.dim() == 2}
    chosen = {item.split("=")[0] for item in options.concepts}
    if not chosen:
        return bool(per_token) and len(per_token) == len(example)
    if chosen & per_token and chosen - per_token:
        raise PyengineError(
            f"probing: concepts {sorted(chosen & per_token)} are per token and {sorted(chosen - per_token)} per "
            "row; probe them in separate runs"
        )
    return bool(chosen & per_token)


def values_width(values: Mapping[str, torch.Tensor]) -> int:
    """Tokens per row of a block without a mask: every position."""
    first = next(iter(values.values()))
    return int(first.shape[1]) if first.dim() == 3 else 1


def _binary_targets(
    concepts: Mapping[str, tuple[torch.Tensor, list[str]]], selection: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Binary concepts: ``name=category`` for categorical ones, ``name`` for 0/1 arrays."""
    available: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    for name, (codes, categories) in concepts.items():
        values = sorted(int(v) for v in torch.unique(codes))
        if not categories and set(values) <= {0, 1}:
            available[name] = (codes == 1).long()
            groups[name] = [name]
            continue
        labels = categories or [str(v) for v in range(max(values) + 1)]
        groups[name] = []
        for code, label in enumerate(labels):
            key = f"{name}={label}"
            available[key] = (codes == code).long()
            groups[name].append(key)
    if not selection:
        return available
    chosen: dict[str, torch.Tensor] = {}
    for item in selection:
        keys = groups.get(item, [item] if item in available else None)
        if keys is None:
            raise PyengineError(f"unknown concept {item!r}; available: {', '.join(list(groups) + list(available))}")
        chosen.update({key: available[key] for key in keys})
    return chosen


def collect(ctx: Context, options: ProbeOptions) -> ProbeData:
    """Features, concepts, one seeded split stratified on all concepts jointly, controls."""
    layers = options.layers or ctx.default_layers("probing")
    features, concepts, class_labels, axes = _read(ctx, layers, options)
    if axes.choice == "auto" and any(name != "units" for name in axes.names().values()):
        ctx.defaults_chosen["units"] = axes.summary()
    n = next(iter(features.values())).shape[0]
    token_types = concepts.pop(TOKEN_TYPES, None)
    for name, values in (options.labels or {}).items():
        array = torch.as_tensor(values).long().flatten()
        if array.numel() < n:
            raise PyengineError(f"labels[{name!r}] has {array.numel()} rows but {n} inputs are probed; expected {n}")
        concepts[name] = (array[:n], [])
    targets = _binary_targets(concepts, options.concepts)
    if not targets:
        raise PyengineError("probing: no concepts; the data has none, so pass labels={name: array}")
    for name, y in targets.items():
        if int(y.sum()) < 2 or int((1 - y).sum()) < 2:
            raise PyengineError(f"concept {name!r} has fewer than two positive or negative rows; cannot probe it")
    joint = torch.zeros(n, dtype=torch.long)
    for y in targets.values():
        joint = joint * 2 + y.cpu()
    split = stratified_split(joint, options.split, ctx.seed)
    if token_types is not None and token_types[0].numel() == n:
        types = token_types[0] if options.control == "input" else class_labels[:n]  # word types (Hewitt & Liang)
    else:
        types = torch.arange(n) if options.control == "input" else class_labels[:n]
    controls = {name: control_labels(y, types, ctx.seed + 1 + k) for k, (name, y) in enumerate(targets.items())}
    device = ctx.device
    return ProbeData(
        features={layer: f.float().to(device) for layer, f in features.items()},
        targets={name: y.to(device) for name, y in targets.items()},
        categorical={name: codes.to(device) for name, (codes, _) in concepts.items()},
        split=Split(split.train.to(device), split.val.to(device), split.test.to(device)),
        controls={name: y.to(device) for name, y in controls.items()},
        types=types,
        seed=ctx.seed,
        unit_axis=axes.names(),
        pooling={
            layer: "none: token rows" if token_types is not None else axes.pooling(layer, options.reduce)
            for layer in layers
        },
    )


def standardise(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z-score with the training rows' statistics; returns (z, mean, std)."""
    mean = x[train].mean(0)
    std = x[train].std(0).clamp(min=1e-6)
    return (x - mean) / std, mean, std


def iter_pairs(data: ProbeData) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(layer, concept, features, targets) for every layer and binary concept."""
    for layer, x in data.features.items():
        for concept, y in data.targets.items():
            yield layer, concept, x, y
