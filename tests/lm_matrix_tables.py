"""The language-model matrix's tables (``tests/test_lm_matrix.py``): the models, the layers each
cell reads, the cells where a technique refuses a model (with the pattern its one-line message
must contain), and the cells pending a fix in the engine (strict xfails, with what goes wrong)."""

from __future__ import annotations

from dataclasses import dataclass

from matrix_harness import Refusal

MODELS = ("bert", "gpt2")  # tests/lm_models.py: BertForSequenceClassification, GPT2LMHeadModel
ROWS = 24  # dataset rows (labels, the concept "marker") for techniques that read data
EXPLAINED = 4  # rows explained by the per-input techniques
JACOBIAN_ROWS = 8  # jacobian-gram's rows: a causal LM's output has T x V coordinates, each a VJP

EMBEDDINGS = {"bert": "bert.embeddings", "gpt2": "transformer.wte"}  # where token attributions start
WORD_EMBEDDINGS = {"bert": "bert.embeddings.word_embeddings", "gpt2": "transformer.wte"}  # the first nn.Embedding
BLOCKS = {"bert": "bert.encoder.layer.0", "gpt2": "transformer.h.0"}  # (B, T, D) block outputs
# interaction-basis's default chain: the nonlinearity outputs every path to the output goes through.
# BERT's GELUs are bypassed by the residual add of BertOutput (LayerNorm(dense(h) + input)); its
# pooler's Tanh is not. GPT-2's GELUs are bypassed by its blocks' residual adds: refused below.
INTERACTION_LAYERS = {"bert": ("bert.pooler.activation",)}


PATHWISE = Refusal(
    r"inputs of dtype torch\.int64; pathwise analysis needs floating-point inputs",
    "token ids: no floating-point input to decompose",
)
REFUSED: dict[str, Refusal] = {  # on both models
    "guided-backprop": Refusal(r"applies no ReLU", "no ReLU to guide (GELU)"),
    "grad-cam": Refusal(
        r"images \(for token models: saliency with layers=",
        "token ids are no image: points to saliency with times_values",
    ),
    "faithfulness": Refusal(
        r"need images \(N, C, H, W\) passed alone to the model; got torch\.int64",
        "pixel deletion/insertion and the pointing game need images",
    ),
    "filters": Refusal(r"the model has no nn\.Conv2d layer", "no Conv2d"),
    "activation-maximization": Refusal(
        r"token ids have no pixels to optimise: use max-patches", "token ids have no pixels to optimise"
    ),
    "path-linear": PATHWISE,
    "hierarchical-decomposition": PATHWISE,
}
REFUSALS: dict[tuple[str, str], Refusal] = {
    **{(technique, model): refusal for technique, refusal in REFUSED.items() for model in MODELS},
    ("interaction-basis", "gpt2"): Refusal(
        r"2 are bypassed by residual adds.*pass layers=\[\.\.\.\], e\.g\. 'transformer\.h\.0', 'transformer\.h\.1'",
        "its GELUs are bypassed by residual adds; names the blocks `transformer.h.0`, `transformer.h.1`",
    ),
}

# Cells the engine gets wrong today: strict xfails (the lead fixes the engine, then drops the entry).


@dataclass(frozen=True)
class Pending:
    reason: str  # the table's words
    detail: str  # what goes wrong, precisely


PENDING: dict[tuple[str, str], Pending] = {}
# Without the cell's layer or baseline, on token ids: one line saying what to pass.
TO_THE_EMBEDDING = r"the inputs are torch\.int64 \(token ids\?\).*pass layers=<module>.*e\.g\. '{embedding}'"
DEFAULT_REFUSALS: dict[str, str] = {
    "saliency": TO_THE_EMBEDDING,
    "integrated-gradients": TO_THE_EMBEDDING,
    "guided-backprop": TO_THE_EMBEDDING,
    "occlusion": r"baseline='mean' cannot replace token ids; pass baseline=<token id>",
    "activations": r"runs no convolution; pass layers=<module path>",
    "max-patches": r"no default layer for torch\.int64 inputs; pass layers=<module path>",
    "activation-maximization": REFUSED["activation-maximization"].pattern,
    "grad-cam": REFUSED["grad-cam"].pattern,
}
