"""The HTML report: sections of escaped text, tables, PNG images and SVG line plots.

Everything printed is escaped; figures are data (``pyengine.Figure``), rendered here.
"""

from __future__ import annotations

import html
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyengine.figures import image_grid
from pyengine.technique import Figure

__all__ = ["Report", "Section", "image_grid", "png_bytes", "svg_lines"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    """Encode an (H, W) or (C, H, W) float image in [0, 1] as PNG (grey or RGB)."""
    data = image.detach().float().cpu().clamp(0, 1)
    if data.dim() == 3 and data.shape[0] == 1:
        data = data[0]
    if data.dim() == 3 and data.shape[0] != 3:
        raise ValueError(f"image with {data.shape[0]} channels: expected 1 or 3")
    if scale > 1:
        data = data.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    pixels = (data * 255).round().to(torch.uint8)
    colour = pixels.dim() == 3
    rows = pixels.permute(1, 2, 0).contiguous() if colour else pixels.contiguous()
    height, width = rows.shape[0], rows.shape[1]
    raw = b"".join(b"\x00" + rows[y].numpy().tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def svg_lines(figure: Figure, width: int = 560, height: int = 300) -> str:
    """A line plot as inline SVG; every label is escaped."""
    series = {str(k): [float(v) for v in vs] for k, vs in (figure.lines or {}).items()}
    points = [v for vs in series.values() for v in vs if math.isfinite(v) and (v > 0 or not figure.log_y)]
    if not points:
        return "<p>(no data)</p>"
    transform = (lambda v: math.log10(v)) if figure.log_y else (lambda v: v)
    lo, hi = min(map(transform, points)), max(map(transform, points))
    hi = hi if hi > lo else lo + 1
    longest = max(len(vs) for vs in series.values())
    xs_all = [float(x) for x in figure.x] if figure.x is not None else None
    left, right, top, bottom = 60, 150, 10, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(i: int) -> float:
        if xs_all is not None and len(xs_all) > 1:
            return left + plot_w * (xs_all[i] - xs_all[0]) / ((xs_all[-1] - xs_all[0]) or 1)
        return left + plot_w * i / max(1, longest - 1)

    def py(v: float) -> float:
        return top + plot_h * (1 - (transform(v) - lo) / (hi - lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        label = f"1e{value:.1f}" if figure.log_y else f"{value:.3g}"
        y = top + plot_h * (1 - k / 4)
        parts.append(f'<text x="{left - 4}" y="{y:.1f}" text-anchor="end" font-size="10">{html.escape(label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        colour = _PALETTE[index % len(_PALETTE)]
        coords = " ".join(
            f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(values) if math.isfinite(v) and (v > 0 or not figure.log_y)
        )
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(
            f'<text x="{left + plot_w + 8}" y="{top + 14 * (index + 1)}" font-size="11" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" font-size="11">'
        f"{html.escape(figure.xlabel)}</text>"
    )
    parts.append(
        f'<text x="12" y="{top + plot_h / 2}" font-size="11" transform="rotate(-90 12 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(figure.ylabel)}</text></svg>'
    )
    return "".join(parts)


@dataclass
class Section:
    title: str
    lines: Sequence[str] = ()
    table: Sequence[Sequence[object]] = ()  # first row is the header
    figures: Sequence[Figure] = ()
    error: str = ""


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)

    def write(self, directory: str | Path) -> Path:
        """Write ``index.html`` and its PNG files into ``directory``; returns the HTML path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        body: list[str] = [f"<h1>{html.escape(self.title)}</h1>"]
        image_count = 0
        for section in self.sections:
            body.append(f"<section><h2>{html.escape(section.title)}</h2>")
            if section.error:
                body.append(f'<p class="error">{html.escape(section.error)}</p>')
            body.extend(f"<p>{html.escape(line)}</p>" for line in section.lines)
            if section.table:
                header, *rows = section.table
                body.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr>")
                body.extend("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                body.append("</table>")
            for figure in section.figures:
                body.append(f"<figure><figcaption>{html.escape(figure.title)}</figcaption>")
                if figure.image is not None:
                    image_count += 1
                    name = f"figure-{image_count:03d}.png"
                    scale = max(1, 256 // max(figure.image.shape[-2:]))
                    (out / name).write_bytes(png_bytes(figure.image, scale))
                    body.append(f'<img src="{name}" alt="{html.escape(figure.title, quote=True)}">')
                if figure.lines:
                    body.append(svg_lines(figure))
                if figure.caption:
                    body.append(f"<p>{html.escape(figure.caption)}</p>")
                body.append("</figure>")
            body.append("</section>")
        style = (
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
            "img{image-rendering:pixelated;max-width:100%}.error{color:#b00}figure{margin:1em 0}"
        )
        page = (
            f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
        )
        path = out / "index.html"
        path.write_text(page, encoding="utf-8")
        return path
