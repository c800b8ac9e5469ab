"""The architecture matrix: every registered technique on every zoo architecture, at 32x32.

Each cell either equals an independent reference (Captum, float64 autograd, numpy/scikit-learn,
layer values recorded by a forward hook that clones, exact identities between a result's own
fields where a technique has no outside reference) or raises one ``PyengineError`` line saying
why the technique does not apply to the model. A technique registered without an entry in
``SPECS`` fails its cells: a new technique joins the matrix with its reference.

``python tests/test_architectures.py --table`` prints the matrix as markdown (for the README).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from pyengine import host
from pyengine.errors import PyengineError

from matrix_harness import FIT_MLP_CALLS, Spec, markdown_table, run_cell, single_thread, spy_fit_mlp  # isort: skip

from matrix_tables import (  # isort: skip
    MODELS,
    SIZE,
    ROWS,
    EXPLAINED,
    TOKEN_LAYER,
    SPATIAL,
    FIRST_BLOCK,
    PROBE_LAYERS,
    INTERACTION_LAYERS,
    CHAINS,
    REFUSALS,
)


@dataclass
class Cell:
    technique: str
    name: str
    model: nn.Module

    @property
    def data(self) -> Any:
        return dataset()

    @property
    def inputs(self) -> torch.Tensor:
        return self.data.batch(range(EXPLAINED)).inputs

    @property
    def all_inputs(self) -> torch.Tensor:
        return self.data.batch(range(ROWS)).inputs

    def predicted(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.inputs).argmax(1)

    def run(self, **options: Any) -> Any:
        technique = host.get_technique(self.technique)
        if technique.explains_inputs or technique.needs_inputs:
            return pyengine.run(self.technique, self.model, self.inputs, progress=False, **options)
        return pyengine.run(self.technique, self.model, data=self.data, progress=False, **options)


Check = Callable[[Cell, Any], None]


@cache
def dataset() -> Any:
    from pyengine.data import Shapes

    return Shapes(n=ROWS, seed=1, size=SIZE)


@cache
def zoo_model(name: str) -> nn.Module:
    from vision_models import build

    return build(name, SIZE)


def assert_maps(ours: torch.Tensor, theirs: torch.Tensor, relative: float = 1e-4) -> None:
    from test_attribution import assert_equal_maps

    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert_equal_maps(ours, theirs.to(ours.dtype), relative=relative)


def close(ours: Any, theirs: Any, relative: float = 1e-5) -> None:
    """Equal up to ``relative`` times the largest magnitude of the reference."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = max(float(theirs.abs().max()) if theirs.numel() else 0.0, 1e-12)
    assert float((ours - theirs).abs().max()) <= relative * scale, (float((ours - theirs).abs().max()), scale)


# --- attribution -------------------------------------------------------------------------------------


def check_saliency(cell: Cell, res: Any) -> None:
    from captum.attr import Saliency

    targets = cell.predicted()
    assert torch.equal(res.targets, targets)
    assert_maps(res.attributions, Saliency(cell.model).attribute(cell.inputs, target=targets))


def check_integrated_gradients(cell: Cell, res: Any) -> None:
    from captum.attr import IntegratedGradients

    targets = cell.predicted()
    expected, delta = IntegratedGradients(cell.model).attribute(
        cell.inputs, baselines=0.0, target=targets, n_steps=8, method="gausslegendre", return_convergence_delta=True
    )
    assert_maps(res.attributions, expected)
    with torch.no_grad():
        change = (cell.model(cell.inputs) - cell.model(torch.zeros_like(cell.inputs))).gather(1, targets[:, None])
    torch.testing.assert_close(res.delta, delta.double(), rtol=1e-3, atol=1e-4 * float(change.abs().max()))


def has_functional_relu(model: nn.Module) -> bool:
    from matrix_references import relu_pass

    return any(name.startswith("relu:") for name in relu_pass(model, dataset().batch([0]).inputs).names)


