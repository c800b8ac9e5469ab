"""Probing: can a concept be predicted from a layer's activations, on held-out data?

- ``probe-neurons``: a one-weight logistic probe per neuron and concept, all neurons of a
  layer fitted at once; reports accuracy, AUC and the firing threshold −b/w.
- ``probe-linear``: one linear probe over all neurons (multi-label sigmoid, or softmax
  for a multi-class concept) with L1/L2; the neurons with the largest weights.
- ``probe-mlp``: a small nonlinear probe per concept, early-stopped on validation.

Every probe is fitted on the training rows and scored on the test rows only, next to the
same probe on a control task (Hewitt & Liang); selectivity = accuracy − control accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyengine.context import Context
from pyengine.plugins.probing._data import ProbeData, ProbeOptions, collect, iter_pairs, standardise
from pyengine.plugins.probing._fit import (
    LinearFit,
    accuracy_per_column,
    auc_per_column,
    control_labels,
    fit_linear,
    fit_mlp,
    fit_single_neuron,
)
from pyengine.technique import Figure, Result, Technique, UnitRef, bad_option, option

HISTOGRAM_BINS = 30


def _key(layer: str, concept: str) -> str:
    return f"{layer}|{concept}"


def _per_layer_figure(
    title: str, values: dict[str, float], layers: list[str], concepts: list[str], ylabel: str
) -> Figure:
    lines = {concept: [values[_key(layer, concept)] for layer in layers] for concept in concepts}
    return Figure(title, lines=lines, x_labels=tuple(layers), xlabel="layer", ylabel=ylabel)


def _best_layer_per_concept(test_accuracy: dict[str, float]) -> str:
    """``concept: best layer accuracy; ...`` from "layer|concept" accuracies."""
    best: dict[str, tuple[float, str]] = {}
    for key, accuracy in test_accuracy.items():
        layer, concept = key.split("|", 1)
        best[concept] = max(best.get(concept, (-1.0, "")), (accuracy, layer))
    return "; ".join(f"{concept}: {layer} {accuracy:.3f}" for concept, (accuracy, layer) in best.items())


def _histogram_figure(title: str, h: torch.Tensor, y: torch.Tensor, threshold: float) -> Figure:
    low, high = float(h.min()), float(h.max())
    high = high if high > low else low + 1
    edges = torch.linspace(low, high, HISTOGRAM_BINS + 1)
    present = torch.histc(h[y == 1].float().cpu(), HISTOGRAM_BINS, low, high)
    absent = torch.histc(h[y == 0].float().cpu(), HISTOGRAM_BINS, low, high)
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    return Figure(
        title,
        lines={"concept present": present.tolist(), "concept absent": absent.tolist()},
        x=centres,
        xlabel="activation",
        ylabel="inputs",
        caption=f"probe threshold −b/w = {threshold:.3g}",
    )


@dataclass(frozen=True, kw_only=True)
class ProbeResult(Result):
    """Rows of the seeded, stratified split, so every number can be reproduced."""

    train_rows: torch.Tensor
    val_rows: torch.Tensor
    test_rows: torch.Tensor
    unit_axis: dict[str, str]  # layer -> where its units are: 'channels', 'last', 'units', 'dim k'
    pooling: dict[str, str]  # layer -> how a unit's positions became one value: 'max', 'mean', 'first', 'last', '-'


def _split_fields(data: ProbeData) -> dict[str, Any]:
    return {
        "train_rows": data.split.train.cpu(),
        "val_rows": data.split.val.cpu(),
        "test_rows": data.split.test.cpu(),
        "unit_axis": data.unit_axis,
        "pooling": data.pooling,
    }


# --- probe-neurons -----------------------------------------------------------------


@dataclass(frozen=True)
class ProbeNeuronsOptions(ProbeOptions):
    c: float = option(1.0, "inverse L2 strength on w, as scikit-learn's C")
    top: int = option(5, "neurons listed per concept")

    def validate(self) -> None:
        super().validate()
        self.require_number("c", positive=True)
        self.require_int("top")


@dataclass(frozen=True, kw_only=True)
class ProbeNeuronsResult(ProbeResult):
    """Per ``layer|concept`` arrays over the layer's neurons."""

    train_accuracy: dict[str, torch.Tensor]
    test_accuracy: dict[str, torch.Tensor]
    control_accuracy: dict[str, torch.Tensor]
    selectivity: dict[str, torch.Tensor]
    auc: dict[str, torch.Tensor]
    weight: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]
    threshold: dict[str, torch.Tensor]  # −b/w: the activation at which the probe flips
    ranking: dict[str, torch.Tensor]  # neuron indices, best test AUC first (not accuracy: no base-rate wins)
    best_accuracy: dict[str, float]  # concept -> test accuracy of the best neuron (by AUC)
    best_neuron: dict[str, str]  # concept -> "layer#unit" with the best test AUC
    top_neurons: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return list(self.top_neurons)

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per concept and layer, its best neuron by test AUC: accuracy, AUC, selectivity, threshold."""
        rows: list[tuple[object, ...]] = [
            ("concept", "layer", "neuron", "test accuracy", "AUC", "selectivity", "fires", "threshold")
        ]
        for key, order in self.ranking.items():
            layer, concept = key.rsplit("|", 1) if "|" in key else (key, "")
            unit = int(order[0])
            rows.append(
                (
                    concept,
                    layer,
                    UnitRef(layer, unit),
                    round(float(self.test_accuracy[key][unit]), 3),
                    round(float(self.auc[key][unit]), 3),
                    round(float(self.selectivity[key][unit]), 3),
                    "above" if float(self.weight[key][unit]) >= 0 else "below",
                    f"{float(self.threshold[key][unit]):.3g}",
                )
            )
        return tuple(rows)

    def summary(self) -> str:
        return "; ".join(
            f"{concept}: {self.best_neuron[concept]} {accuracy:.3f}" for concept, accuracy in self.best_accuracy.items()
        )


class ProbeNeurons(Technique):
    name = "probe-neurons"
    summary = "one-weight logistic probe per neuron and concept; accuracy, AUC, selectivity, firing threshold"
    Options = ProbeNeuronsOptions
    needs_data = True

    def run(self, ctx: Context, options: ProbeNeuronsOptions) -> ProbeNeuronsResult:
        data = collect(ctx, options)
        fields: dict[str, Any] = {
            name: {}
            for name in (
                "train_accuracy",
                "test_accuracy",
                "control_accuracy",
                "selectivity",
                "auc",
                "weight",
                "bias",
                "threshold",
                "ranking",
            )
        }
        for layer, concept, x, y in iter_pairs(data):
            key = _key(layer, concept)
            x_train, _, x_test = data.train_val_test(x)
            y_train, _, y_test = data.train_val_test(y)
            control_train, _, control_test = data.train_val_test(data.controls[concept])
            weights, biases = fit_single_neuron(
                x_train, torch.stack([y_train, control_train]), c=options.c, seed=ctx.seed
            )
            (w, wc), (b, bc) = weights, biases
            test = accuracy_per_column(x_test * w.float() + b.float(), y_test)
            control = accuracy_per_column(x_test * wc.float() + bc.float(), control_test)
            fields["train_accuracy"][key] = accuracy_per_column(x_train * w.float() + b.float(), y_train).cpu()
            fields["test_accuracy"][key] = test.cpu()
            fields["control_accuracy"][key] = control.cpu()
            fields["selectivity"][key] = (test - control).cpu()
            fields["auc"][key] = auc_per_column(x_test * w.sign().float(), y_test).cpu()
            fields["weight"][key] = w.float().cpu()
            fields["bias"][key] = b.float().cpu()
            fields["threshold"][key] = torch.where(w != 0, -b / w, torch.full_like(w, float("inf"))).float().cpu()
            # Ranked by test AUC: threshold-free, so a neuron cannot win by predicting the majority class.
            fields["ranking"][key] = torch.argsort(fields["auc"][key].nan_to_num(0.5), descending=True, stable=True)

        layers, concepts = list(data.features), list(data.targets)
        best_accuracy, best_neuron, lines, histograms = {}, {}, [], []
        for concept in concepts:
            candidates = [
                (float(fields["auc"][_key(layer, concept)][unit].nan_to_num(0.5)), layer, int(unit))
                for layer in layers
                for unit in fields["ranking"][_key(layer, concept)][: options.top]
            ]
            candidates.sort(key=lambda item: -item[0])
            _, layer, unit = candidates[0]
            best_accuracy[concept] = float(fields["test_accuracy"][_key(layer, concept)][unit])
            best_neuron[concept] = f"{layer}:{unit}"
            listed = ", ".join(
                f"{lay}:{u} acc {float(fields['test_accuracy'][_key(lay, concept)][u]):.3f} AUC {auc:.3f} "
                f"sel {float(fields['selectivity'][_key(lay, concept)][u]):+.3f} "
                f"{'above' if float(fields['weight'][_key(lay, concept)][u]) >= 0 else 'below'} "
                f"{float(fields['threshold'][_key(lay, concept)][u]):.3g}"
                for auc, lay, u in candidates[: options.top]
            )
            lines.append(
                f"{concept} (neuron, test accuracy, test AUC — the ranking —, selectivity, activation that "
                f"signals it): {listed}"
            )
            key = _key(layer, concept)
            histograms.append(
                _histogram_figure(
                    f"{concept}: {layer}:{unit} activations by concept",
                    data.features[layer][:, unit],
                    data.targets[concept],
                    float(fields["threshold"][key][unit]),
                )
            )
        best_per_layer = {k: float(v.max()) for k, v in fields["test_accuracy"].items()}
        selectivity_per_layer = {k: float(fields["selectivity"][k][fields["ranking"][k][0]]) for k in best_per_layer}
        figures = (
            _per_layer_figure(
                "Best single-neuron test accuracy per layer", best_per_layer, layers, concepts, "accuracy"
            ),
            _per_layer_figure(
                "Selectivity of that neuron (accuracy − control)",
                selectivity_per_layer,
                layers,
                concepts,
                "selectivity",
            ),
            *histograms,
        )
        return ProbeNeuronsResult(
            **fields,
            **_split_fields(data),
            best_accuracy=best_accuracy,
            best_neuron=best_neuron,
            top_neurons=tuple(lines),
            figures=figures,
        )


# --- probe-linear ------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeLinearOptions(ProbeOptions):
    l1: float = option(0.0, "L1 penalty on the weights")
    l2: float = option(1e-3, "L2 penalty on the weights")
    multiclass: tuple[str, ...] = option((), "categorical concepts to probe with one softmax each")
    iterations: int = option(1000, "FISTA iterations at most")
    top: int = option(5, "units listed per concept")

    def validate(self) -> None:
        super().validate()
        self._set("multiclass", (self.multiclass,) if isinstance(self.multiclass, str) else tuple(self.multiclass))
        self.require_number("l1", "l2")
        self.require_int("iterations", "top")


@dataclass(frozen=True, kw_only=True)
class ProbeLinearResult(ProbeResult):
    test_accuracy: dict[str, float]  # "layer|concept"
    control_accuracy: dict[str, float]
    selectivity: dict[str, float]
    weights: dict[str, torch.Tensor]  # "layer|concept" -> (units,) in activation units
    bias: dict[str, torch.Tensor]
    top_units: dict[str, str]  # "layer|concept" -> "u1 (w1), u2 (w2), ..."
    iterations: dict[str, int]  # per layer: the most FISTA steps any of its fits took
    gradient_norm: dict[str, float]  # per layer: the largest proximal-gradient norm left (0 = optimum)
    warning: str = ""  # fits that stopped at the iteration limit

    def lines(self) -> list[str]:
        lines = [
            f"{key}: test {self.test_accuracy[key]:.3f}, selectivity {self.selectivity[key]:+.3f}; "
            f"top units {self.top_units[key]}"
            for key in self.test_accuracy
        ]
        return lines + ([f"WARNING: {self.warning}"] if self.warning else [])

    def summary(self) -> str:
        text = _best_layer_per_concept(self.test_accuracy)
        return text + (f"; WARNING: {self.warning}" if self.warning else "")

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per concept and layer: test and control accuracy, selectivity, the largest weights."""
        return _concept_table(self, top_units=self.top_units)


