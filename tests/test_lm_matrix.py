"""The architecture matrix for language models: every registered technique on Hugging Face BERT
(a sequence classifier) and GPT-2 (a causal LM), built from configs (tests/lm_models.py), with
token ids of varying length padded with their attention mask.

Each cell either equals an independent reference (Captum's Layer* techniques and FeatureAblation,
float64 autograd, numpy/scikit-learn over the real tokens, values recorded by a forward hook that
clones, exact identities where a technique has no outside reference) or raises one
``PyengineError`` line saying why the technique does not apply to the model; cells the engine
gets wrong today are strict xfails (``PENDING``). Units of (B, T, D) layers are the D features,
with the real tokens (never the padding) as samples. A technique registered without an entry in
``SPECS`` fails its cells: a new technique joins the matrix with its reference.

``python tests/test_lm_matrix.py --table`` prints the matrix as markdown (for the README).
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

from matrix_references import check_firing, nonlinearity_calls  # isort: skip
from matrix_harness import FIT_MLP_CALLS, Spec, markdown_table, run_cell, single_thread, spy_fit_mlp  # isort: skip

pytest.importorskip("transformers")
pytest.importorskip("captum")

from lm_matrix_tables import (  # noqa: E402  # isort: skip
    MODELS,
    ROWS,
    EXPLAINED,
    JACOBIAN_ROWS,
    EMBEDDINGS,
    WORD_EMBEDDINGS,
    BLOCKS,
    INTERACTION_LAYERS,
    REFUSALS,
    PENDING,
    DEFAULT_REFUSALS,
)
from lm_models import PAD_ID  # noqa: E402

Batch = dict[str, torch.Tensor]


# --- the data and the models -----------------------------------------------------------------------


@cache
def corpus() -> tuple[dict[str, Any], ...]:
    """Token items with the row concepts only ("topic_token" is one code per token, not per row)."""
    from lm_models import token_corpus

    items = token_corpus(ROWS, seed=3)
    for item in items:
        item["concepts"] = {k: v for k, v in item["concepts"].items() if k != "topic_token"}
    return tuple(items)


@cache
def dataset() -> Any:
    from pyengine.data.base import TorchDataset

    return TorchDataset(list(corpus()))


@cache
def lm(name: str) -> nn.Module:
    from lm_models import build_lm

    return build_lm(name)  # type: ignore[arg-type]


def padded(rows: int) -> Batch:
    """The first ``rows`` items right-padded: the dict a user passes, and what the dataset batches hold."""
    from lm_models import pad

    ids, mask = pad(list(corpus()[:rows]))
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Cell:
    technique: str
    name: str
    model: nn.Module

    @property
    def data(self) -> Any:
        return dataset()

    @property
    def inputs(self) -> Batch:
        return padded(EXPLAINED)

    @property
    def all_inputs(self) -> Batch:
        return padded(ROWS)

    def logits(self, batch: Batch | None = None) -> torch.Tensor:
        """The scores targets index: BERT's logits, GPT-2's at each row's last real token."""
        from lm_references import target_logits

        batch = batch or self.inputs
        with torch.no_grad():
            return target_logits(self.model, batch["input_ids"], batch["attention_mask"])

    def predicted(self) -> torch.Tensor:
        return self.logits().argmax(1)

    def run(self, **options: Any) -> Any:
        technique = host.get_technique(self.technique)
        if technique.explains_inputs or technique.needs_inputs:
            return pyengine.run(self.technique, self.model, self.inputs, progress=False, **options)
        return pyengine.run(self.technique, self.model, data=self.data, progress=False, **options)


Check = Callable[[Cell, Any], None]


def close(ours: Any, theirs: Any, relative: float = 1e-5) -> None:
    """Equal up to ``relative`` times the largest magnitude of the reference."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = max(float(theirs.abs().max()) if theirs.numel() else 0.0, 1e-12)
    assert float((ours - theirs).abs().max()) <= relative * scale, (float((ours - theirs).abs().max()), scale)


# --- layer values over the real tokens (forward hooks that clone; nothing from pyengine) ----------------


def record(model: nn.Module, references: list[str], batch: Batch) -> dict[str, torch.Tensor]:
    """The referenced module outputs for ``model(**batch)`` (no gradients)."""
    from matrix_references import cloned_outputs

    with cloned_outputs(model, references) as values, torch.no_grad():
        model(**batch)
    return {name: values[name].detach() for name in references}


def real_rows(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(samples, units): a (B, T, D) sequence's real tokens, a (B, D) layer's rows."""
    return value[mask.bool()] if value.dim() == 3 else value


