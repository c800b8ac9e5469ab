"""The language-model test foundation: tiny HF models carry signal, honour padding, and the Captum references
on them satisfy their own identities (``tests/lm_models.py``, ``tests/lm_references.py``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("captum")

import lm_references as ref  # noqa: E402
from lm_models import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    LM_KINDS,
    MARKER_ID,
    NUM_LABELS,
    PAD_ID,
    TOPIC_GROUPS,
    LmKind,
    build_lm,
    pad,
    token_concept,
    token_corpus,
    token_topic,
)

from conftest import hooks_on  # noqa: E402

EMBEDDINGS = {"bert": "bert.embeddings", "gpt2": "transformer.wte"}
WORD_EMBEDDINGS = {"bert": "bert.embeddings.word_embeddings", "gpt2": "transformer.wte"}
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels
HIDDEN_ACTIVATIONS = {
    "bert": "bert.encoder.layer.0.intermediate.intermediate_act_fn",
    "gpt2": "transformer.h.0.mlp.act",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: a second intra-op thread only waits on a busy machine (seconds instead of ms)."""
    from matrix_harness import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def models() -> dict[LmKind, nn.Module]:
    return {kind: build_lm(kind) for kind in LM_KINDS}


@pytest.fixture(scope="module")
def batch() -> Batch:
    """Eight right-padded sequences of lengths 4..12 (several padded rows) and their planted labels."""
    items = token_corpus(8, seed=5)
    input_ids, attention_mask = pad(items)
    assert len(set(attention_mask.sum(1).tolist())) >= 4 and (attention_mask == 0).any()
    return input_ids, attention_mask, torch.tensor([item["label"] for item in items])


def targets(kind: LmKind, model: nn.Module, batch: Batch) -> torch.Tensor:
    """BERT: the planted label (a class); GPT-2: the token the model predicts after the last real one."""
    input_ids, attention_mask, labels = batch
    return labels if kind == "bert" else ref.predicted_next_token(model, input_ids, attention_mask)


# --- the corpus -----------------------------------------------------------------------------------------


def test_token_corpus_plants_its_labels_and_concepts() -> None:
    items = token_corpus(300, seed=0)
    lengths = Counter(int(item["input_ids"].numel()) for item in items)
    assert set(lengths) == set(range(4, 13))
    for item in items:
        ids = item["input_ids"]
        assert ids.dtype == torch.long and ids.dim() == 1
        assert not torch.isin(ids, torch.tensor([PAD_ID, BOS_ID, EOS_ID])).any()
        counts = [int(torch.isin(ids, torch.tensor(group)).sum()) for group in TOPIC_GROUPS]
        assert sorted(counts)[-1] > sorted(counts)[-2] and counts.index(max(counts)) == item["label"]
        assert item["concepts"]["marker"] == int((ids == MARKER_ID).any())
        assert item["concepts"]["topic_count"] == sum(counts)
        assert torch.equal(item["concepts"]["topic_token"], token_concept(ids))
        assert torch.equal(token_concept(ids), (token_topic(ids) >= 0).long())
    labels = Counter(item["label"] for item in items)
    assert set(labels) == set(range(NUM_LABELS)) and min(labels.values()) > 60
    assert 100 < sum(item["concepts"]["marker"] for item in items) < 200
    topic_tokens = torch.cat([item["concepts"]["topic_token"] for item in items])
    assert 0.3 < topic_tokens.float().mean() < 0.8  # the token-level concept is neither rare nor everywhere


