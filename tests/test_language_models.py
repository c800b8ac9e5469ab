"""Language models end to end: Hugging Face BERT and GPT-2 built from configs (tests/lm_models.py),
token ids of varying length padded with their attention mask, ModelOutput outputs.

References: Captum's LayerIntegratedGradients, LayerGradientXActivation and FeatureAblation
(tests/lm_references.py), numpy covariances over the real tokens, float64 autograd.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from pyengine.data.base import TorchDataset
from pyengine.errors import PyengineError

transformers = pytest.importorskip("transformers")
pytest.importorskip("captum")
warnings.filterwarnings("ignore", module="captum")

from lm_models import PAD_ID, build_lm, pad, token_corpus  # noqa: E402
from lm_references import (  # noqa: E402
    layer_gradient_x_activation,
    layer_integrated_gradients,
    predicted_next_token,
    target_logits,
    token_occlusion,
)

EMBEDDINGS = {"bert": "bert.embeddings", "gpt2": "transformer.wte"}
BLOCKS = {"bert": "bert.encoder.layer.0", "gpt2": "transformer.h.0"}
ROWS = 6


def corpus(n: int = ROWS, seed: int = 3) -> list[dict[str, Any]]:
    """Items with sequence-level concepts only (the per-token one is not a row concept)."""
    items = token_corpus(n, seed)
    for item in items:
        item["concepts"] = {k: v for k, v in item["concepts"].items() if k != "topic_token"}
    return items


def model_and_batch(kind: str, n: int = ROWS) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    ids, mask = pad(corpus(n))
    return build_lm(kind), {"input_ids": ids, "attention_mask": mask}


def relative_close(ours: torch.Tensor, theirs: torch.Tensor, relative: float = 1e-5) -> None:
    scale = float(theirs.abs().max())
    assert scale > 0
    error = float((ours.double() - theirs.double()).abs().max())
    assert error <= relative * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def targets_for(kind: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BERT: the predicted class; GPT-2: the predicted next token at each row's last real token."""
    with torch.no_grad():
        if kind == "gpt2":
            return predicted_next_token(model, batch["input_ids"], batch["attention_mask"])
        return target_logits(model, batch["input_ids"], batch["attention_mask"]).argmax(1)