def pooled(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, units): a sequence's mean over its real tokens, a (B, D) layer as it is."""
    if value.dim() == 2:
        return value
    weights = mask.to(value.dtype)[..., None]
    return (value * weights).sum(1) / weights.sum(1)


def default_values(cell: Cell, res_layers: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every nonlinearity call's values over the data (checked to be the technique's layers), and the mask."""
    layers = nonlinearity_calls(cell.model, cell.inputs)
    assert list(res_layers) == layers
    batch = cell.all_inputs
    return record(cell.model, layers, batch), batch["attention_mask"]


# --- attribution -------------------------------------------------------------------------------------


def check_layer_maps(cell: Cell, res: Any, expected: torch.Tensor, layer: str) -> None:
    """Maps equal to the reference; per-token scores their feature sums; padding scores 0."""
    assert res.layer == layer and res.attributions.shape == expected.shape
    close(res.attributions, expected, 1e-5)
    torch.testing.assert_close(res.token_scores, res.attributions.sum(-1))
    padding = cell.inputs["attention_mask"] == 0
    assert padding.any() and bool((res.token_scores[padding] == 0).all())


def check_saliency(cell: Cell, res: Any) -> None:
    """times_values at a block's output: Captum LayerGradientXActivation."""
    from lm_references import layer_gradient_x_activation

    targets, layer = cell.predicted(), BLOCKS[cell.name]
    assert torch.equal(res.targets, targets)
    ids, mask = cell.inputs["input_ids"], cell.inputs["attention_mask"]
    expected = layer_gradient_x_activation(cell.model, cell.model.get_submodule(layer), ids, mask, targets)
    check_layer_maps(cell, res, expected, layer)