def check_guided_backprop(cell: Cell, res: Any) -> None:
    from captum.attr import GuidedBackprop
    from matrix_references import guided_gradients

    targets = cell.predicted()
    assert_maps(res.attributions, guided_gradients(cell.model, cell.inputs, targets))
    if not has_functional_relu(cell.model):  # Captum overrides nn.ReLU modules only
        assert_maps(res.attributions, GuidedBackprop(cell.model).attribute(cell.inputs, target=targets))


def check_occlusion(cell: Cell, res: Any) -> None:
    from captum.attr import Occlusion

    x, targets = cell.inputs, cell.predicted()
    expected = Occlusion(cell.model).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=x.mean((2, 3), keepdim=True), target=targets
    )
    assert_maps(res.attributions, expected)


def check_grad_cam(cell: Cell, res: Any) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    assert res.layer == SPATIAL[cell.name]
    targets = cell.predicted()
    module = dict(cell.model.named_modules())[SPATIAL[cell.name]]
    expected = LayerGradCam(cell.model, module).attribute(cell.inputs, target=targets, relu_attributions=True)
    assert_maps(res.layer_attributions, expected)
    upsampled = LayerAttribution.interpolate(expected, (SIZE, SIZE), interpolate_mode="bilinear")
    assert_maps(res.attributions, upsampled.expand_as(cell.inputs))


def check_smoothgrad(cell: Cell, res: Any) -> None:
    """The mean of saliency over the noise pyengine draws: seed 0, 0.15 of each input's range."""
    from captum.attr import Saliency

    x, targets = cell.inputs, cell.predicted()
    generator = torch.Generator().manual_seed(0)
    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    noisy = [x + sigma * torch.randn(x.shape, generator=generator) for _ in range(2)]
    expected = torch.stack([Saliency(cell.model).attribute(n, target=targets) for n in noisy]).mean(0)
    assert_maps(res.attributions, expected)