def _concept_table(result: ProbeLinearResult | ProbeMLPResult, top_units: dict[str, str] | None = None) -> Any:
    """Rows of (concept, layer, test accuracy, control accuracy, selectivity[, top units]), by concept."""
    header = ("concept", "layer", "test accuracy", "control accuracy", "selectivity")
    rows: list[tuple[object, ...]] = [header + (("top units (weight)",) if top_units is not None else ())]
    keyed = sorted(
        result.test_accuracy, key=lambda key: (key.rsplit("|", 1)[-1], list(result.test_accuracy).index(key))
    )
    for key in keyed:
        layer, _, concept = key.rpartition("|")
        row: tuple[object, ...] = (
            concept,
            layer,
            round(result.test_accuracy[key], 3),
            round(result.control_accuracy[key], 3),
            round(result.selectivity[key], 3),
        )
        rows.append(row + ((top_units.get(key, ""),) if top_units is not None else ()))
    return tuple(rows)


def _limit_warning(ended: dict[str, list[LinearFit]], limit: int) -> str:
    """Which layers' fits hit the iteration limit, and how far from the optimum they stopped."""
    short = {
        layer: max(f.gradient_norm for f in fits) for layer, fits in ended.items() if any(not f.converged for f in fits)
    }
    if not short:
        return ""
    listed = ", ".join(f"{layer} (gradient norm {norm:.2g})" for layer, norm in short.items())
    return f"the fits of {listed} stopped at iterations={limit} before converging; raise iterations"