def check_smoothgrad(cell: Cell, res: Any) -> None:
    """Noise of 0.15 x each row's range of the embedding's output, drawn from the run's seeded
    generator; the mean of the gradients at the noisy values (a hook puts them in the model)."""
    from lm_references import target_logits

    targets, layer = cell.predicted(), EMBEDDINGS[cell.name]
    assert torch.equal(res.targets, targets)
    module = cell.model.get_submodule(layer)
    ids, mask = cell.inputs["input_ids"], cell.inputs["attention_mask"]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            target_logits(cell.model, ids, mask)
    finally:
        handle.remove()
    z = seen[0]
    flat = z.flatten(1)
    sigma = (0.15 * (flat.amax(1) - flat.amin(1))).reshape(-1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros_like(z, dtype=torch.float64)
    for _ in range(2):
        noisy = (z + sigma * torch.randn(z.shape, generator=generator)).requires_grad_(True)
        handle = module.register_forward_hook(lambda m, a, out, noisy=noisy: noisy)
        try:
            score = target_logits(cell.model, ids, mask).gather(1, targets[:, None]).sum()
        finally:
            handle.remove()
        total += torch.autograd.grad(score, noisy)[0].double()
    check_layer_maps(cell, res, (total / 2).float(), layer)


def check_integrated_gradients(cell: Cell, res: Any) -> None:
    """Captum LayerIntegratedGradients at the embedding from PAD at every real token; the delta
    from the model's scores on the input and on those baseline ids."""
    from lm_references import baseline_like, layer_integrated_gradients, target_scores

    targets, layer = cell.predicted(), EMBEDDINGS[cell.name]
    ids, mask = cell.inputs["input_ids"], cell.inputs["attention_mask"]
    baseline = baseline_like(ids, mask, PAD_ID)
    module = cell.model.get_submodule(layer)
    expected = layer_integrated_gradients(cell.model, module, ids, mask, targets, baseline, n_steps=8)
    check_layer_maps(cell, res, expected, layer)
    with torch.no_grad():
        change = target_scores(cell.model, ids, mask, targets) - target_scores(cell.model, baseline, mask, targets)
    delta = expected.double().flatten(1).sum(1) - change.double()
    torch.testing.assert_close(res.delta, delta, rtol=1e-3, atol=1e-5 * float(change.abs().max()))


def check_occlusion(cell: Cell, res: Any) -> None:
    """Captum FeatureAblation, one feature per token replaced by PAD; padding never occluded."""
    from lm_references import token_occlusion

    targets = cell.predicted()
    assert torch.equal(res.targets, targets)
    ids, mask = cell.inputs["input_ids"], cell.inputs["attention_mask"]
    expected = token_occlusion(cell.model, ids, mask, targets, PAD_ID)
    close(res.attributions, expected, 1e-5)
    assert bool((res.attributions[mask == 0] == 0).all())


# --- features ------------------------------------------------------------------------------------------


def check_activations(cell: Cell, res: Any) -> None:
    """The block's values as recorded; per-feature maxima and zero fractions over the real tokens."""
    layer = BLOCKS[cell.name]
    assert res.layer == layer and res.unit_axis == "last"
    values = record(cell.model, [layer], cell.inputs)[layer]
    close(res.maps, values, 1e-6)
    rows = real_rows(values, cell.inputs["attention_mask"])
    close(res.channel_max, rows.amax(0), 1e-6)
    close(res.channel_zero_fraction, (rows == 0).double().mean(0), 1e-12)
    assert res.zero_fraction == pytest.approx(float((rows == 0).double().mean()))


def top_tokens(cell: Cell, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per feature of the block over the data: the k largest values at real tokens, their rows
    (ties: the lower row first) and token positions."""
    batch = cell.all_inputs
    values = record(cell.model, [BLOCKS[cell.name]], batch)[BLOCKS[cell.name]]
    best, where = values.masked_fill(batch["attention_mask"][..., None] == 0, -torch.inf).max(1)  # (rows, D)
    ranked, rows = torch.sort(best.T, dim=1, descending=True, stable=True)
    return ranked[:, :k], rows[:, :k], where.T.gather(1, rows[:, :k])


def check_max_patches(cell: Cell, res: Any) -> None:
    """Texts, not patches: each feature's top real tokens from recorded values, the ids around each
    (-1 past the text's ends), and the box of that window within the text."""
    k, context = res.values.shape[1], (res.texts.shape[2] - 1) // 2
    assert res.layer == BLOCKS[cell.name] and res.unit_axis == "last" and res.scanned == ROWS
    values, rows, positions = top_tokens(cell, k)
    assert torch.equal(res.channels, torch.arange(values.shape[0]))
    close(res.values, values, 1e-6)
    assert torch.equal(res.index, rows) and torch.equal(res.position[..., 0], positions)
    ids, mask = cell.all_inputs["input_ids"], cell.all_inputs["attention_mask"]
    for feature in range(values.shape[0]):
        for rank in range(k):
            row, token = int(rows[feature, rank]), int(positions[feature, rank])
            length = int(mask[row].sum())
            window = range(token - context, token + context + 1)
            expected = [int(ids[row, t]) if 0 <= t < length else -1 for t in window]
            assert res.texts[feature, rank].tolist() == expected, (feature, rank)
            start, end = max(token - context, 0), min(token + context + 1, length)
            assert res.boxes[feature, rank].tolist() == [start, end, 0, 1], (feature, rank)


# --- probes ----------------------------------------------------------------------------------------------


def probe_features(cell: Cell, res: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per layer (rows, D) features, the mean over each row's real tokens; the concept's 0/1 labels;
    and the split checked: train, validation and test rows partition the rows."""
    values, mask = default_values(cell, res.unit_axis)
    assert set(res.test_accuracy) == {f"{layer}|marker" for layer in values}
    rows = torch.cat([res.train_rows, res.val_rows, res.test_rows])
    assert torch.equal(rows.sort().values, torch.arange(ROWS))
    marker = torch.tensor([item["concepts"]["marker"] for item in corpus()])
    return {layer: pooled(value, mask) for layer, value in values.items()}, marker


def check_probe_neurons(cell: Cell, res: Any) -> None:
    """Accuracy of the returned probes on the pooled features; AUC and, for a few units, the fit
    itself against scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    features, y = probe_features(cell, res)
    train, test = res.train_rows, res.test_rows
    for layer, x in features.items():
        key = f"{layer}|marker"
        w, b = res.weight[key], res.bias[key]
        assert w.shape == (x.shape[1],), (key, tuple(w.shape), x.shape[1])
        hits = ((x[test] * w + b) > 0) == y[test].bool()[:, None]
        close(res.test_accuracy[key], hits.float().mean(0), 1e-6)
        auc = [roc_auc_score(y[test], x[test, u] * torch.sign(w[u])) for u in range(16)]
        close(res.auc[key][:16], auc, 1e-5)
        for unit in range(3):
            reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)
            reference.fit(x[train, unit : unit + 1].double().numpy(), y[train].numpy())
            assert float(w[unit]) == pytest.approx(reference.coef_[0, 0], rel=2e-2, abs=2e-3), (key, unit)
            assert float(b[unit]) == pytest.approx(reference.intercept_[0], rel=2e-2, abs=2e-3), (key, unit)


PROBE_L2 = 0.1  # mean loss + l2/2 |w|^2 is scikit-learn's C = 1 / (l2 * training rows)


def check_probe_linear(cell: Cell, res: Any) -> None:
    """The probe equals scikit-learn's L2 logistic regression on the standardised pooled features;
    the accuracy is the returned probe's on the pooled test features."""
    from sklearn.linear_model import LogisticRegression

    features, y = probe_features(cell, res)
    train, test = res.train_rows, res.test_rows
    for layer, x in features.items():
        key = f"{layer}|marker"
        x = x.double()
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        weights, bias = res.weights[key].double(), res.bias[key].double()
        assert weights.shape == (x.shape[1],)
        hits = ((x[test] @ weights + bias) > 0) == y[test].bool()
        assert res.test_accuracy[key] == pytest.approx(float(hits.double().mean()))
        reference = LogisticRegression(C=1 / (PROBE_L2 * len(train)), tol=1e-12, max_iter=100_000)
        reference.fit(((x[train] - mean) / std).numpy(), y[train].numpy())
        # A fit stopped at the iteration limit is within |proximal gradient| / l2 of the optimum.
        error = float((weights * std - torch.from_numpy(reference.coef_[0])).abs().max())
        assert error <= max(1e-3 * float(np.abs(reference.coef_).max()), 2 * res.gradient_norm[layer] / PROBE_L2)


@pytest.fixture
def spy_on_fit_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    spy_fit_mlp(monkeypatch)


def check_probe_mlp(cell: Cell, res: Any) -> None:
    """No outside reference for the fit: the probes see D features per layer and the split's rows."""
    features, _ = probe_features(cell, res)
    for accuracy in res.test_accuracy.values():  # a fraction of the test rows
        assert accuracy * len(res.test_rows) == pytest.approx(round(accuracy * len(res.test_rows)))
    widths = [(x.shape[1], len(res.train_rows), len(res.val_rows)) for x in features.values()]
    assert FIT_MLP_CALLS == [shape for shape in widths for _ in range(2)]  # concept and control


# --- degeneracy ------------------------------------------------------------------------------------------


def check_gram_spectrum(cell: Cell, res: Any) -> None:
    """The float64 (1/n) covariance eigenvalues of each layer's D features, real tokens as samples."""
    from matrix_references import covariance_spectrum

    values, mask = default_values(cell, res.units)
    for layer, value in values.items():
        rows = real_rows(value, mask)
        assert res.units[layer] == value.shape[-1] and res.samples[layer] == rows.shape[0]
        close(res.eigenvalues[layer], covariance_spectrum(rows), 1e-6)


def jacobian_grams(model: nn.Module, references: list[str], batch: Batch) -> dict[str, torch.Tensor]:
    """E[JᵀJ] over the D features, summed over real tokens, for J = ∂ output / ∂ layer in float64:
    every output coordinate of BERT's logits, every coordinate of GPT-2's logits at the real positions."""
    from lm_references import float64
    from matrix_references import cloned_outputs

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with float64(model) as model64:
        with cloned_outputs(model64, references) as values:
            logits = model64(input_ids=ids, attention_mask=mask).logits
        if logits.dim() == 3:
            logits = logits * mask[..., None].to(logits.dtype)  # a padded position's logits are no output
        outputs = logits.flatten(1)
        grams = {name: torch.zeros((), dtype=torch.float64) for name in references}
        for o in range(outputs.shape[1]):
            rows = torch.autograd.grad(outputs[:, o].sum(), [values[name] for name in references], retain_graph=True)
            for name, row in zip(references, rows):
                g = real_rows(row, mask)
                grams[name] = grams[name] + g.T @ g
    return {name: gram / ids.shape[0] for name, gram in grams.items()}


def check_jacobian_gram(cell: Cell, res: Any) -> None:
    layers = nonlinearity_calls(cell.model, cell.inputs)
    assert list(res.units) == layers and res.sources == "exact"
    for layer, gram in jacobian_grams(cell.model, layers, padded(JACOBIAN_ROWS)).items():
        assert res.units[layer] == gram.shape[0]
        close(res.gram[layer], gram, 1e-4)


def check_relu_sync(cell: Cell, res: Any) -> None:
    """Firing (> 0) per feature over the real tokens: agreement, rates, dead and always-on units,
    and the groups of live units with identical patterns."""
    values, mask = default_values(cell, res.group)
    for layer, value in values.items():
        check_firing(res, layer, (real_rows(value, mask) > 0).double())


def check_interaction_basis(cell: Cell, res: Any, layer: str = "", batch: Batch | None = None) -> None:
    """One layer against Grams computed here (recorded values over the real tokens, VJPs through
    hooks): C G Cᵀ = Λ, the Jacobian Gram of the outputs (a causal LM's at its real positions) in
    the unwhitened basis C⁺Λ^½ is Λ, and projecting the layer through C⁺C leaves the outputs unchanged."""
    from matrix_references import cloned_outputs

    if not layer:  # the default chain
        (layer,) = INTERACTION_LAYERS[cell.name]
    assert tuple(res.basis) == (layer,)
    batch = batch or cell.all_inputs
    mask = batch["attention_mask"]
    with cloned_outputs(cell.model, [layer]) as seen:
        logits = cell.model(**batch).logits
    output = (logits * mask[..., None] if logits.dim() == 3 else logits).flatten(1)
    f, n = seen[layer], logits.shape[0]
    rows = real_rows(f.detach(), mask).double()
    basis, inverse = res.basis[layer].double(), res.inverse[layer].double()
    assert res.width[layer] == f.shape[-1] and res.basis_size[layer] == basis.shape[0]
    gram = rows.T @ rows / rows.shape[0]
    spectrum = torch.diagonal(basis @ gram @ basis.T)
    close(basis @ gram @ basis.T, torch.diag(spectrum), 1e-6)
    jacobian_gram = torch.zeros_like(gram)
    for k in range(output.shape[1]):
        sensitivity = real_rows(torch.autograd.grad(output[:, k].sum(), f, retain_graph=True)[0], mask).double()
        jacobian_gram += sensitivity.T @ sensitivity / n
    unwhitened = inverse * spectrum.sqrt()
    close(unwhitened.T @ jacobian_gram @ unwhitened, torch.diag(spectrum), 1e-5)
    assert res.output_change[layer] <= 1e-4 * float(logits.detach().abs().max())


def check_llc(cell: Cell, res: Any) -> None:
    """λ̂ from its own traces; L(w*) the training loss computed here (BERT: cross-entropy with the
    labels; GPT-2: next-token cross-entropy over pairs of real tokens); the first draw, at w*, is 0."""
    batch = cell.all_inputs
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = cell.model(**batch).logits
    if cell.name == "gpt2":
        pairs = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
        loss = F.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs])
    else:
        loss = F.cross_entropy(logits, torch.tensor([item["label"] for item in corpus()]))
    assert res.init_loss == pytest.approx(float(loss), rel=1e-5)
    assert res.nbeta == pytest.approx(ROWS / math.log(ROWS))
    close(res.llc_per_chain, res.traces.mean(1), 1e-12)
    assert res.llc == pytest.approx(float(res.llc_per_chain.mean()))
    assert res.llc_std == pytest.approx(float(res.llc_per_chain.std()))
    assert float(res.traces[:, 0].abs().max()) <= 1e-5 * res.nbeta * res.init_loss


def check_unit_ablation(cell: Cell, res: Any) -> None:
    from matrix_references import check_ablation_drops

    check_ablation_drops(res, cell.model, lambda: cell.logits())


def check_logit_margin(cell: Cell, res: Any) -> None:
    top = cell.logits().topk(2, dim=1)
    assert torch.equal(res.predictions, top.indices[:, 0])
    close(res.margins, top.values[:, 0] - top.values[:, 1], 1e-6)


def check_refused(cell: Cell, res: Any) -> None:
    raise AssertionError(f"{cell.technique} ran on {cell.name}; the matrix expects it to refuse (REFUSALS)")


REFUSED = "one `PyengineError` line saying why (pattern in REFUSALS)"
ON_BLOCKS = {name: {"layers": layer} for name, layer in BLOCKS.items()}
ON_EMBEDDINGS = {name: {"layers": layer} for name, layer in EMBEDDINGS.items()}
SPECS: dict[str, Spec] = {
    "saliency": Spec(
        "Captum LayerGradientXActivation at a block (`times_values`, `abs=False`)",
        check_saliency,
        {"times_values": True, "abs": False},
        per_model=ON_BLOCKS,
    ),
    "integrated-gradients": Spec(
        "Captum LayerIntegratedGradients at the embedding, baseline PAD (maps, convergence delta)",
        check_integrated_gradients,
        {"n_steps": 8, "baseline": PAD_ID},
        per_model=ON_EMBEDDINGS,
    ),
    "guided-backprop": Spec(REFUSED, check_refused, per_model=ON_EMBEDDINGS),
    "occlusion": Spec("Captum FeatureAblation per token, baseline PAD", check_occlusion, {"baseline": PAD_ID}),
    "grad-cam": Spec(REFUSED, check_refused, per_model=ON_BLOCKS),
    "smoothgrad": Spec(
        "mean of float autograd gradients at the embedding's output plus the same seeded noise",
        check_smoothgrad,
        {"samples": 2, "base_options": {"abs": False}},
        per_model=ON_EMBEDDINGS,
    ),
    "faithfulness": Spec(REFUSED, check_refused, {"techniques": ("saliency",), "stop": 8, "steps": 4}),
    "filters": Spec(REFUSED, check_refused),
    "activations": Spec(
        "values recorded by a hook at a block; maxima, zero fractions over the real tokens",
        check_activations,
        per_model=ON_BLOCKS,
    ),
    "max-patches": Spec(
        "top values, rows, tokens recorded by a hook (padding never ranks); the ids around each, boxes within the text",
        check_max_patches,
        {"k": 3, "context": 2},
        per_model=ON_BLOCKS,
    ),
    "activation-maximization": Spec(REFUSED, check_refused, {"steps": 3, "channels": (0, 1)}, per_model=ON_BLOCKS),
    "probe-neurons": Spec(
        "scikit-learn LogisticRegression and roc_auc_score on the mean over real tokens",
        check_probe_neurons,
        {"concepts": ("marker",)},
    ),
    "probe-linear": Spec(
        "scikit-learn LogisticRegression on the mean over real tokens",
        check_probe_linear,
        {"concepts": ("marker",), "l2": PROBE_L2},
    ),
    "probe-mlp": Spec(
        "D features per layer and the split sizes (no outside reference for the fit)",
        check_probe_mlp,
        {"concepts": ("marker",), "epochs": 5},
    ),
    "path-linear": Spec(REFUSED, check_refused),
    "hierarchical-decomposition": Spec(REFUSED, check_refused),
    "gram-spectrum": Spec("numpy float64 covariance eigenvalues over the real tokens", check_gram_spectrum),
    "jacobian-gram": Spec(
        "float64 autograd E[JᵀJ] over the real tokens (outputs: the real positions' logits)",
        check_jacobian_gram,
        {"sources": "exact", "stop": JACOBIAN_ROWS},
    ),
    "relu-sync": Spec("firing patterns (> 0) of recorded values over the real tokens", check_relu_sync),
    "interaction-basis": Spec(
        "C G Cᵀ and the output's Jacobian Gram diagonal, output change ≈ 0, from hooks", check_interaction_basis
    ),
    "llc": Spec(
        "λ̂ = mean of its traces; L(w*) = cross-entropy (BERT), next-token cross-entropy (GPT-2)",
        check_llc,
        {"chains": 2, "draws": 3, "burn_in": 0, "batch_size": ROWS},
    ),
    "logit-margin": Spec("top-2 of the scores at the last real token", check_logit_margin),  # the example plugin
    "unit-ablation": Spec(  # the example plugin
        "score drops at the last real token with the feature zeroed by a forward hook",
        check_unit_ablation,
        {"units": 2},
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
            pending = PENDING.get((technique, name))
            marks = [pytest.mark.xfail(strict=True, reason=f"{pending.reason}: {pending.detail}")] if pending else []
            params.append(pytest.param(technique, name, id=f"{technique}-{name}", marks=marks))
    return params


@pytest.mark.parametrize("technique, name", cells())
def test_cell(technique: str, name: str, request: pytest.FixtureRequest) -> None:
    assert technique in SPECS, f"technique {technique!r} has no reference in the language-model matrix; add one"
    spec = SPECS[technique]
    if technique == "probe-mlp":
        request.getfixturevalue("spy_on_fit_mlp")
    cell = Cell(technique, name, lm(name))
    run_cell(cell, spec, REFUSALS.get((technique, name)))


def without_layer_or_baseline(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in ("layers", "baseline")}


@pytest.mark.parametrize("technique", sorted(DEFAULT_REFUSALS))
@pytest.mark.parametrize("name", MODELS)
def test_token_ids_without_a_layer_or_baseline_are_refused_saying_what_to_pass(technique: str, name: str) -> None:
    cell = Cell(technique, name, lm(name))
    pattern = DEFAULT_REFUSALS[technique].format(embedding=re.escape(WORD_EMBEDDINGS[name]))
    with pytest.raises(PyengineError) as caught:
        cell.run(**without_layer_or_baseline(SPECS[technique].options_for(name)))
    message = str(caught.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_interaction_basis_on_a_block_the_gpt2_refusal_names() -> None:
    """The refusal's advice taken: GPT-2's first block output (every path goes through it), D
    features as units, the real tokens as samples, the real positions' logits as outputs."""
    cell = Cell("interaction-basis", "gpt2", lm("gpt2"))
    res = cell.run(layers=(BLOCKS["gpt2"],), stop=JACOBIAN_ROWS)
    check_interaction_basis(cell, res, BLOCKS["gpt2"], padded(JACOBIAN_ROWS))


def test_the_tables_name_real_cells() -> None:
    registered = set(host.techniques()) | {"logit-margin", "unit-ablation"}
    for technique, name in [*REFUSALS, *PENDING]:
        assert technique in registered and name in MODELS, (technique, name)
    assert set(SPECS) <= registered and set(DEFAULT_REFUSALS) <= set(SPECS)
    for technique, spec in SPECS.items():  # a cell that runs has a reference; a refused one is tabled
        refused = [name for name in MODELS if (technique, name) in REFUSALS]
        assert (spec.check is check_refused) == (len(refused) == len(MODELS)), technique
    for name in MODELS:
        for layer in [EMBEDDINGS[name], WORD_EMBEDDINGS[name], BLOCKS[name], *INTERACTION_LAYERS.get(name, ())]:
            lm(name).get_submodule(layer)


# --- the table -------------------------------------------------------------------------------------------


def table() -> str:
    """The matrix as markdown (see ``matrix_harness.markdown_table``)."""
    return markdown_table(MODELS, SPECS, REFUSALS, {key: value.reason for key, value in PENDING.items()})


def test_the_table_has_a_row_per_technique() -> None:
    rows = table().splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(host.techniques())
    assert all(row.count(" | ") == len(MODELS) + 1 for row in rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        raise SystemExit("usage: python tests/test_lm_matrix.py --table")
    print(table())
