"""``shapes``: synthetic RGB images of one textured, coloured shape on a noisy background.

Every row is generated from (seed, index) alone, lazily and deterministically. The class
is the shape; texture and colour are concept labels; the bounding box is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pyengine.data.base import Batch, Dataset
from pyengine.errors import PyengineError

SHAPES = ("square", "circle", "triangle", "cross")
TEXTURES = ("plain", "striped", "dotted")
COLOURS = ("red", "green", "blue", "yellow")
_RGB = torch.tensor([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.35, 0.95], [0.95, 0.85, 0.1]])


CACHE_BYTES = 256 * 2**20  # datasets whose images fit are rendered once and kept


def _empty_like(batch: Batch, n: int) -> Batch:
    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros((n, *t.shape[1:]), dtype=t.dtype)

    concepts = {k: grow(v) for k, v in batch.concepts.items()}
    boxes = grow(batch.boxes) if batch.boxes is not None else None
    return Batch(grow(batch.inputs), grow(batch.labels), torch.arange(n), concepts, boxes)


def _store(cache: Batch, rows: torch.Tensor, batch: Batch) -> None:
    cache.inputs[rows] = batch.inputs
    cache.labels[rows] = batch.labels
    for key, values in batch.concepts.items():
        cache.concepts[key][rows] = values
    if cache.boxes is not None and batch.boxes is not None:
        cache.boxes[rows] = batch.boxes


class Shapes(Dataset):
    """``Shapes(n, seed=0, size=64)``: n images of size x size, classes ``SHAPES``."""

    class_names = SHAPES
    concept_names = {"texture": TEXTURES, "colour": COLOURS}

    def __init__(self, n: int = 2048, seed: int = 0, size: int = 64) -> None:
        if not isinstance(n, int) or n < 1:
            raise PyengineError(f"shapes: n={n!r} is invalid; expected a positive integer")
        if not isinstance(size, int) or size < 16:
            raise PyengineError(f"shapes: size={size!r} is invalid; expected an integer >= 16")
        self.n, self.seed, self.size = n, int(seed), size
        self.name = "shapes"
        self._cache: Batch | None = None  # every row, once rendered (small datasets: CACHE_BYTES)
        self._rendered = torch.zeros(n, dtype=torch.bool)

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.n, "seed": self.seed, "image_size": self.size}

    def _params(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: 8 uniform numbers for the layout, and the background noise."""
        uniforms, noise = [], []
        for i in index.tolist():
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            uniforms.append(torch.rand(8, generator=g))
            noise.append(torch.randn(3, self.size, self.size, generator=g))
        return torch.stack(uniforms), torch.stack(noise)

    def batch(self, indices: Sequence[int]) -> Batch:
        index = self._check_indices(indices)
        if self.n * 3 * self.size * self.size * 4 > CACHE_BYTES:
            return self._render(index)
        missing = index[~self._rendered[index]].unique()
        if missing.numel():
            fresh = self._render(missing)
            if self._cache is None:
                self._cache = _empty_like(fresh, self.n)
            _store(self._cache, missing, fresh)
            self._rendered[missing] = True
        cache = self._cache
        if cache is None:  # no rows asked for
            return self._render(index)
        concepts = {k: v[index] for k, v in cache.concepts.items()}
        boxes = cache.boxes[index] if cache.boxes is not None else None
        return Batch(cache.inputs[index], cache.labels[index], index, concepts, boxes)

    def _render(self, index: torch.Tensor) -> Batch:
        s = self.size
        u, noise = self._params(index)
        shape = (u[:, 0] * len(SHAPES)).long().clamp(max=len(SHAPES) - 1)
        texture = (u[:, 1] * len(TEXTURES)).long().clamp(max=len(TEXTURES) - 1)
        colour = (u[:, 2] * len(COLOURS)).long().clamp(max=len(COLOURS) - 1)
        radius = s * (0.16 + 0.14 * u[:, 3])
        cx = radius + 1 + u[:, 4] * (s - 2 * radius - 2)
        cy = radius + 1 + u[:, 5] * (s - 2 * radius - 2)
        angle = u[:, 6] * math.pi
        period = s * (0.07 + 0.03 * u[:, 7])

        coords = torch.arange(s, dtype=torch.float32) + 0.5
        dx = coords.view(1, 1, s) - cx.view(-1, 1, 1)
        dy = coords.view(1, s, 1) - cy.view(-1, 1, 1)
        r = radius.view(-1, 1, 1)
        arm = 0.35 * r
        masks = torch.stack(
            [
                (dx.abs() <= r) & (dy.abs() <= r),
                dx * dx + dy * dy <= r * r,
                (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),
                ((dx.abs() <= r) & (dy.abs() <= arm)) | ((dy.abs() <= r) & (dx.abs() <= arm)),
            ],
            dim=1,
        )
        mask = masks[torch.arange(len(index)), shape]

        p = period.view(-1, 1, 1)
        along = dx * torch.cos(angle).view(-1, 1, 1) + dy * torch.sin(angle).view(-1, 1, 1)
        stripes = torch.remainder(along / p, 1.0) < 0.5
        dots = (torch.remainder(dx, p) - p / 2) ** 2 + (torch.remainder(dy, p) - p / 2) ** 2 <= (0.3 * p) ** 2
        lit = torch.stack([torch.ones_like(stripes), stripes, dots], dim=1)[torch.arange(len(index)), texture]
        intensity = torch.where(lit, 1.0, 0.3).float()

        rgb = _RGB[colour].view(-1, 3, 1, 1)
        background = 0.45 + 0.12 * noise
        foreground = rgb * intensity.unsqueeze(1) + 0.04 * noise
        images = torch.where(mask.unsqueeze(1), foreground, background).clamp(0.0, 1.0)
        boxes = torch.stack([cx - radius, cy - radius, cx + radius, cy + radius], dim=1).float()
        return Batch(images, shape, index, {"texture": texture, "colour": colour}, boxes.clamp(0, s))