def sklearn_probe(features: np.ndarray, y: np.ndarray, res: Any, l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """scikit-learn's logistic regression on the probe's own split, z-scored with the training
    rows' statistics: (test accuracy, coefficients, the features' std). Mean BCE + l2/2 |w|^2 is
    sklearn's C * sum BCE + 1/2 |w|^2 with C = 1 / (l2 * n)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    train, test = res.train_rows.numpy(), res.test_rows.numpy()
    mean, std = features[train].mean(0), features[train].std(0, ddof=1).clip(1e-6)
    z = (features - mean) / std
    reference = linear_model.LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10000)
    reference.fit(z[train], y[train])
    return float(reference.score(z[test], y[test])), reference.coef_[0], std


# --- data: variable lengths, padding, masks ---------------------------------------------------


def test_a_dataset_of_variable_length_ids_is_padded_with_its_mask() -> None:
    items = corpus(8)
    data = TorchDataset(items)
    lengths = [int(item["input_ids"].numel()) for item in items]
    assert data.max_length == max(lengths)
    batch = data.batch([0, 1, 2])
    mask = batch.extra["attention_mask"]
    assert batch.input_name is None and batch.inputs.shape == (3, max(lengths))  # ids first, the mask by name
    assert mask.sum(1).tolist() == lengths[:3]
    assert torch.equal(batch.inputs[1, : lengths[1]], items[1]["input_ids"])
    assert bool((batch.inputs[mask == 0] == PAD_ID).all())
    assert batch.labels.tolist() == [item["label"] for item in items[:3]]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dict_inputs_call_the_model_with_its_mask(kind: str) -> None:
    """predicted targets through the padded batch equal each sequence run alone."""
    model, batch = model_and_batch(kind)
    res = pyengine.run("saliency", model, batch, layers=EMBEDDINGS[kind], progress=False)
    alone = []
    with torch.no_grad():
        for item in corpus():
            logits = model(input_ids=item["input_ids"][None]).logits
            alone.append(int((logits[0, -1] if kind == "gpt2" else logits[0]).argmax()))
    assert res.targets.tolist() == alone


# --- layer attribution: Captum's Layer* techniques ----------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_layer_integrated_gradients_equal_captum(kind: str) -> None:
    model, batch = model_and_batch(kind)
    target = targets_for(kind, model, batch)
    baseline_ids = torch.where(batch["attention_mask"] == 1, PAD_ID, batch["input_ids"])
    theirs = layer_integrated_gradients(
        model,
        model.get_submodule(EMBEDDINGS[kind]),
        batch["input_ids"],
        batch["attention_mask"],
        target,
        baseline_ids,
        n_steps=16,
    )
    res = pyengine.run(
        "integrated-gradients",
        model,
        batch,
        layers=EMBEDDINGS[kind],
        baseline=PAD_ID,
        target=target,
        n_steps=16,
        progress=False,
    )
    assert res.attributions.shape == theirs.shape and res.attributions.is_floating_point()
    relative_close(res.attributions, theirs)
    assert res.layer == EMBEDDINGS[kind]
    torch.testing.assert_close(res.token_scores, res.attributions.sum(-1))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_gradient_times_activation_equals_captum(kind: str) -> None:
    model, batch = model_and_batch(kind)
    target = targets_for(kind, model, batch)
    layer = BLOCKS[kind] if kind == "gpt2" else EMBEDDINGS[kind]
    module = model.get_submodule(layer)
    theirs = layer_gradient_x_activation(model, module, batch["input_ids"], batch["attention_mask"], target)
    res = pyengine.run(
        "saliency",
        model,
        batch,
        layers=layer,
        times_values=True,
        abs=False,
        target=target,
        progress=False,
    )
    relative_close(res.attributions, theirs)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_token_occlusion_equals_feature_ablation_and_never_touches_padding(kind: str) -> None:
    model, batch = model_and_batch(kind)
    target = targets_for(kind, model, batch)
    theirs = token_occlusion(model, batch["input_ids"], batch["attention_mask"], target, PAD_ID)
    res = pyengine.run("occlusion", model, batch, baseline=PAD_ID, target=target, progress=False)
    assert res.attributions.dtype == torch.float32 and res.attributions.shape == batch["input_ids"].shape
    relative_close(res.attributions, theirs)
    assert bool((res.attributions[batch["attention_mask"] == 0] == 0).all())


@pytest.mark.parametrize("technique", ["saliency", "integrated-gradients", "guided-backprop"])
def test_token_ids_without_a_layer_are_refused_naming_the_embedding(technique: str) -> None:
    model, batch = model_and_batch("bert")
    with pytest.raises(
        PyengineError, match=r"token ids.*layers=<module>.*'bert\.embeddings\.word_embeddings'"
    ) as caught:
        pyengine.run(technique, model, batch, progress=False)
    assert "\n" not in str(caught.value)


def test_occlusion_of_ids_needs_a_token_id_baseline() -> None:
    model, batch = model_and_batch("bert")
    with pytest.raises(PyengineError, match="pass baseline=<token id>"):
        pyengine.run("occlusion", model, batch, progress=False)


# --- activations: features as units, padding dropped ----------------------------------------------


def hidden_states(model: nn.Module, layer: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen.append(output.detach().clone())

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_gram_spectrum_reads_features_over_the_real_tokens(kind: str) -> None:
    items = corpus(12)
    model = build_lm(kind)
    layer = BLOCKS[kind]
    res = pyengine.run("gram-spectrum", model, data=TorchDataset(items), layers=[layer], progress=False)
    ids, mask = pad(items)
    h = hidden_states(model, BLOCKS[kind], {"input_ids": ids, "attention_mask": mask})
    real = h[mask.bool()].double().numpy()
    assert res.units[layer] == h.shape[-1] and res.samples[layer] == int(mask.sum())
    centred = real - real.mean(0)
    expected = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(real)))[::-1]  # the 1/n covariance
    np.testing.assert_allclose(res.eigenvalues[layer].numpy(), expected, rtol=1e-5, atol=1e-7 * expected[0])


def test_linear_probe_pools_the_real_tokens_only() -> None:
    """probe-linear on mean-pooled hidden states equals scikit-learn on the mean over real tokens."""
    items = corpus(120, seed=5)
    model = build_lm("bert")
    layer, l2 = BLOCKS["bert"], 1e-2
    res = pyengine.run(
        "probe-linear", model, data=TorchDataset(items), layers=[layer], concepts=["marker"], l2=l2, reduce="mean",
        iterations=5000, progress=False,
    )  # fmt: skip
    key = f"{layer}|marker"
    assert res.unit_axis == {layer: "last"} and res.weights[key].shape == (32,)
    ids, mask = pad(items)
    h = hidden_states(model, BLOCKS["bert"], {"input_ids": ids, "attention_mask": mask})
    features = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).double().numpy()
    y = np.array([item["concepts"]["marker"] for item in items]) == 1
    accuracy, coef, std = sklearn_probe(features, y, res, l2)
    assert res.test_accuracy[key] == pytest.approx(accuracy, abs=1e-9)
    np.testing.assert_allclose(res.weights[key].numpy() * std, coef, rtol=2e-3, atol=2e-4)


# --- techniques that never need an input gradient ---------------------------------------------------


def test_jacobian_gram_on_token_ids_equals_float64_autograd_over_real_tokens() -> None:
    items = corpus(5, seed=7)
    model = build_lm("bert").double()
    layer = BLOCKS["bert"]
    res = pyengine.run(
        "jacobian-gram", model, data=TorchDataset(items), layers=[layer], sources="exact", progress=False
    )
    ids, mask = pad(items)
    gram = torch.zeros(res.units[layer], res.units[layer], dtype=torch.float64)
    for row in range(len(items)):
        one = {"input_ids": ids[row : row + 1], "attention_mask": mask[row : row + 1]}
        captured: list[torch.Tensor] = []
        handle = model.get_submodule(BLOCKS["bert"]).register_forward_hook(
            lambda module, args, output, captured=captured: captured.append(output)
        )
        try:
            logits = model(**one).logits
        finally:
            handle.remove()
        for k in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[0, k], captured[0], retain_graph=True)
            real = grad[0][mask[row].bool()]
            gram += real.T @ real
    relative_close(res.gram[layer].double(), gram / len(items), 1e-6)


def test_llc_with_the_next_token_loss_starts_at_the_models_own_loss() -> None:
    items = corpus(16, seed=9)
    model = build_lm("gpt2")
    res = pyengine.run(
        "llc",
        model,
        data=TorchDataset(items),
        loss="next-token",
        chains=1,
        draws=3,
        burn_in=0,
        batch_size=16,
        progress=False,
    )
    ids, mask = pad(items)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    pairs = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs])
    assert res.init_loss == pytest.approx(float(expected), rel=1e-5)
    assert math.isfinite(res.llc)


# --- max-activating texts --------------------------------------------------------------------------


def test_max_patches_on_a_token_model_returns_the_texts_around_each_top_token() -> None:
    """Per feature of a (B, T, D) layer: the k rows and real tokens where it is largest (padding
    never ranks), and the ids around each, from hook-recorded values."""
    items = corpus(20, seed=11)
    model = build_lm("gpt2")
    layer = "transformer.h.1.mlp.act"
    res = pyengine.run("max-patches", model, data=TorchDataset(items), layers=[layer], k=3, context=2, progress=False)
    ids, mask = pad(items)
    h = hidden_states(model, layer, {"input_ids": ids, "attention_mask": mask})
    h = h.masked_fill(mask[..., None] == 0, float("-inf"))
    best, where = h.max(1)  # (rows, features)
    ranked, rows = torch.sort(best.T, dim=1, descending=True, stable=True)
    assert res.values.shape == (h.shape[-1], 3) and res.unit_axis == "last"
    torch.testing.assert_close(res.values, ranked[:, :3], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.index, rows[:, :3])
    positions = where.T.gather(1, rows[:, :3])
    assert torch.equal(res.position[..., 0], positions)
    for feature in (0, 7):
        for rank in range(3):
            row, token = int(res.index[feature, rank]), int(positions[feature, rank])
            length = int(mask[row].sum())
            expected = [int(ids[row, t]) if 0 <= t < length else -1 for t in range(token - 2, token + 3)]
            assert res.texts[feature, rank].tolist() == expected


@pytest.mark.parametrize(
    ("technique", "options", "pattern"),
    [
        ("grad-cam", {}, r"expected \(C, L\) or \(C, H, W\) images \(for token models: saliency with layers="),
        ("activation-maximization", {"layers": ["bert.encoder.layer.0"]}, "token ids have no pixels to optimise"),
        ("smoothgrad", {}, "noise needs floating point inputs"),
        ("faithfulness", {}, "need images"),
    ],
)
def test_image_techniques_refuse_token_models_in_one_line(
    technique: str, options: dict[str, Any], pattern: str
) -> None:
    model, batch = model_and_batch("bert")
    explained = pyengine.host.get_technique(technique).explains_inputs
    kwargs: dict[str, Any] = {} if explained else {"data": TorchDataset(corpus())}
    with pytest.raises(PyengineError, match=pattern) as caught:
        pyengine.run(technique, model, batch if explained else None, progress=False, **kwargs, **options)
    assert "\n" not in str(caught.value)


def test_interaction_basis_sees_the_residual_stream_go_around_the_gelus() -> None:
    """Token ids: paths start at the embeddings, so GPT-2's GELUs are bypassed by the residual
    adds (refused, naming the blocks) and its blocks are cuts whose basis keeps the outputs."""
    items = corpus(16, seed=13)
    model = build_lm("gpt2").double()
    with pytest.raises(PyengineError, match=r"2 are bypassed .*'transformer\.h\.0', 'transformer\.h\.1'"):
        pyengine.run("interaction-basis", model, data=TorchDataset(items), progress=False)
    res = pyengine.run(
        "interaction-basis",
        model,
        data=TorchDataset(items),
        layers=["transformer.h.0", "transformer.h.1"],
        cutoff=1e-14,
        progress=False,
    )
    assert res.width == {"transformer.h.0": 32, "transformer.h.1": 32}
    assert max(res.output_change.values()) <= 1e-8


def test_capture_keeps_token_ids_and_mask_and_store_runs_drop_padding(tmp_path: Any) -> None:
    """/inputs/token_ids and /inputs/mask sit beside the (B, T, D) layer; gram-spectrum from the
    store equals gram-spectrum from a fresh pass (padding dropped both ways)."""
    items = corpus(12, seed=17)
    model = build_lm("bert")
    layer = BLOCKS["bert"]
    path = tmp_path / "acts.h5"
    pyengine.capture(model, TorchDataset(items), [layer], path, dtype="float32", progress=False)
    ids, mask = pad(items)
    with pyengine.StoreReader(path) as reader:
        tokens = reader.tokens()
        assert tokens is not None
        assert torch.equal(tokens[0], ids) and torch.equal(tokens[1], mask)
    stored = pyengine.run("gram-spectrum", model, store=path, layers=[layer], progress=False)
    fresh = pyengine.run("gram-spectrum", model, data=TorchDataset(items), layers=[layer], progress=False)
    assert stored.samples[layer] == fresh.samples[layer] == int(mask.sum())
    torch.testing.assert_close(stored.eigenvalues[layer], fresh.eigenvalues[layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_occlusion_at_a_layer_equals_captum_layer_feature_ablation(kind: str) -> None:
    """layer=: each real token's feature vector at the layer set to 0, one token at a time."""
    import captum.attr as captum_attr

    model, batch = model_and_batch(kind)
    target = targets_for(kind, model, batch)
    layer = EMBEDDINGS[kind]

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return target_logits(model, input_ids, attention_mask)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = torch.arange(ids.shape[1])[None, :, None].expand(ids.shape[0], ids.shape[1], 32)
    with torch.no_grad():
        theirs = captum_attr.LayerFeatureAblation(forward, model.get_submodule(layer)).attribute(
            ids, target=target, additional_forward_args=(mask,), layer_baselines=0.0, layer_mask=groups
        )
    theirs = theirs * mask[..., None]  # padding is never occluded here
    res = pyengine.run("occlusion", model, batch, layers=layer, baseline=0.0, target=target, progress=False)
    assert res.attributions.shape == theirs.shape
    relative_close(res.attributions, theirs)


def test_a_token_level_concept_is_probed_per_real_token() -> None:
    """'topic_token' (1 for the tokens of the planted topic groups) has one code per token: the
    probe's rows are the real tokens, equal to scikit-learn on the per-token features."""
    items = token_corpus(40, 19)
    for item in items:
        item["concepts"] = {"topic_token": item["concepts"]["topic_token"]}
    model = build_lm("bert")
    layer, l2 = "bert.embeddings", 1e-2
    res = pyengine.run(
        "probe-linear", model, data=TorchDataset(items), layers=[layer], concepts=["topic_token"], l2=l2,
        iterations=5000, progress=False,
    )  # fmt: skip
    ids, mask = pad(items)
    h = hidden_states(model, layer, {"input_ids": ids, "attention_mask": mask})
    features = h[mask.bool()].double().numpy()
    y = torch.cat([item["concepts"]["topic_token"] for item in items]).numpy() == 1
    key = f"{layer}|topic_token"
    assert res.train_rows.numel() + res.val_rows.numel() + res.test_rows.numel() == len(y) == int(mask.sum())
    accuracy, _, _ = sklearn_probe(features, y, res, l2)
    assert res.test_accuracy[key] == pytest.approx(accuracy, abs=1e-9)
    test = res.test_rows.numpy()
    majority = max(float(y[test].mean()), 1 - float(y[test].mean()))
    assert res.test_accuracy[key] >= majority + 0.1  # the topic groups are fixed token ids


def test_max_patches_text_boxes_end_with_their_text() -> None:
    items = corpus(20, seed=11)
    res = pyengine.run(
        "max-patches", build_lm("gpt2"), data=TorchDataset(items), layers=["transformer.h.1"], k=3, context=2,
        progress=False,
    )  # fmt: skip
    lengths = torch.tensor([int(item["input_ids"].numel()) for item in items])
    first, end = res.boxes[..., 0], res.boxes[..., 1]
    assert bool((end <= lengths[res.index]).all()) and bool((first >= 0).all())
    assert torch.equal(end - first, (res.texts >= 0).sum(-1))


def test_a_causal_lm_is_explained_at_a_chosen_position() -> None:
    """position=k: the next-token logits after token k (Captum with a forward reading position k);
    a position that is padding in some row is refused."""
    import captum.attr as captum_attr

    model, batch = model_and_batch("gpt2")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position = int(mask.sum(1).min()) - 1  # real in every row

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, position]

    with torch.no_grad():
        target = forward(ids, mask).argmax(1)
    theirs = captum_attr.LayerGradientXActivation(forward, model.get_submodule("transformer.h.0")).attribute(
        ids, target=target, additional_forward_args=(mask,)
    )
    res = pyengine.run(
        "saliency", model, batch, layers="transformer.h.0", times_values=True, abs=False, position=position,
        progress=False,
    )  # fmt: skip
    assert torch.equal(res.targets, target)  # "predicted" at that position
    relative_close(res.attributions, theirs.detach())
    padded = int(mask.sum(1).max()) - 1
    with pytest.raises(PyengineError, match=f"position={padded} is padding in input row"):
        pyengine.run("saliency", model, batch, layers="transformer.h.0", position=padded, progress=False)


def test_smoothgrad_adds_its_noise_at_the_layer() -> None:
    """layers=: noise of 0.15 x each row's range of the layer's values, drawn from the run's seeded
    generator; the mean of the layer gradients at the noisy values (autograd through a hook)."""
    model, batch = model_and_batch("bert")
    layer, samples = "bert.embeddings", 3
    res = pyengine.run(
        "smoothgrad", model, batch, layers=layer, samples=samples, base_options={"abs": False}, progress=False
    )
    target = res.targets
    z = hidden_states(model, layer, batch)
    flat = z.flatten(1)
    sigma = (0.15 * (flat.amax(1) - flat.amin(1))).reshape(-1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros_like(z, dtype=torch.float64)
    for _ in range(samples):
        noisy = (z + sigma * torch.randn(z.shape, generator=generator)).requires_grad_(True)
        handle = model.get_submodule(layer).register_forward_hook(lambda module, args, output, noisy=noisy: noisy)
        try:
            logits = model(**batch).logits
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), noisy)
        total += grad.double()
    relative_close(res.attributions, total / samples)
    with pytest.raises(PyengineError, match="saliency or guided-backprop with layers"):
        pyengine.run("smoothgrad", model, batch, layers=layer, base="integrated-gradients", progress=False)
