"""Model inputs and outputs as the ecosystem has them: dict inputs with an attention mask,
variable-length token sequences padded with their mask kept, tuple and ModelOutput outputs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from pyengine.errors import PyengineError
from pyengine.inputs import ModelInputs, as_model_inputs, pad_sequences, select_output


class MeanPoolClassifier(nn.Module):
    """A Hugging Face-style sequence classifier: keyword ids and mask, a ModelOutput-like dict
    out; padded positions are excluded from the mean, so padding never changes the logits."""

    def __init__(self, vocab: int = 20, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Embedding(vocab, width)
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.classifier = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        hidden = self.act(self.dense(self.embeddings(input_ids)))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return OrderedDict(logits=self.classifier(pooled), hidden_states=(hidden,))


def sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 20, (n,), generator=g) for n in (5, 3, 7, 4)]


def test_pad_sequences_right_pads_and_masks() -> None:
    ids, mask = pad_sequences(sequences(), pad_id=0, where="t")
    assert ids.shape == mask.shape == (4, 7)
    assert mask.sum(1).tolist() == [5, 3, 7, 4]
    assert torch.equal(ids[1, :3], sequences()[1]) and bool((ids[1, 3:] == 0).all())
    with pytest.raises(PyengineError, match="sequence 0 has shape"):
        pad_sequences([torch.zeros(2, 2, dtype=torch.long)], 0, "t")


def test_dict_inputs_carry_their_mask_through_take_and_with_main() -> None:
    ids, mask = pad_sequences(sequences(), 0, "t")
    inputs = as_model_inputs({"input_ids": ids, "attention_mask": mask})
    assert inputs.name == "input_ids" and torch.equal(inputs.mask, mask)
    picked = inputs.take([2, 2, 0])
    assert torch.equal(picked.main, ids[[2, 2, 0]]) and torch.equal(picked.mask, mask[[2, 2, 0]])
    perturbed = inputs.with_main(ids[[1, 1]], rows=torch.tensor([1, 1]))
    assert torch.equal(perturbed.mask, mask[[1, 1]])
    model = MeanPoolClassifier().eval()
    alone = [select_output(model(s[None])) for s in sequences()]
    together = select_output(inputs.call(model))
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"attention_mask": torch.ones(2, 3)}, "expected a tensor under one of input_ids"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(3, 3)}, "one row per input"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, "expected \\(2, 3\\)"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)}, "row 0 has no real"),
        ([1, 2, 3], "expected a tensor or a mapping of tensors"),
    ],
)
def test_bad_inputs_are_one_clear_line(value: Any, message: str) -> None:
    with pytest.raises(PyengineError, match=message) as caught:
        as_model_inputs(value)
    assert "\n" not in str(caught.value)


def test_select_output_finds_logits_first_elements_and_selectors() -> None:
    logits = torch.randn(2, 3)
    assert select_output(logits) is logits
    assert select_output((logits, torch.zeros(1))) is logits
    assert select_output(OrderedDict(loss=torch.zeros(()), logits=logits)) is logits
    assert select_output({"scores": logits}, "scores") is logits
    assert select_output((torch.zeros(1), logits), 1) is logits
    assert select_output({"a": {"b": logits}}, lambda out: out["a"]["b"]) is logits
    with pytest.raises(PyengineError, match="without 'logits'; pass output="):
        select_output({"scores": logits})
    with pytest.raises(PyengineError, match="does not select from"):
        select_output({"scores": logits}, "missing")


def test_model_inputs_split_keeps_rows_together() -> None:
    ids, mask = pad_sequences(sequences(), 0, "t")
    parts = ModelInputs(ids, {"attention_mask": mask}, "input_ids").split(3)
    assert [len(p) for p in parts] == [3, 1]
    assert torch.equal(parts[1].mask, mask[3:])