def test_token_corpus_is_seeded() -> None:
    first, again, other = token_corpus(20, seed=3), token_corpus(20, seed=3), token_corpus(20, seed=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(
        a["input_ids"].shape == b["input_ids"].shape and torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(first, other)
    )


def test_pad_right_pads_with_a_mask() -> None:
    items = token_corpus(6, seed=1)
    input_ids, attention_mask = pad(items, pad_id=PAD_ID)
    lengths = [int(item["input_ids"].numel()) for item in items]
    assert input_ids.shape == attention_mask.shape == (6, max(lengths))
    assert attention_mask.sum(1).tolist() == lengths
    for row, (item, length) in enumerate(zip(items, lengths)):
        assert torch.equal(input_ids[row, :length], item["input_ids"])
        assert (input_ids[row, length:] == PAD_ID).all() and (attention_mask[row, length:] == 0).all()
    assert ref.last_real_position(attention_mask).tolist() == [length - 1 for length in lengths]


# --- the models -----------------------------------------------------------------------------------------


def test_models_are_tiny_deterministic_and_in_eval(models: dict[LmKind, nn.Module]) -> None:
    import transformers

    assert isinstance(models["bert"], transformers.BertForSequenceClassification)
    assert isinstance(models["gpt2"], transformers.GPT2LMHeadModel)
    for kind, model in models.items():
        assert not any(module.training for module in model.modules())
        assert sum(p.numel() for p in model.parameters()) < 100_000
        rebuilt = build_lm(kind)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    with pytest.raises(ValueError, match="unknown language model kind"):
        build_lm("t5")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", LM_KINDS)
def test_outputs_have_signal(kind: LmKind, models: dict[LmKind, nn.Module]) -> None:
    """Across 64 corpus inputs the scored logits vary by far more than rounding (measured with
    initializer_range 0.2, seed 0: BERT per-class std min 0.36; GPT-2 per-token std min 0.62, median 0.90;
    float32 noise between batched and single runs ~1e-6), and predictions differ between inputs."""
    input_ids, attention_mask = pad(token_corpus(64, seed=1))
    with torch.no_grad():
        logits = ref.target_logits(models[kind], input_ids, attention_mask)
    spread = logits.std(dim=0)
    assert spread.min() > 0.2 and spread.median() > 0.3
    distinct = logits.argmax(dim=1).unique().numel()
    assert distinct >= (2 if kind == "bert" else 10)


@pytest.mark.parametrize("kind", LM_KINDS)
def test_right_padding_with_a_mask_matches_each_sequence_alone(kind: LmKind, models: dict[LmKind, nn.Module]) -> None:
    model = models[kind]
    items = token_corpus(32, seed=2)
    input_ids, attention_mask = pad(items)
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for row, item in enumerate(items):
            alone = model(input_ids=item["input_ids"][None]).logits[0]
            length = item["input_ids"].numel()
            # BERT: the classification logits; GPT-2: the logits at every real position
            expected = alone if kind == "bert" else alone[:length]
            got = batched[row] if kind == "bert" else batched[row, :length]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if kind == "gpt2":  # the references score the logits of the last real position
        last = [item["input_ids"].numel() - 1 for item in items]
        scored = ref.target_logits(model, input_ids, attention_mask)
        torch.testing.assert_close(scored, torch.stack([batched[row, at] for row, at in enumerate(last)]))
        token = torch.arange(len(items)) % 64
        picked = ref.causal_target_scores(batched, attention_mask, token)
        assert picked.tolist() == [batched[row, at, token[row]].item() for row, at in enumerate(last)]


# --- the Captum references satisfy their identities ------------------------------------------------------


@pytest.mark.parametrize("kind", LM_KINDS)
def test_layer_integrated_gradients_is_complete(kind: LmKind, models: dict[LmKind, nn.Module], batch: Batch) -> None:
    """Sum of LayerIG attributions = f(x) - f(baseline) for the target score (Gauss-Legendre, 50 steps)."""
    model, (input_ids, attention_mask, _) = models[kind], batch
    target = targets(kind, model, batch)
    baseline_ids = ref.baseline_like(input_ids, attention_mask, PAD_ID)
    layer = model.get_submodule(EMBEDDINGS[kind])
    attributions = ref.layer_integrated_gradients(model, layer, input_ids, attention_mask, target, baseline_ids, 50)
    assert attributions.shape == (*input_ids.shape, 32)
    with torch.no_grad():
        change = ref.target_scores(model, input_ids, attention_mask, target) - ref.target_scores(
            model, baseline_ids, attention_mask, target
        )
    assert change.abs().median() > 0.1  # the identity is not met by two zeros
    torch.testing.assert_close(attributions.sum(dim=(1, 2)), change, rtol=0, atol=1e-4)
    per_token = attributions.sum(dim=2)
    assert per_token[attention_mask.bool()].abs().mean() > 0.01


@pytest.mark.parametrize("where", ["embeddings", "hidden activation"])
@pytest.mark.parametrize("kind", LM_KINDS)
def test_gradient_x_activation_is_the_directional_derivative(
    kind: LmKind, where: str, models: dict[LmKind, nn.Module], batch: Batch
) -> None:
    """Per row, sum(grad * activation) = d/dt f(layer output scaled by t) at t = 1, by hand in float64."""
    model, (input_ids, attention_mask, _) = models[kind], batch
    target = targets(kind, model, batch)
    path = (EMBEDDINGS if where == "embeddings" else HIDDEN_ACTIVATIONS)[kind]
    attributions = ref.layer_gradient_x_activation(model, model.get_submodule(path), input_ids, attention_mask, target)

    scale = torch.ones(len(input_ids), 1, 1, dtype=torch.float64, requires_grad=True)
    with ref.float64(model) as model64:
        handle = model64.get_submodule(path).register_forward_hook(lambda module, args, output: output * scale)
        try:
            scores = ref.target_scores(model64, input_ids, attention_mask, target)
        finally:
            handle.remove()
    (derivative,) = torch.autograd.grad(scores.sum(), scale)

    assert derivative.abs().min() > 1e-3
    torch.testing.assert_close(attributions.sum(dim=(1, 2)).double(), derivative.flatten(), rtol=1e-4, atol=1e-5)
    padding = ~attention_mask.bool()
    assert attributions[padding].abs().max() == 0  # masked positions reach no score, through any path


@pytest.mark.parametrize("kind", LM_KINDS)
def test_input_x_gradient_on_embeddings_equals_layer_gradient_x_activation(
    kind: LmKind, models: dict[LmKind, nn.Module], batch: Batch
) -> None:
    """Captum's two routes to token-embedding x gradient agree: ``inputs_embeds`` and the word-embedding layer."""
    model, (input_ids, attention_mask, _) = models[kind], batch
    target = targets(kind, model, batch)
    through_inputs = ref.embedding_input_x_gradient(model, input_ids, attention_mask, target)
    through_layer = ref.layer_gradient_x_activation(
        model, model.get_submodule(WORD_EMBEDDINGS[kind]), input_ids, attention_mask, target
    )
    torch.testing.assert_close(through_inputs, through_layer, rtol=1e-5, atol=1e-7)
    assert through_inputs[~attention_mask.bool()].abs().max() == 0
    assert through_inputs.sum(dim=2)[attention_mask.bool()].abs().mean() > 1e-3


@pytest.mark.parametrize("kind", LM_KINDS)
def test_token_occlusion_replaces_one_real_token_at_a_time(
    kind: LmKind, models: dict[LmKind, nn.Module], batch: Batch
) -> None:
    model, (input_ids, attention_mask, _) = models[kind], batch
    target = targets(kind, model, batch)
    baseline_token = TOPIC_GROUPS[0][0]
    occlusion = ref.token_occlusion(model, input_ids, attention_mask, target, baseline_token)
    assert occlusion.shape == input_ids.shape
    padding = ~attention_mask.bool()
    assert occlusion[padding].abs().max() == 0  # padding is never ablated
    # by hand: each real position replaced alone, in a fresh forward of its own
    with torch.no_grad():
        original = ref.target_scores(model, input_ids, attention_mask, target)
        for position in range(input_ids.shape[1]):
            replaced = input_ids.clone()
            replaced[attention_mask[:, position].bool(), position] = baseline_token
            change = original - ref.target_scores(model, replaced, attention_mask, target)
            torch.testing.assert_close(occlusion[:, position], change, rtol=0, atol=1e-5)
    already_baseline = input_ids == baseline_token
    assert (occlusion[already_baseline] == 0).all()
    assert occlusion[attention_mask.bool() & ~already_baseline].abs().mean() > 0.01
    # ablating padding too changes nothing: the mask keeps masked tokens out of every real position
    with_padding = ref.token_occlusion(model, input_ids, attention_mask, target, baseline_token, ablate_padding=True)
    assert with_padding[padding].abs().max() <= 1e-6
    torch.testing.assert_close(with_padding, occlusion, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", LM_KINDS)
def test_references_leave_no_hooks(kind: LmKind, models: dict[LmKind, nn.Module], batch: Batch) -> None:
    model, (input_ids, attention_mask, _) = models[kind], batch
    target = targets(kind, model, batch)
    layer = model.get_submodule(EMBEDDINGS[kind])
    baseline_ids = ref.baseline_like(input_ids, attention_mask, PAD_ID)
    ref.layer_integrated_gradients(model, layer, input_ids, attention_mask, target, baseline_ids, 8)
    ref.layer_gradient_x_activation(model, layer, input_ids, attention_mask, target)
    ref.embedding_input_x_gradient(model, input_ids, attention_mask, target)
    ref.token_occlusion(model, input_ids, attention_mask, target, PAD_ID)
    assert hooks_on(model) == []
    assert not any(p.grad is not None for p in model.parameters())