def _describe_top(weights: torch.Tensor, top: int) -> str:
    order = torch.argsort(weights.abs(), descending=True, stable=True)[:top]
    return ", ".join(f"{int(u)} ({float(weights[u]):+.3g})" for u in order)


class ProbeLinear(Technique):
    name = "probe-linear"
    summary = "linear probe over all neurons of a layer: multi-label sigmoid or softmax, L1/L2, top weights"
    Options = ProbeLinearOptions
    needs_data = True

    def run(self, ctx: Context, options: ProbeLinearOptions) -> ProbeLinearResult:
        data = collect(ctx, options)
        accuracy, control, weights, bias, top = {}, {}, {}, {}, {}
        train, test = data.split.train, data.split.test
        binary = [c for c in data.targets if c.split("=", 1)[0] not in options.multiclass]
        ended: dict[str, list[LinearFit]] = {layer: [] for layer in data.features}

        def fit(x: torch.Tensor, y: torch.Tensor, *, multiclass: bool) -> LinearFit:
            return fit_linear(x, y, multiclass=multiclass, l1=options.l1, l2=options.l2, iterations=options.iterations)

        with ctx.progress(len(data.features), "probe-linear fits") as bar:
            for layer, x in data.features.items():
                z, mean, std = standardise(x.double(), train)
                fits = []
                if binary:
                    targets = torch.stack([data.targets[c] for c in binary], 1).double()
                    controls = torch.stack([data.controls[c] for c in binary], 1).double()
                    probe = fit(z[train], targets[train], multiclass=False)
                    probe_control = fit(z[train], controls[train], multiclass=False)
                    ended[layer] += [probe, probe_control]
                    w, b, wc, bc = probe.weight, probe.bias, probe_control.weight, probe_control.bias
                    hit = ((z[test] @ w.T + b) > 0) == targets[test].bool()
                    hit_control = ((z[test] @ wc.T + bc) > 0) == controls[test].bool()
                    fits += [
                        (c, float(hit[:, k].double().mean()), float(hit_control[:, k].double().mean()), w[k], b[k])
                        for k, c in enumerate(binary)
                    ]
                for concept in options.multiclass:
                    if concept not in data.categorical:
                        raise bad_option("multiclass", concept, f"a categorical concept: {', '.join(data.categorical)}")
                    codes = data.categorical[concept]
                    shuffled = control_labels(codes, data.types, data.seed + 1000).to(codes.device)
                    probe = fit(z[train], codes[train], multiclass=True)
                    probe_control = fit(z[train], shuffled[train], multiclass=True)
                    ended[layer] += [probe, probe_control]
                    w, b, wc, bc = probe.weight, probe.bias, probe_control.weight, probe_control.bias
                    acc = float(((z[test] @ w.T + b).argmax(1) == codes[test]).double().mean())
                    acc_control = float(((z[test] @ wc.T + bc).argmax(1) == shuffled[test]).double().mean())
                    for k in range(w.shape[0]):
                        fits.append((f"{concept}[{k}]", acc, acc_control, w[k], b[k]))
                for concept, acc, acc_control, w_std, b_std in fits:
                    key = _key(layer, concept)
                    accuracy[key], control[key] = acc, acc_control
                    raw = w_std / std  # back to activation units: w·(h − mean)/std + b
                    weights[key] = raw.float().cpu()
                    bias[key] = (b_std - (raw * mean).sum()).float().reshape(1).cpu()
                    top[key] = _describe_top(w_std.cpu(), options.top)
                bar.update()
        layers = list(data.features)
        concepts = list(dict.fromkeys(key.split("|", 1)[1] for key in accuracy))
        figure = _per_layer_figure("Linear probe test accuracy per layer", accuracy, layers, concepts, "accuracy")
        selectivity = {key: accuracy[key] - control[key] for key in accuracy}
        figure_selectivity = _per_layer_figure(
            "Linear probe selectivity per layer", selectivity, layers, concepts, "selectivity"
        )
        return ProbeLinearResult(
            **_split_fields(data),
            test_accuracy=accuracy,
            control_accuracy=control,
            selectivity=selectivity,
            weights=weights,
            bias=bias,
            top_units=top,
            iterations={layer: max(f.iterations for f in fits) for layer, fits in ended.items()},
            gradient_norm={layer: max(f.gradient_norm for f in fits) for layer, fits in ended.items()},
            warning=_limit_warning(ended, options.iterations),
            figures=(figure, figure_selectivity),
        )


