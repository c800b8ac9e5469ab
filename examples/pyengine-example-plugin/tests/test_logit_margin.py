import torch
from torch import nn

import pyengine


def test_margin_matches_manual_topk() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    inputs = torch.randn(10, 5)
    result = pyengine.run("logit-margin", model, inputs, batch_size=3)
    logits = model(inputs).detach()
    ordered = logits.sort(dim=1, descending=True).values
    torch.testing.assert_close(result.margins, ordered[:, 0] - ordered[:, 1])
    assert torch.equal(result.predictions, logits.argmax(1))
