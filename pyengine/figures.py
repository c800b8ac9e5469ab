"""Figures as tensors: image grids, heatmaps, overlays, upscaling and blur (host API)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyengine.technique import ColourScale, Figure

TILE_PIXELS = 48  # upscale small tiles to about this size


def image_grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image with white padding."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for k in range(n):
        y, x = pad + (k // columns) * (h + pad), pad + (k % columns) * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def heatmap(values: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """(H, W) attribution -> (3, H, W) colours: red positive, blue negative, white zero; full colour
    at ``limit`` (default: the largest |value|) and beyond."""
    scale = values.abs().max().clamp(min=1e-12) if limit is None else torch.tensor(max(limit, 1e-30))
    v = (values / scale).clamp(-1, 1)
    positive, negative = v.clamp(min=0), (-v).clamp(min=0)
    return torch.stack([1 - negative, 1 - positive - negative, 1 - positive]).clamp(0, 1)


def overlay(image: torch.Tensor, values: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """The input (C, H, W) in grey with the heatmap of ``values`` (H, W) over it."""
    grey = image.float().mean(0) if image.dim() == 3 else image.float()
    low, high = grey.min(), grey.max()
    grey = (grey - low) / (high - low).clamp(min=1e-12)
    return (1 - alpha) * grey.expand(3, -1, -1) + alpha * heatmap(values.float())


HEATMAP_PERCENTILE = 0.99  # heatmap figures: full colour at this quantile of |value| over all tiles


def heatmap_figure(
    title: str, inputs: torch.Tensor, maps: torch.Tensor, *, units: str, caption: str = "", columns: int = 4
) -> Figure:
    """Heatmaps of ``maps`` (N, H, W) over ``inputs`` (N, C, H, W) in grey, one colour scale for all tiles
    (full colour at the 99th percentile of |value|, stated by the report's colour bar in ``units``);
    the report draws the heatmaps over the inputs with adjustable opacity."""
    maps = maps.detach().float().cpu()
    # the inputs in grey: a blue object must not read as a negative attribution
    images = normalise_each(inputs.detach().float().cpu().mean(1, keepdim=True))
    magnitudes = maps.abs().flatten()
    limit = float(torch.quantile(magnitudes[:16_000_000], HEATMAP_PERCENTILE)) if magnitudes.numel() else 0.0
    if limit <= 0:
        limit = float(magnitudes.max()) if magnitudes.numel() else 0.0
    heat = torch.stack([heatmap(m, limit) for m in maps])
    columns = max(1, min(columns, maps.shape[0]))
    base = image_grid(images.expand(-1, 3, -1, -1), columns=columns)
    note = f"one colour scale for all tiles; |values| above {limit:.3g} (the 99th percentile) at full colour"
    return Figure(
        title,
        image=base,
        heat=image_grid(heat, columns=columns),
        scale=ColourScale(limit, units),
        caption=f"{caption}; {note}" if caption else note,
    )


def spatial_map(attribution: torch.Tensor) -> torch.Tensor:
    """One value per pixel: (C, H, W) summed over channels; (H, W) as is."""
    return attribution.float().sum(0) if attribution.dim() == 3 else attribution.float()


def upscale(images: torch.Tensor, pixels: int = TILE_PIXELS) -> torch.Tensor:
    """Nearest-neighbour upscaling of (N, C, h, w) tiles to about ``pixels`` on the long side."""
    factor = max(1, pixels // max(images.shape[-2:]))
    return images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def normalise_each(images: torch.Tensor) -> torch.Tensor:
    """Each image (over all its channels) to [0, 1]."""
    flat = images.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    shape = (-1, *([1] * (images.dim() - 1)))
    return (images - low.view(shape)) / (high - low).clamp(min=1e-12).view(shape)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial dims of (N, C, H, W) or (N, C, L), reflect-padded."""
    radius = max(1, int(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    taps = taps / taps.sum()
    c = x.shape[1]
    out = x
    for axis in range(2, x.dim()):
        radius_here = min(radius, x.shape[axis] - 1)
        kernel = taps[radius - radius_here : radius + radius_here + 1]
        shape = [1] * (x.dim() - 2)
        shape[axis - 2] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * (x.dim() - 2)
        pad[2 * (x.dim() - 1 - axis)] = pad[2 * (x.dim() - 1 - axis) + 1] = radius_here
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        out = conv(F.pad(out, pad, mode="reflect") if radius_here else out, weight, groups=c)
    return out