def check_faithfulness(cell: Cell, res: Any) -> None:
    """The deletion curve starts at the model's score on the intact images and ends at its score on
    blank ones, insertion ends on the intact images; the pointing game from Captum's saliency."""
    from captum.attr import Saliency

    batch = cell.data.batch(range(8))
    x, labels, boxes = batch.inputs, batch.labels, batch.boxes
    assert res.images == 8
    with torch.no_grad():
        intact = cell.model(x).softmax(1).gather(1, labels[:, None]).mean()
        blank = cell.model(torch.zeros_like(x)).softmax(1).gather(1, labels[:, None]).mean()
    deletion, insertion = res.deletion_curves["saliency"], res.insertion_curves["saliency"]
    assert deletion.shape == insertion.shape == (5,)
    close(deletion[0], intact, 1e-6)
    close(insertion[-1], intact, 1e-6)
    close(deletion[-1], blank, 1e-6)
    peak = Saliency(cell.model).attribute(x, target=labels).sum(1).flatten(1).argmax(1)
    column, row = (peak % SIZE).double() + 0.5, (peak // SIZE).double() + 0.5
    inside = (column >= boxes[:, 0]) & (column <= boxes[:, 2]) & (row >= boxes[:, 1]) & (row <= boxes[:, 3])
    assert res.pointing["saliency"] == pytest.approx(float(inside.double().mean()))


# --- features ------------------------------------------------------------------------------------------


def check_filters(cell: Cell, res: Any) -> None:
    name, first = next((n, m) for n, m in cell.model.named_modules() if isinstance(m, nn.Conv2d))
    assert res.layer == name
    assert torch.equal(res.weights, first.weight.detach())


def check_activations(cell: Cell, res: Any) -> None:
    from matrix_references import record_values, unit_rows

    layer = FIRST_BLOCK[cell.name]
    assert res.layer == layer
    expected = record_values(cell.model, [layer], cell.inputs)[layer]
    close(res.maps, expected, 1e-6)
    close(res.channel_max, unit_rows(expected).amax(0), 1e-6)
    assert res.zero_fraction == pytest.approx(float((expected == 0).double().mean()))


def check_max_patches(cell: Cell, res: Any) -> None:
    """Top values, rows and positions from recorded values; each crop is the image inside the box
    the result states, and that box holds every input pixel its unit's gradient reaches (float64)."""
    from matrix_references import cloned_outputs, float64, locate_patch, record_values

    layer = SPATIAL[cell.name]
    assert res.layer == layer
    images = cell.all_inputs
    values = record_values(cell.model, [layer], images)[layer]
    best, where = values.flatten(2).max(-1)  # (rows, channels)
    ranked, rows = torch.sort(best.T, dim=1, descending=True, stable=True)  # ties: the lower row first
    k = res.values.shape[1]
    assert torch.equal(res.channels, torch.arange(values.shape[1]))
    close(res.values, ranked[:, :k], 1e-6)
    assert torch.equal(res.index, rows[:, :k])
    place = where.T.gather(1, rows[:, :k])
    assert torch.equal(res.position, torch.stack([place // values.shape[3], place % values.shape[3]], -1))
    model64 = float64(cell.model)
    for channel in range(2):
        for rank in range(2):
            row, (y, x) = int(res.index[channel, rank]), res.position[channel, rank].tolist()
            y0, y1, x0, x1 = locate_patch(res.patches[channel, rank], images[row])
            assert [y0, y1, x0, x1] == res.boxes[channel, rank].tolist()
            leaf = images[row : row + 1].double().requires_grad_(True)
            with cloned_outputs(model64, [layer]) as seen:
                model64(leaf)
            (grad,) = torch.autograd.grad(seen[layer][0, channel, y, x], leaf)
            reached = grad[0].abs().sum(0) > 0
            ys, xs = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
            assert y0 <= int(ys[0]) and int(ys[-1]) < y1 and x0 <= int(xs[0]) and int(xs[-1]) < x1, (
                f"unit {channel} at ({y}, {x}) reaches rows {int(ys[0])}-{int(ys[-1])}, columns "
                f"{int(xs[0])}-{int(xs[-1])}; the patch shows rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1}"
            )


def check_activation_maximization(cell: Cell, res: Any) -> None:
    """The objective recomputed on the returned images; the dataset's best from recorded values."""
    from matrix_references import record_values

    layer = SPATIAL[cell.name]
    assert res.names == (f"{layer} channel 0", f"{layer} channel 1")
    data = cell.all_inputs
    assert float(res.images.min()) >= float(data.min()) and float(res.images.max()) <= float(data.max())
    on_images = record_values(cell.model, [layer], res.images)[layer]
    close(res.objective, torch.stack([on_images[k, k].mean() for k in range(2)]), 1e-5)
    best = record_values(cell.model, [layer], data)[layer][:, :2].flatten(2).mean(2).amax(0)
    close(res.dataset_best, best, 1e-6)
    assert res.beats_dataset == pytest.approx(float((res.objective > res.dataset_best).double().mean()))
    assert res.curve["mean_objective"].shape == (3,)


# --- probes ----------------------------------------------------------------------------------------------


def probe_features(cell: Cell, res: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer (rows, units) from recorded values; per binary concept its (rows,) 0/1 labels;
    and the split checked: train, validation and test rows partition the rows."""
    from matrix_references import nonlinearity_calls, pooled_units, record_values

    layers = list(PROBE_LAYERS.get(cell.name, nonlinearity_calls(cell.model, cell.inputs)))
    values = record_values(cell.model, layers, cell.all_inputs)
    batch = cell.data.batch(range(ROWS))
    concepts = {
        f"{concept}={category}": (batch.concepts[concept] == code).long()
        for concept, categories in cell.data.concept_names.items()
        for code, category in enumerate(categories)
    }
    keys = {f"{layer}|{concept}" for layer in layers for concept in concepts}
    assert set(res.test_accuracy) == keys, sorted(set(res.test_accuracy) ^ keys)[:4]
    rows = torch.cat([res.train_rows, res.val_rows, res.test_rows])
    assert torch.equal(rows.sort().values, torch.arange(ROWS))
    return {layer: pooled_units(values[layer]) for layer in layers}, concepts


def check_probe_neurons(cell: Cell, res: Any) -> None:
    """Accuracy of the returned probes on recorded features; AUC and, for a few units, the fit
    itself against scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    features, concepts = probe_features(cell, res)
    train, test = res.train_rows, res.test_rows
    for layer, x in features.items():
        for concept, y in concepts.items():
            key = f"{layer}|{concept}"
            w, b = res.weight[key], res.bias[key]
            assert w.shape == (x.shape[1],), (key, tuple(w.shape), x.shape[1])
            hits = ((x[test] * w + b) > 0) == y[test].bool()[:, None]
            close(res.test_accuracy[key], hits.float().mean(0), 1e-6)
            units = range(min(16, x.shape[1]))
            auc = [roc_auc_score(y[test], x[test, u] * torch.sign(w[u])) for u in units]
            close(res.auc[key][: len(units)], auc, 1e-5)
            for unit in range(min(3, x.shape[1])):
                reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)
                reference.fit(x[train, unit : unit + 1].double().numpy(), y[train].numpy())
                assert float(w[unit]) == pytest.approx(reference.coef_[0, 0], rel=2e-2, abs=2e-3), (key, unit)
                assert float(b[unit]) == pytest.approx(reference.intercept_[0], rel=2e-2, abs=2e-3), (key, unit)


PROBE_L2 = 0.1  # mean loss + l2/2 |w|^2 is scikit-learn's C = 1 / (l2 * training rows)


def check_probe_linear(cell: Cell, res: Any) -> None:
    """Each concept's probe equals scikit-learn's L2 logistic regression on the standardised
    features; the accuracy is the returned probe's on the recorded test features."""
    from sklearn.linear_model import LogisticRegression

    features, concepts = probe_features(cell, res)
    train, test = res.train_rows, res.test_rows
    for layer, x in features.items():
        x = x.double()
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        for concept, y in concepts.items():
            key = f"{layer}|{concept}"
            weights, bias = res.weights[key].double(), res.bias[key].double()
            assert weights.shape == (x.shape[1],)
            hits = ((x[test] @ weights + bias) > 0) == y[test].bool()
            assert res.test_accuracy[key] == pytest.approx(float(hits.double().mean()))
            reference = LogisticRegression(C=1 / (PROBE_L2 * len(train)), tol=1e-12, max_iter=100_000)
            reference.fit(((x[train] - mean) / std).numpy(), y[train].numpy())
            # A fit stopped at the iteration limit is within |proximal gradient| / l2 of the optimum.
            error = float((weights * std - torch.from_numpy(reference.coef_[0])).abs().max())
            assert error <= max(1e-3 * float(np.abs(reference.coef_).max()), 2 * res.gradient_norm[layer] / PROBE_L2)


def check_probe_mlp(cell: Cell, res: Any) -> None:
    """No outside reference for the fit: the probes see the layers' real unit counts and the split's rows."""
    features, concepts = probe_features(cell, res)
    for accuracy in res.test_accuracy.values():  # a fraction of the test rows
        assert accuracy * len(res.test_rows) == pytest.approx(round(accuracy * len(res.test_rows)))
    widths = [(x.shape[1], len(res.train_rows), len(res.val_rows)) for x in features.values()]
    assert FIT_MLP_CALLS == [shape for shape in widths for _ in concepts for _ in range(2)]  # concept and control


@pytest.fixture
def spy_on_fit_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    spy_fit_mlp(monkeypatch)


# --- pathwise --------------------------------------------------------------------------------------------


def check_relu_layers(cell: Cell, layers: tuple[str, ...]) -> None:
    """The layers are the model's ReLU calls in order, named as layer references."""
    from matrix_references import relu_pass

    assert list(layers) == relu_pass(cell.model, cell.inputs).names


def check_path_linear(cell: Cell, res: Any) -> None:
    """f(x) = W(x)·x + b(x) with W the float64 input gradient."""
    from matrix_references import path_model

    check_relu_layers(cell, res.layers)
    targets = cell.predicted()
    assert torch.equal(res.targets, targets)
    weight, bias, output = path_model(cell.model, cell.inputs, targets)
    close(res.output, output)
    close(res.weight, weight, 1e-4)
    close(res.bias_part, bias, 1e-4 * float(output.abs().max()) / max(float(bias.abs().max()), 1e-12))
    close(res.weight_part + res.bias_part, res.output)


def check_hierarchical(cell: Cell, res: Any) -> None:
    """Targets from the outputs; each returned path's W^path and b^path are the float64 gradients
    masked to its units; on the plain chain (demo_cnn) the paths are the autograd reference's."""
    from matrix_references import path_model

    check_relu_layers(cell, res.layers)
    with torch.no_grad():
        order = cell.model(cell.inputs).argsort(1, descending=True)
    assert torch.equal(res.targets, order[:, :2])
    assert bool((res.scores[:, :, :-1] >= res.scores[:, :, 1:]).all())
    n = len(res.layers)
    for t in range(2):
        best = {k: res.paths[:, t, 0, k : k + 1] for k in range(n)}
        weight, bias, _ = path_model(cell.model, cell.inputs, res.targets[:, t], best)
        close(res.path_weight[:, t], weight, 1e-4)
        close(res.path_bias[:, t], bias, 1e-4)
        top = {k: units for k, units in best.items() if k >= n // 2}
        close(res.top_weight[:, t], path_model(cell.model, cell.inputs, res.targets[:, t], top)[0], 1e-4)
    if cell.name in CHAINS:
        from matrix_references import greedy_paths

        paths, scores = greedy_paths(cell.model, cell.inputs, res.targets)
        assert torch.equal(res.paths, paths)
        close(res.scores, scores, 1e-5)
    if cell.name == "demo_cnn":  # and the hand-built chain through the reference of tests/test_pathwise.py
        from matrix_references import record_values

        from pathwise_reference import reference_paths

        f, c = cell.model.features, cell.model.classifier
        steps = [(f.pool1, f.conv2), (f.pool2, f.conv3), (f.pool3, c.fc1), (None, c.fc2)]
        relus = ["features.relu1", "features.relu2", "features.relu3", "classifier.relu4"]
        activations = record_values(cell.model, relus, cell.inputs)
        paths, scores = reference_paths(steps, [activations[r] for r in relus], res.targets, 1)
        assert torch.equal(res.paths, paths)
        close(res.scores, scores, 1e-5)


# --- degeneracy ------------------------------------------------------------------------------------------


def default_values(cell: Cell, res_layers: Any) -> dict[str, torch.Tensor]:
    """Every nonlinearity call's values over the data, checked to be the technique's layers."""
    from matrix_references import nonlinearity_calls, record_values

    layers = nonlinearity_calls(cell.model, cell.inputs)
    assert list(res_layers) == layers
    return record_values(cell.model, layers, cell.all_inputs)


def check_gram_spectrum(cell: Cell, res: Any) -> None:
    """The float64 covariance eigenvalues of each layer's units, positions as samples."""
    from matrix_references import covariance_spectrum, unit_rows

    for layer, values in default_values(cell, res.units).items():
        rows = unit_rows(values)
        assert res.units[layer] == rows.shape[1] and res.samples[layer] == rows.shape[0]
        expected = covariance_spectrum(rows)
        close(res.eigenvalues[layer], expected, 1e-6)


def check_jacobian_gram(cell: Cell, res: Any) -> None:
    """E[JᵀJ] over units from float64 autograd (every output coordinate)."""
    from matrix_references import jacobian_grams, nonlinearity_calls

    layers = nonlinearity_calls(cell.model, cell.inputs)
    assert list(res.units) == layers and res.sources == "exact"
    for layer, gram in jacobian_grams(cell.model, layers, cell.all_inputs).items():
        assert res.units[layer] == gram.shape[0]
        close(res.gram[layer], gram, 1e-4)


def check_relu_sync(cell: Cell, res: Any) -> None:
    """Firing (> 0) per unit over rows and positions: agreement, rates, dead and always-on units,
    and the groups of live units with identical patterns."""
    from matrix_references import check_firing, unit_rows

    for layer, values in default_values(cell, res.group).items():
        check_firing(res, layer, (unit_rows(values) > 0).double())


def check_interaction_basis(cell: Cell, res: Any, layers: tuple[str, ...] = ()) -> None:
    """Against Grams computed here (recorded activations, VJPs through hooks): C G Cᵀ = Λ, the
    Jacobian Gram towards the next basis in the unwhitened basis C⁺Λ^½ is Λ, the edges
    E[(∂f̂_next/∂f̂ · f̂)²], and projecting a layer through C⁺C leaves the outputs unchanged."""
    from matrix_references import cloned_outputs

    layers = layers or INTERACTION_LAYERS[cell.name]
    x = cell.data.batch(range(16)).inputs
    with cloned_outputs(cell.model, list(layers)) as seen:
        output = cell.model(x).flatten(1)
    n = x.shape[0]
    for position, layer in enumerate(layers):
        f = seen[layer].flatten(1)
        basis, inverse = res.basis[layer].double(), res.inverse[layer].double()
        assert res.width[layer] == f.shape[1] and res.basis_size[layer] == basis.shape[0] <= n
        gram = f.detach().double().T @ f.detach().double() / n
        spectrum = torch.diagonal(basis @ gram @ basis.T)
        close(basis @ gram @ basis.T, torch.diag(spectrum), 1e-6)
        following = layers[position + 1] if position + 1 < len(layers) else None
        target = seen[following].flatten(1) if following else output
        rows = res.basis[following].to(target.dtype) if following else torch.eye(target.shape[1])
        sensitivities = [
            torch.autograd.grad(target, seen[layer], grad_outputs=row.expand_as(target), retain_graph=True)[0]
            .flatten(1)
            .double()
            for row in rows
        ]
        jacobian_gram = sum(g.T @ g for g in sensitivities) / n
        unwhitened = inverse * spectrum.sqrt()
        close(unwhitened.T @ jacobian_gram @ unwhitened, torch.diag(spectrum), 1e-5)
        if following:
            coordinates = f.detach().double() @ basis.T
            edges = torch.stack([((g @ inverse) * coordinates).square().mean(0) for g in sensitivities])
            close(res.edges[f"{layer}->{following}"], edges, 1e-4)
        assert res.output_change[layer] <= 1e-4 * float(output.detach().abs().max())


def check_llc(cell: Cell, res: Any) -> None:
    """λ̂ from its own traces; L(w*) the cross-entropy here; the first draw, at w* on every row, is 0."""
    batch = cell.data.batch(range(ROWS))
    with torch.no_grad():
        loss = F.cross_entropy(cell.model(batch.inputs), batch.labels)
    assert res.init_loss == pytest.approx(float(loss), rel=1e-5)
    assert res.nbeta == pytest.approx(ROWS / math.log(ROWS))
    close(res.llc_per_chain, res.traces.mean(1), 1e-12)
    assert res.llc == pytest.approx(float(res.llc_per_chain.mean()))
    assert res.llc_std == pytest.approx(float(res.llc_per_chain.std()))
    assert float(res.traces[:, 0].abs().max()) <= 1e-5 * res.nbeta * res.init_loss


def check_unit_ablation(cell: Cell, res: Any) -> None:
    from matrix_references import check_ablation_drops

    check_ablation_drops(res, cell.model, lambda: cell.model(cell.inputs))


def check_logit_margin(cell: Cell, res: Any) -> None:
    with torch.no_grad():
        top = cell.model(cell.inputs).topk(2, dim=1)
    assert torch.equal(res.predictions, top.indices[:, 0])
    close(res.margins, top.values[:, 0] - top.values[:, 1], 1e-6)


PER_LAYERS = {name: {"layers": layers} for name, layers in PROBE_LAYERS.items()}
SPECS: dict[str, Spec] = {
    "saliency": Spec("Captum Saliency", check_saliency),
    "integrated-gradients": Spec(
        "Captum IntegratedGradients (maps and convergence delta)", check_integrated_gradients, {"n_steps": 8}
    ),
    "guided-backprop": Spec(
        "Captum GuidedBackprop; float64 gradients through guided ReLUs (`F.relu` patched)",
        check_guided_backprop,
        notes={"densenet": "✓ float64 only: Captum misses its `F.relu`"},
    ),
    "occlusion": Spec("Captum Occlusion", check_occlusion, {"window": (8, 8), "stride": (8, 8)}),
    "grad-cam": Spec("Captum LayerGradCam on the default layer", check_grad_cam),
    "smoothgrad": Spec("mean of Captum Saliency over the same seeded noise", check_smoothgrad, {"samples": 2}),
    "faithfulness": Spec(
        "deletion/insertion ends = the model's scores on intact and blank images; pointing game from Captum",
        check_faithfulness,
        {"techniques": ("saliency",), "stop": 8, "steps": 4},
    ),
    "filters": Spec("the first Conv2d's weights", check_filters),
    "activations": Spec("values recorded by a hook on the default layer", check_activations),
    "max-patches": Spec(
        "top values, rows, positions recorded by a hook; each crop holds its unit's float64 gradient support",
        check_max_patches,
        {"k": 4},
    ),
    "activation-maximization": Spec(
        "objective recomputed on its images; the dataset's best from recorded values",
        check_activation_maximization,
        {"steps": 3, "channels": (0, 1)},
    ),
    "probe-neurons": Spec(
        "scikit-learn LogisticRegression and roc_auc_score on recorded features",
        check_probe_neurons,
        per_model=PER_LAYERS,
    ),
    "probe-linear": Spec(
        "scikit-learn LogisticRegression on recorded features",
        check_probe_linear,
        {"l2": PROBE_L2},
        per_model=PER_LAYERS,
    ),
    "probe-mlp": Spec(
        "the real unit counts and split sizes (no outside reference for the fit)",
        check_probe_mlp,
        {"epochs": 5},
        per_model=PER_LAYERS,
    ),
    "path-linear": Spec("f = W·x + b with W the float64 input gradient", check_path_linear),
    "hierarchical-decomposition": Spec(
        "W^path, b^path = float64 gradients masked to the path; on chains the paths = Algorithm 1 by autograd",
        check_hierarchical,
        notes={"resnet50": "✓ W^path only", "densenet": "✓ W^path only"},
    ),
    "gram-spectrum": Spec("numpy float64 covariance eigenvalues", check_gram_spectrum),
    "jacobian-gram": Spec("float64 autograd E[JᵀJ]", check_jacobian_gram),
    "relu-sync": Spec("firing patterns of recorded values", check_relu_sync),
    "interaction-basis": Spec(
        "activation and Jacobian Grams, edges and the projection's output change, from hooks",
        check_interaction_basis,
        {"stop": 16, "batch_size": 16, "units": "flatten"},  # the reference takes every value of a row as a unit
        per_model={name: {"layers": layers} for name, layers in INTERACTION_LAYERS.items()},
    ),
    "llc": Spec(
        "λ̂ = mean of its traces; L(w*) = cross-entropy; the first draw, at w*, is 0",
        check_llc,
        {"chains": 2, "draws": 3, "burn_in": 0, "batch_size": ROWS},
    ),
    "logit-margin": Spec("top-2 logits", check_logit_margin),  # the example plugin, when installed
    "unit-ablation": Spec(  # the example plugin, when installed
        "score drops with the unit zeroed by a forward hook", check_unit_ablation, {"units": 2}
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def cells() -> list[Any]:
    params = []
    for technique in host.techniques():
        for name in MODELS:
            params.append(pytest.param(technique, name, id=f"{technique}-{name}"))
    return params


@pytest.mark.parametrize("technique, name", cells())
def test_cell(technique: str, name: str, request: pytest.FixtureRequest) -> None:
    assert technique in SPECS, f"technique {technique!r} has no reference in the architecture matrix; add one"
    spec = SPECS[technique]
    if technique == "probe-mlp":
        request.getfixturevalue("spy_on_fit_mlp")
    cell = Cell(technique, name, zoo_model(name))
    run_cell(cell, spec, REFUSALS.get((technique, name)))


def test_grad_cam_refuses_a_token_layer() -> None:
    with pytest.raises(PyengineError) as caught:
        Cell("grad-cam", "vit", zoo_model("vit")).run(layers=TOKEN_LAYER)
    message = str(caught.value)
    assert "\n" not in message and TOKEN_LAYER in message, message


def bypassed_by_the_output(model: nn.Module, reference: str, x: torch.Tensor) -> bool:
    """Does the output still depend on the input with ``reference``'s value held fixed (a constant
    in its place)? Then some path goes around it."""
    from matrix_references import split_reference

    path, call = split_reference(reference)
    module, calls = dict(model.named_modules())[path], [0]

    def hold(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        return torch.ones_like(output).detach() if calls[0] == call else None

    handle = module.register_forward_hook(hold)
    try:
        leaf = x.clone().requires_grad_(True)
        output = model(leaf)
    finally:
        handle.remove()
    if not output.requires_grad:
        return False
    (grad,) = torch.autograd.grad(output.sum(), leaf, allow_unused=True)
    return grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("name", ["mobilenet_v3", "resnet50"])
def test_interaction_basis_default_layers(name: str) -> None:
    """The default chain: every nonlinearity output no path to the output goes around, with at most
    4096 values (units="flatten", the layout of check_interaction_basis); each basis keeps what
    reaches the output. A layer a path goes around is refused when named."""
    from matrix_references import nonlinearity_calls, record_values

    cell = Cell("interaction-basis", name, zoo_model(name))
    x = cell.inputs[:1]
    calls = nonlinearity_calls(cell.model, x)
    sizes = record_values(cell.model, calls, x)
    around = [ref for ref in calls if bypassed_by_the_output(cell.model, ref, x)]
    expected = [ref for ref in calls if ref not in around and sizes[ref].numel() <= 4096]
    assert around and expected
    res = cell.run(stop=16, batch_size=16, units="flatten")
    layers = tuple(reversed(res.width))
    assert list(layers) == expected
    check_interaction_basis(cell, res, layers)
    with pytest.raises(PyengineError, match=rf"the input reaches the output around '{re.escape(around[0])}'"):
        cell.run(stop=16, batch_size=16, layers=(around[0], expected[-1]))


def test_the_tables_name_real_cells() -> None:
    registered = set(host.techniques()) | {"logit-margin", "unit-ablation"}
    for technique, name in REFUSALS:
        assert technique in registered and name.split(":")[0] in MODELS, (technique, name)
    assert set(SPECS) <= registered


# --- the table -------------------------------------------------------------------------------------------


def table() -> str:
    """The matrix as markdown (see ``matrix_harness.markdown_table``)."""
    return markdown_table(MODELS, SPECS, REFUSALS)


def test_the_table_has_a_row_per_technique() -> None:
    rows = table().splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(host.techniques())
    assert all(row.count(" | ") == len(MODELS) + 1 for row in rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        raise SystemExit("usage: python tests/test_architectures.py --table")
    print(table())
