"""What the probes read: per-layer unit activations and concept labels, with splits.

Activations come from the store (streamed in blocks) or from a fresh pass over the data;
conv maps are reduced over space to one value per channel (the channel is the neuron).
Categorical concepts become binary ones, ``texture=striped`` (one versus the rest).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pyengine.errors import PyengineError
from pyengine.technique import Options, bad_option

from pyengine.plugins.probe_fit import Split, control_labels, stratified_split

if TYPE_CHECKING:
    from pyengine.context import Context
    from pyengine.store import StoreReader


@dataclass(frozen=True)
class ProbeOptions(Options):
    """Options every probe shares."""

    layers: tuple[str, ...] = ()  # default: the stored layers, else every ReLU module
    concepts: tuple[str, ...] = ()  # "texture=striped" or "colour" (all its categories); default: all
    labels: Mapping[str, Any] | None = None  # user concepts: name -> (N,) ints, aligned with the rows probed
    reduce: str = "max"  # conv maps: "max" or "mean" over space
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, validation, test
    control: str = "input"  # control-task types: "input" (every row its own) or "label" (the class)
    max_rows: int = 0  # 0: all rows
    batch_size: int = 256

    def validate(self) -> None:
        for name in ("layers", "concepts"):
            value = getattr(self, name)
            self._set(name, (value,) if isinstance(value, str) else tuple(value))
        if self.reduce not in ("max", "mean"):
            raise bad_option("reduce", self.reduce, "'max' or 'mean'")
        split = tuple(float(f) for f in self.split)
        if len(split) != 3 or min(split) < 0 or split[0] <= 0 or split[2] <= 0 or abs(sum(split) - 1) > 1e-6:
            raise bad_option("split", self.split, "three fractions (train, val, test) summing to 1, train and test > 0")
        self._set("split", split)
        if self.control not in ("input", "label"):
            raise bad_option("control", self.control, "'input' or 'label'")
        self.require_int("max_rows", minimum=0)
        self.require_int("batch_size")


@dataclass(frozen=True)
class ProbeData:
    features: dict[str, torch.Tensor]  # layer -> (N, units), float32, on the context device
    targets: dict[str, torch.Tensor]  # binary concept -> (N,) in {0, 1}
    categorical: dict[str, torch.Tensor]  # concept -> (N,) class codes (for softmax probes)
    split: Split
    controls: dict[str, torch.Tensor]  # binary concept -> control-task labels
    types: torch.Tensor  # (N,) control-task input types
    seed: int

    def train_val_test(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return values[self.split.train], values[self.split.val], values[self.split.test]


def reduce_units(activation: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C) by max or mean; (B, units) unchanged."""
    if activation.dim() <= 2:
        return activation.reshape(activation.shape[0], -1)
    flat = activation.flatten(2)
    return flat.amax(2) if how == "max" else flat.mean(2)


def _from_store(store: StoreReader, device: torch.device, layers: tuple[str, ...], options: ProbeOptions,
                stop: int | None) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, list[str]]], torch.Tensor]:
    features = {}
    for layer in layers:
        blocks = [reduce_units(block, options.reduce)
                  for block in store.iter_layer(layer, rows=options.batch_size, device=device, stop=stop)]
        features[layer] = torch.cat(blocks)
    concepts = {name: (store.array(f"concepts/{name}")[:stop], categories) for name, categories in store.concepts.items()}
    return features, concepts, store.array("inputs/labels")[:stop]


def _from_data(ctx: Context, layers: tuple[str, ...], options: ProbeOptions, stop: int | None) -> tuple[
        dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, list[str]]], torch.Tensor]:
    if ctx.data is None:
        raise PyengineError("probing needs data: pass data=<dataset> or a store holding the layers")
    modules = {layer: ctx.module(layer) for layer in layers}
    outputs: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    codes: dict[str, list[torch.Tensor]] = {}
    class_labels: list[torch.Tensor] = []
    end = min(len(ctx.data), stop or len(ctx.data))
    with ctx.hooks() as scope, torch.no_grad(), ctx.progress(end, "probe activations") as bar:
        for layer, module in modules.items():
            scope.forward(module, lambda m, a, out, layer=layer: outputs.__setitem__(layer, out.detach()))
        for batch in ctx.data.batches(options.batch_size, 0, end):
            ctx.model(batch.inputs.to(ctx.device))
            for layer in layers:
                parts[layer].append(reduce_units(outputs[layer], options.reduce))
            for name, values in batch.concepts.items():
                codes.setdefault(name, []).append(values.cpu())
            class_labels.append(batch.labels.cpu())
            bar.update(int(batch.index.shape[0]))
    concepts = {name: (torch.cat(values), list(ctx.data.concept_names.get(name, ()))) for name, values in codes.items()}
    return {layer: torch.cat(p) for layer, p in parts.items()}, concepts, torch.cat(class_labels)


def _binary_targets(concepts: Mapping[str, tuple[torch.Tensor, list[str]]],
                    selection: tuple[str, ...]) -> dict[str, torch.Tensor]:
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
    stop = options.max_rows or None
    if ctx.store is not None and all(layer in ctx.store.layers for layer in layers):
        features, concepts, class_labels = _from_store(ctx.store, ctx.device, layers, options, stop)
    else:
        features, concepts, class_labels = _from_data(ctx, layers, options, stop)
    n = next(iter(features.values())).shape[0]
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