# --- probe-mlp ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeMLPOptions(ProbeOptions):
    hidden: int = option(32, "hidden units of the probe")
    epochs: int = option(100, "training epochs at most")
    patience: int = option(10, "epochs without a better validation loss before stopping")
    lr: float = option(1e-2, "Adam learning rate")
    weight_decay: float = option(0.0, "Adam weight decay")
    train_batch: int = option(128, "rows per training step")

    def validate(self) -> None:
        super().validate()
        self.require_int("hidden", "epochs", "patience", "train_batch")
        self.require_number("lr", positive=True)
        self.require_number("weight_decay")


@dataclass(frozen=True, kw_only=True)
class ProbeMLPResult(ProbeResult):
    test_accuracy: dict[str, float]
    control_accuracy: dict[str, float]
    selectivity: dict[str, float]
    epochs_run: dict[str, int]  # per layer/concept probe: epochs trained before stopping
    warning: str = ""  # probes whose validation loss still improved at the epoch limit

    def lines(self) -> list[str]:
        lines = [
            f"{key}: test {acc:.3f}, control {self.control_accuracy[key]:.3f}, selectivity {self.selectivity[key]:+.3f}"
            for key, acc in self.test_accuracy.items()
        ]
        return lines + ([f"WARNING: {self.warning}"] if self.warning else [])

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per concept and layer: test and control accuracy, selectivity."""
        return _concept_table(self)

    def summary(self) -> str:
        text = _best_layer_per_concept(self.test_accuracy)
        return text + (f"; WARNING: {self.warning}" if self.warning else "")


class ProbeMLP(Technique):
    name = "probe-mlp"
    summary = "small nonlinear probe per concept (relations between neurons), early-stopped on validation"
    Options = ProbeMLPOptions
    needs_data = True

    def _fit_and_score(
        self, data: ProbeData, z: torch.Tensor, y: torch.Tensor, options: ProbeMLPOptions, seed: int
    ) -> tuple[float, int, bool]:
        """Test accuracy, epochs run, and whether early stopping ended the training."""
        x_train, x_val, x_test = data.train_val_test(z)
        y_train, y_val, y_test = data.train_val_test(y)
        model, epochs, stopped = fit_mlp(
            x_train,
            y_train,
            x_val,
            y_val,
            hidden=options.hidden,
            epochs=options.epochs,
            patience=options.patience,
            lr=options.lr,
            weight_decay=options.weight_decay,
            batch_size=options.train_batch,
            seed=seed,
        )
        with torch.no_grad():
            return float(((model(x_test).squeeze(1) > 0) == y_test.bool()).float().mean()), epochs, stopped

    def run(self, ctx: Context, options: ProbeMLPOptions) -> ProbeMLPResult:
        data = collect(ctx, options)
        accuracy, control, epochs_run, at_limit = {}, {}, {}, []
        standardised = {layer: standardise(x, data.split.train)[0] for layer, x in data.features.items()}
        pairs = list(iter_pairs(data))
        with ctx.progress(len(pairs), "probe-mlp") as bar:
            for k, (layer, concept, _, y) in enumerate(pairs):
                key = _key(layer, concept)
                accuracy[key], epochs_run[key], stopped = self._fit_and_score(
                    data, standardised[layer], y, options, ctx.seed + k
                )
                control[key], _, _ = self._fit_and_score(
                    data, standardised[layer], data.controls[concept], options, ctx.seed + k
                )
                if not stopped:
                    at_limit.append(key)
                bar.update()
        selectivity = {key: accuracy[key] - control[key] for key in accuracy}
        layers, concepts = list(data.features), list(data.targets)
        return ProbeMLPResult(
            **_split_fields(data),
            test_accuracy=accuracy,
            control_accuracy=control,
            selectivity=selectivity,
            epochs_run=epochs_run,
            warning=(
                f"{len(at_limit)} probe(s) still improved on validation at epochs={options.epochs} "
                f"({', '.join(at_limit[:3])}{', ...' if len(at_limit) > 3 else ''}); raise epochs"
                if at_limit
                else ""
            ),
            figures=(_per_layer_figure("MLP probe test accuracy per layer", accuracy, layers, concepts, "accuracy"),),
        )
