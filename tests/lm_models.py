"""Small Hugging Face language models with random weights, and token corpora with planted structure.

``build_lm("bert")`` is a ``transformers.BertForSequenceClassification`` and ``build_lm("gpt2")`` a
``transformers.GPT2LMHeadModel``, both built from a config (nothing is ever downloaded) at a tiny scale
(vocab 64, hidden 32, 2 layers, 2 heads), dropouts 0, on a fixed seed, in eval mode, with HF's own
default attention implementation (sdpa) and defaults otherwise (GPT-2 keeps ``use_cache=True``, so its
output carries a cache). ``initializer_range`` is 10x HF's default so that logits differ clearly from
one input to the next. Outputs: ``SequenceClassifierOutput`` (``logits`` (B, 3)) and
``CausalLMOutputWithCrossAttentions`` (``logits`` (B, T, 64), and the cache: ``past_key_values`` in
transformers 4.x, ``cache`` in 5.x). Blocks (``bert.encoder.layer.i``, ``transformer.h.i``) return a tuple in
4.x and a tensor in 5.x. GPT-2's ``lm_head.weight`` is ``transformer.wte.weight`` (tied).

``token_corpus`` draws variable-length sequences (no padding) over the ids below; id 0 is PAD.
``pad`` right-pads a list of items into ``(input_ids, attention_mask)``.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "BOS_ID", "EOS_ID", "FILLER_IDS", "LM_KINDS", "LmKind", "MARKER_ID", "NUM_LABELS", "PAD_ID", "TOPIC_GROUPS",
    "VOCAB_SIZE", "build_lm", "pad", "token_concept", "token_corpus", "token_topic",
]  # fmt: skip

LmKind = Literal["bert", "gpt2"]
LM_KINDS: tuple[LmKind, ...] = ("bert", "gpt2")

VOCAB_SIZE = 64
HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 32
NUM_LABELS = 3
INITIALIZER_RANGE = 0.2  # HF's default is 0.02: logits then barely move between inputs (see test_lm_models)

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
MARKER_ID = 3  # the sequence-level concept: does the sequence contain the marker token
TOPIC_GROUPS: tuple[tuple[int, ...], ...] = (tuple(range(4, 12)), tuple(range(12, 20)), tuple(range(20, 28)))
FILLER_IDS: tuple[int, ...] = tuple(range(28, VOCAB_SIZE))


def build_lm(kind: LmKind, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised HF model in eval mode: ``"bert"`` (3-class) or ``"gpt2"`` (causal LM)."""
    import transformers

    torch.manual_seed(seed)
    model: nn.Module
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            initializer_range=INITIALIZER_RANGE,
            pad_token_id=PAD_ID,
        )
        config.num_labels = NUM_LABELS
        model = transformers.BertForSequenceClassification(config)
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_positions=MAX_POSITIONS,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=HEADS,
                n_inner=INTERMEDIATE,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                initializer_range=INITIALIZER_RANGE,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
            )
        )
    else:
        raise ValueError(f"unknown language model kind {kind!r}; expected one of {LM_KINDS}")
    return model.eval()


def token_topic(ids: torch.Tensor) -> torch.Tensor:
    """Per token: the index of its topic group, or -1 for a token in none."""
    topic = torch.full_like(ids, -1)
    for index, group in enumerate(TOPIC_GROUPS):
        topic[torch.isin(ids, torch.tensor(group))] = index
    return topic


def token_concept(ids: torch.Tensor) -> torch.Tensor:
    """The token-level concept: 1 where the token belongs to a planted topic group, else 0 (any shape)."""
    return (token_topic(ids) >= 0).long()


def token_corpus(n: int, seed: int, min_len: int = 4, max_len: int = 12) -> list[dict[str, Any]]:
    """``n`` items ``{"input_ids": LongTensor(T), "label": int, "concepts": {...}}``, T in [min_len, max_len].

    The label is the topic group with strictly the most tokens in the sequence (drawn first, uniform over
    ``NUM_LABELS``); concepts: ``"marker"`` (int, 1 when ``MARKER_ID`` occurs, half the items),
    ``"topic_count"`` (int, tokens in any topic group) and ``"topic_token"`` (``token_concept`` of the ids).
    Ids never include PAD, BOS or EOS.
    """
    if not 4 <= min_len <= max_len:
        raise ValueError(f"need 4 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        label = rng.randrange(NUM_LABELS)
        marker = rng.random() < 0.5
        free = length - int(marker)
        majority = rng.randint(2, max(2, free // 2))
        others = [rng.randint(0, majority - 1) for _ in range(NUM_LABELS - 1)]
        while majority + sum(others) > free:  # shrink the minority counts until the sequence fits
            others[others.index(max(others))] -= 1
        counts = others[:label] + [majority] + others[label:]
        tokens = [rng.choice(TOPIC_GROUPS[g]) for g, count in enumerate(counts) for _ in range(count)]
        tokens += [MARKER_ID] * int(marker)
        tokens += [rng.choice(FILLER_IDS) for _ in range(length - len(tokens))]
        rng.shuffle(tokens)
        ids = torch.tensor(tokens, dtype=torch.long)
        concepts = {"marker": int(marker), "topic_count": sum(counts), "topic_token": token_concept(ids)}
        items.append({"input_ids": ids, "label": label, "concepts": concepts})
    return items


def pad(items: list[dict[str, Any]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the items' ``input_ids`` into ``(input_ids (B, Tmax), attention_mask (B, Tmax))``."""
    lengths = [int(item["input_ids"].numel()) for item in items]
    input_ids = torch.full((len(items), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), max(lengths)), dtype=torch.long)
    for row, (item, length) in enumerate(zip(items, lengths)):
        input_ids[row, :length] = item["input_ids"]
        attention_mask[row, :length] = 1
    return input_ids, attention_mask
