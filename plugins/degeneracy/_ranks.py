"""Units of a layer as rows, and effective ranks of eigenvalue spectra (the degeneracy family's helpers)."""

from __future__ import annotations

import torch

MAX_UNITS = 8192


def rank_text(rank: dict[str, int], layer: str) -> str:
    """``rank 37 at 0.001, rank 40 at 1e-06`` for one layer's relative cut-offs."""
    return ", ".join(
        f"rank {value} at {key.split(' rel<')[1]}" for key, value in rank.items() if key.startswith(f"{layer} rel<")
    )


def as_rows(activation: torch.Tensor, conv_units: str) -> torch.Tensor:
    """(B, C, *spatial) -> (B * positions, C) for channels; otherwise (B, features)."""
    if activation.dim() > 2 and conv_units == "channels":
        return activation.movedim(1, -1).reshape(-1, activation.shape[1])
    return activation.reshape(activation.shape[0], -1)


def effective_ranks(
    values: torch.Tensor, layer: str, thresholds: tuple[float, ...], variance: tuple[float, ...]
) -> dict[str, int]:
    clipped = values.clamp(min=0)
    top = float(clipped[0]) if clipped.numel() else 0.0
    total = float(clipped.sum())
    cumulative = clipped.cumsum(0) / total if total > 0 else clipped
    ranks = {f"{layer} rel<{t:g}": int((clipped > t * top).sum()) if top > 0 else 0 for t in thresholds}
    for v in variance:
        ranks[f"{layer} var{v:g}"] = int((cumulative < v - 1e-12).sum()) + 1 if total > 0 else 0
    return ranks
