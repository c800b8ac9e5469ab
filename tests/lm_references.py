"""Independent Captum references on Hugging Face language models, with token ids and attention masks.

Nothing here calls pyengine. Every function takes ``(model, input_ids (B, T), attention_mask (B, T), target (B,),
...)`` and returns Captum's attributions. The scored output is ``target_logits``: a
sequence classifier's ``logits`` (B, C) as they are, a causal LM's ``logits`` (B, T, V) at each row's last
real (unmasked) position, so ``target`` is a class index for BERT and a token id for GPT-2
(``predicted_next_token`` gives the model's own next token there). The attention mask travels as Captum's
``additional_forward_args``, which Captum expands alongside the inputs for its internal batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import captum.attr as captum_attr  # type: ignore[import-untyped]
import torch
from torch import nn

__all__ = [
    "baseline_like", "causal_target_scores", "embedding_input_x_gradient", "float64", "last_real_position",
    "layer_gradient_x_activation", "layer_integrated_gradients", "predicted_next_token", "target_logits",
    "target_scores", "token_occlusion",
]  # fmt: skip


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last position whose mask is 1 (right padding: length - 1)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def causal_target_scores(logits: torch.Tensor, attention_mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``logits[b, last_real_position(b), token[b]]`` for causal-LM logits (B, T, V): shape (B,)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_real_position(attention_mask), token]


def _scored_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, C) logits as they are; (B, T, V) logits at each row's last real position."""
    if logits.dim() == 3:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last_real_position(attention_mask)]
    return logits


def target_logits(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits the target indexes: (B, C) for a classifier, (B, V) at the last real position for a causal LM."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
    return _scored_logits(output.logits, attention_mask)


def target_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The scalar each attribution explains, per row: ``target_logits[b, target[b]]`` (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.dim() == 3:
        return causal_target_scores(logits, attention_mask, target)
    return logits[torch.arange(logits.shape[0], device=logits.device), target]


@torch.no_grad()
def predicted_next_token(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The argmax of ``target_logits`` per row: the next token a causal LM predicts after the last real one."""
    return target_logits(model, input_ids, attention_mask).argmax(dim=1)


def baseline_like(input_ids: torch.Tensor, attention_mask: torch.Tensor, token: int) -> torch.Tensor:
    """``token`` at every real position, the input's own ids (padding) elsewhere."""
    return torch.where(attention_mask.bool(), torch.full_like(input_ids, token), input_ids)


@contextmanager
def float64(model: nn.Module) -> Iterator[nn.Module]:
    """A float64 copy of the model, used with float64 as torch's default dtype: transformers 4.x builds GPT-2's
    sdpa causal mask with ``torch.full(..., torch.finfo(model dtype).min)`` in the default dtype, which
    overflows float32 for a float64 model ("value cannot be converted to type float without overflow")."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield copy.deepcopy(model).double()
    finally:
        torch.set_default_dtype(previous)


def _forward(model: nn.Module) -> Any:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return target_logits(model, input_ids, attention_mask)

    return forward


def layer_integrated_gradients(
    model: nn.Module,
    layer_module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target: torch.Tensor,
    baseline_ids: torch.Tensor,
    n_steps: int = 50,
) -> torch.Tensor:
    """Captum ``LayerIntegratedGradients`` at ``layer_module``'s output (e.g. ``bert.embeddings``, ``transformer.wte``),
    from the layer's value for ``baseline_ids`` to its value for ``input_ids``: the layer's shape, e.g. (B, T, H)."""
    attributions = captum_attr.LayerIntegratedGradients(_forward(model), layer_module).attribute(
        input_ids,
        baselines=baseline_ids,
        target=target,
        additional_forward_args=(attention_mask,),
        n_steps=n_steps,
    )
    return attributions.detach()


def layer_gradient_x_activation(
    model: nn.Module,
    layer_module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Captum ``LayerGradientXActivation`` at ``layer_module``'s output: the layer's shape, e.g. (B, T, H)."""
    attributions = captum_attr.LayerGradientXActivation(_forward(model), layer_module).attribute(
        input_ids, target=target, additional_forward_args=(attention_mask,)
    )
    return attributions.detach()


def embedding_input_x_gradient(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Captum ``InputXGradient`` on ``inputs_embeds`` (the model's input embeddings of ``input_ids``): (B, T, H)."""

    def forward(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return target_logits(model, None, attention_mask, inputs_embeds=inputs_embeds)

    embedding = cast(Callable[[], nn.Module], model.get_input_embeddings)()
    with torch.no_grad():
        embeds = embedding(input_ids)
    attributions = captum_attr.InputXGradient(forward).attribute(
        embeds.requires_grad_(), target=target, additional_forward_args=(attention_mask,)
    )
    return attributions.detach()


def token_occlusion(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target: torch.Tensor,
    baseline_token: int,
    ablate_padding: bool = False,
) -> torch.Tensor:
    """Captum ``FeatureAblation`` with one feature per token position, each replaced by ``baseline_token``:
    (B, T), score(input) - score(position replaced). Padding keeps its own id (never ablated) unless
    ``ablate_padding``, which replaces it too (a check that the model ignores masked positions)."""
    if ablate_padding:
        baselines = torch.full_like(input_ids, baseline_token)
    else:
        baselines = baseline_like(input_ids, attention_mask, baseline_token)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with torch.no_grad():
        attributions = captum_attr.FeatureAblation(_forward(model)).attribute(
            input_ids,
            baselines=baselines,
            target=target,
            additional_forward_args=(attention_mask,),
            feature_mask=positions,
        )
    return attributions.detach()
