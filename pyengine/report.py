"""The HTML report: sections of escaped text, tables, PNG images and SVG line plots.

Everything printed is escaped; figures are data (``pyengine.Figure``), rendered here.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyengine.figures import image_grid
from pyengine.progress import Progress
from pyengine.technique import ColourScale, Figure, UnitRef

__all__ = [
    "Link",
    "Page",
    "Report",
    "Section",
    "colour_bar",
    "image_grid",
    "inline_png",
    "png_bytes",
    "section_html",
    "svg_lines",
]

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


# Click a header of a sortable table: its rows sorted by that column (numbers as numbers), again: reversed.
SORT_SCRIPT = (
    "document.querySelectorAll('table.sortable th').forEach(function(th,col){th.addEventListener('click',"
    "function(){var body=th.closest('table').tBodies[0],rows=Array.from(body.rows),"
    "up=th.dataset.order!=='up';th.dataset.order=up?'up':'down';rows.sort(function(a,b){"
    "var x=a.cells[col].textContent,y=b.cells[col].textContent,p=parseFloat(x),q=parseFloat(y);"
    "var c=(isNaN(p)||isNaN(q))?x.localeCompare(y):p-q;return up?c:-c;});"
    "rows.forEach(function(r){body.appendChild(r);});});});"
)

# A series named after a colour ("colour=red", "red") is drawn in it; the others take the palette's
# colours in order, skipping those already taken.
NAMED_COLOURS = {
    "red": "#d62728",
    "green": "#2ca02c",
    "blue": "#1f77b4",
    "yellow": "#bcbd22",
    "orange": "#ff7f0e",
    "purple": "#9467bd",
    "brown": "#8c564b",
    "pink": "#e377c2",
    "grey": "#7f7f7f",
    "gray": "#7f7f7f",
    "black": "#222222",
    "cyan": "#17becf",
}


def series_colours(names: Sequence[str]) -> list[str]:
    """One colour per series: its own when named after a colour, else the palette's next unused one."""
    named = [NAMED_COLOURS.get(re.split(r"[=:\s_/]", name.strip().lower())[-1]) for name in names]
    free = [c for c in _PALETTE if c not in named] or list(_PALETTE)
    colours, k = [], 0
    for colour in named:
        if colour is None:
            colour, k = free[k % len(free)], k + 1
        colours.append(colour)
    return colours


LOG_DECADES = 12  # a log axis shows at most this many decades below the largest value


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(value) < 1e-12 * step else value)
        value += step
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:.4g}"


def svg_lines(figure: Figure, width: int = 620, height: int = 320) -> str:
    """A line plot as inline SVG, with tick values on both axes (the layers' names for a
    categorical x), a legend in the lines' colours and markers (a one-point series shows); a log
    axis spans at most ``LOG_DECADES`` decades below the largest value and says what it clipped.
    Every label is escaped; '' when there is no finite value to draw."""
    series = {str(k): [float(v) for v in vs] for k, vs in (figure.lines or {}).items()}
    drawable = [v for vs in series.values() for v in vs if math.isfinite(v) and (v > 0 or not figure.log_y)]
    if not drawable:
        return ""
    transform = math.log10 if figure.log_y else (lambda v: v)
    hi = max(map(transform, drawable))
    lo = min(map(transform, drawable))
    clipped = 0
    if figure.log_y and hi - lo > LOG_DECADES:
        lo = hi - LOG_DECADES
        clipped = sum(1 for v in drawable if math.log10(v) < lo)
    if figure.log_y:
        lo, hi = math.floor(lo), math.ceil(hi) if math.ceil(hi) > math.floor(lo) else math.floor(lo) + 1
    elif hi == lo:
        lo, hi = lo - 1, hi + 1
    longest = max(len(vs) for vs in series.values())
    labels = [str(label) for label in figure.x_labels]
    xs = [float(x) for x in figure.x] if figure.x is not None and not labels else [float(i) for i in range(longest)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_span = (x_hi - x_lo) or 1.0
    left, right, top = 70, 170, 12
    bottom = 70 if labels else 48
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(i: int) -> float:
        x = xs[i] if i < len(xs) else float(i)
        return left + plot_w * ((x - x_lo) / x_span if len(xs) > 1 else 0.5)

    def py(v: float) -> float:
        return top + plot_h * (1 - (max(transform(v), lo) - lo) / (hi - lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    y_ticks = (
        [float(k) for k in range(int(lo), int(hi) + 1, max(1, math.ceil((hi - lo) / 6)))]
        if figure.log_y
        else _nice_ticks(lo, hi)
    )
    for value in y_ticks:
        y = top + plot_h * (1 - (value - lo) / (hi - lo))
        text = f"1e{int(value)}" if figure.log_y else _tick_label(value)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#999"/>')
        parts.append(
            f'<text class="ytick" x="{left - 6}" y="{y + 3:.1f}" text-anchor="end" font-size="10">'
            f"{html.escape(text)}</text>"
        )
    if labels:
        x_ticks = [(float(i), label) for i, label in enumerate(labels)]
    else:
        x_ticks = [(value, _tick_label(value)) for value in _nice_ticks(x_lo, x_hi, 6)]
    for value, text in x_ticks:
        x = left + plot_w * ((value - x_lo) / x_span if len(xs) > 1 else 0.5)
        base = top + plot_h
        parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#999"/>')
        anchor = f'text-anchor="end" transform="rotate(-30 {x:.1f} {base + 14})"' if labels else 'text-anchor="middle"'
        parts.append(
            f'<text class="xtick" x="{x:.1f}" y="{base + 14}" {anchor} font-size="10">{html.escape(text)}</text>'
        )
    for index, ((name, values), colour) in enumerate(zip(series.items(), series_colours(list(series)))):
        points = [
            (px(i), py(v))
            for i, v in enumerate(values)
            if math.isfinite(v) and (v > 0 or not figure.log_y) and transform(v) >= lo  # clipped: not drawn
        ]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if len(points) <= 20:
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in points)
        legend_y = top + 14 * (index + 1)
        parts.append(
            f'<rect class="legend" x="{left + plot_w + 8}" y="{legend_y - 8}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(
            f'<text x="{left + plot_w + 22}" y="{legend_y}" font-size="11" fill="{colour}">{html.escape(name)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">'
        f"{html.escape(figure.xlabel)}</text>"
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" font-size="11" transform="rotate(-90 14 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(figure.ylabel)}</text>'
    )
    if clipped:
        parts.append(
            f'<text class="clipped" x="{left + plot_w + 8}" y="{top + plot_h - 12}" font-size="10">'
            f'{clipped} values below 1e{int(lo)}<tspan x="{left + plot_w + 8}" dy="12">not shown</tspan></text>'
        )
    return "".join(parts) + "</svg>"


@dataclass(frozen=True)
class Link:
    """A table cell that links somewhere (another section, a unit's page)."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Section:
    title: str
    lines: Sequence[str] = ()
    table: Sequence[Sequence[object]] = ()  # first row is the header; cells: text, numbers, Link, UnitRef
    figures: Sequence[Figure] = ()
    error: str = ""
    anchor: str = ""  # the section's id (default: from the title)


IMAGE_WIDTH = 960  # images are enlarged to this width (pixels kept sharp), at most MAX_ZOOM times
MAX_ZOOM = 16
HEAT_OPACITY = 60  # percent: the heatmap over the inputs, adjustable per figure


def anchor_of(title: str) -> str:
    """An id for a title: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def _display_width(image: torch.Tensor) -> int:
    """Small images enlarged to fill ``IMAGE_WIDTH`` (at most ``MAX_ZOOM`` times), large ones as they are."""
    width = int(image.shape[-1])
    return max(width, min(IMAGE_WIDTH, width * MAX_ZOOM))


_BAR_IDS = itertools.count()


def colour_bar(scale: ColourScale, width: int = 340) -> str:
    """An SVG colour bar: blue at -limit, white at 0, red at +limit, ticks in the scale's units."""
    limit = scale.limit
    gradient = f"pyengine-rwb-{next(_BAR_IDS)}"
    ticks = [-limit, -limit / 2, 0.0, limit / 2, limit]
    left, bar_w = 36, width - 72
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="52" class="colour-bar">',
        f'<defs><linearGradient id="{gradient}"><stop offset="0" stop-color="#0000ff"/>'
        '<stop offset="0.5" stop-color="#ffffff"/><stop offset="1" stop-color="#ff0000"/></linearGradient></defs>',
        f'<rect x="{left}" y="4" width="{bar_w}" height="12" fill="url(#{gradient})" stroke="#999"/>',
    ]
    for k, value in enumerate(ticks):
        x = left + bar_w * k / (len(ticks) - 1)
        text = f"{value:.3g}" if value else "0"
        if k in (0, len(ticks) - 1):
            text = ("≤ " if k == 0 else "≥ ") + text
        parts.append(f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="20" stroke="#999"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="31" text-anchor="middle" font-size="10">{html.escape(text)}</text>'
        )
    parts.append(
        f'<text x="{left + bar_w / 2:.1f}" y="46" text-anchor="middle" font-size="11">{html.escape(scale.units)}</text>'
    )
    return "".join(parts) + "</svg>"


def _cell(value: object, unit_pages: Mapping[str, str]) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.href, quote=True)}">{html.escape(value.text)}</a>'
    if isinstance(value, UnitRef) and str(value) in unit_pages:
        return f'<a href="{html.escape(unit_pages[str(value)], quote=True)}">{html.escape(str(value))}</a>'
    return html.escape(str(value))


def _image_html(figure: Figure, image_source: Callable[[bytes], str]) -> str:
    if figure.image is None:
        return ""
    width = figure.width or _display_width(figure.image)
    alt = html.escape(figure.title, quote=True)
    base = f'<img src="{html.escape(image_source(png_bytes(figure.image)), quote=True)}" alt="{alt}" width="{width}">'
    if figure.heat is None or tuple(figure.heat.shape[-2:]) != tuple(figure.image.shape[-2:]):
        return base
    heat = html.escape(image_source(png_bytes(figure.heat)), quote=True)
    parts = [
        f'<div class="overlay" style="width:{width}px">{base}',
        f'<img class="heat" src="{heat}" alt="{alt}: heatmap" width="{width}" style="opacity:{HEAT_OPACITY / 100}">',
        "</div>",
        f'<label class="opacity">heatmap opacity <input type="range" min="0" max="100" value="{HEAT_OPACITY}"></label>',
    ]
    if figure.scale is not None:
        parts.append(colour_bar(figure.scale))
    return "".join(parts)


def section_html(
    section: Section,
    image_source: Callable[[bytes], str],
    *,
    anchor: str = "",
    unit_pages: Mapping[str, str] | None = None,
) -> str:
    """One section as HTML: escaped lines, a sortable table, figures; ``image_source`` turns PNG
    bytes into an ``src`` (a file name for the report, a data URI inline in a notebook);
    ``unit_pages`` maps a unit (``layer#k``) to the link of its page (table cells naming it link there)."""
    pages = unit_pages or {}
    ident = anchor or section.anchor or anchor_of(section.title)
    body = [f'<section id="{html.escape(ident, quote=True)}"><h2>{html.escape(section.title)}</h2>']
    if section.error:
        body.append(f'<p class="error">{html.escape(section.error)}</p>')
    body.extend(f"<p>{html.escape(line)}</p>" for line in section.lines)
    if section.table:
        header, *rows = section.table
        cells = "".join(f'<th title="sort">{html.escape(str(c))}</th>' for c in header)
        body.append(f'<table class="sortable"><thead><tr>{cells}</tr></thead><tbody>')
        body.extend("<tr>" + "".join(f"<td>{_cell(c, pages)}</td>" for c in row) + "</tr>" for row in rows)
        body.append("</tbody></table>")
    for figure in section.figures:
        body.append(f"<figure><figcaption>{html.escape(figure.title)}</figcaption>")
        body.append(_image_html(figure, image_source))
        if figure.lines:
            body.append(svg_lines(figure) or "<p>(no finite values to plot)</p>")
        if figure.caption:
            body.append(f"<p>{html.escape(figure.caption)}</p>")
        body.append("</figure>")
    body.append("</section>")
    return "".join(body)


def inline_png(png: bytes) -> str:
    """A PNG as a data URI: an image inside the HTML itself (notebooks)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# A heatmap's opacity slider sets the opacity of the heatmap drawn over the inputs.
OPACITY_SCRIPT = (
    "document.querySelectorAll('label.opacity input').forEach(function(input){input.addEventListener('input',"
    "function(){var heat=input.closest('figure').querySelector('img.heat');"
    "if(heat){heat.style.opacity=input.value/100;}});});"
)

# What a section needs wherever it is shown (the report, a notebook): heatmaps over their inputs.
FIGURE_STYLE = (
    "img{image-rendering:pixelated;max-width:100%;height:auto}"
    ".overlay{position:relative;max-width:100%}.overlay img{display:block}"
    ".overlay img.heat{position:absolute;left:0;top:0;width:100%}"
    "label.opacity{display:block;font-size:12px;color:#555}"
)
STYLE = FIGURE_STYLE + (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
    ".error{color:#b00}figure{margin:1em 0}"
    "table.sortable th{cursor:pointer;background:#f4f4f4}"
    "nav.toc{columns:2;font-size:14px;margin-bottom:2em}nav.toc ol{margin:0}"
)


@dataclass
class Page:
    """A page of its own beside ``index.html`` (e.g. one per unit group), linked from the report."""

    file: str  # e.g. "units.html"
    title: str
    sections: list[Section] = field(default_factory=list)


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    unit_pages: dict[str, str] = field(default_factory=dict)  # unit (layer#k) -> "page.html#anchor"

    def write(self, directory: str | Path, *, progress: bool = False) -> Path:
        """Write ``index.html`` (a table of contents, then the sections), the extra pages and their
        PNG files into ``directory``; returns the index's path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written: list[int] = [0]

        def save(png: bytes) -> str:  # each image a file beside index.html
            written[0] += 1
            name = f"figure-{written[0]:03d}.png"
            (out / name).write_bytes(png)
            return name

        pages = [Page("index.html", self.title, self.sections), *self.pages]
        total = sum(len(page.sections) for page in pages)
        with Progress(total, "report", enabled=progress) as bar:
            for page in pages:
                anchors = _unique_anchors(page.sections)
                body = [f"<h1>{html.escape(page.title)}</h1>"]
                if page.file == "index.html" and len(page.sections) > 1:
                    body.append(_toc(page.sections, anchors, self.pages))
                elif page.file != "index.html":
                    body.append('<p><a href="index.html">back to the report</a></p>')
                for section, anchor in zip(page.sections, anchors):
                    body.append(section_html(section, save, anchor=anchor, unit_pages=self.unit_pages))
                    bar.update()
                (out / page.file).write_text(_page_html(page.title, body), encoding="utf-8")
        return out / "index.html"


def _unique_anchors(sections: Sequence[Section]) -> list[str]:
    seen: dict[str, int] = {}
    anchors = []
    for section in sections:
        anchor = section.anchor or anchor_of(section.title)
        seen[anchor] = seen.get(anchor, 0) + 1
        anchors.append(anchor if seen[anchor] == 1 else f"{anchor}-{seen[anchor]}")
    return anchors


def _toc(sections: Sequence[Section], anchors: Sequence[str], pages: Sequence[Page]) -> str:
    items = [
        f'<li><a href="#{html.escape(a, quote=True)}">{html.escape(s.title)}</a></li>'
        for s, a in zip(sections, anchors)
    ]
    items += [f'<li><a href="{html.escape(p.file, quote=True)}">{html.escape(p.title)}</a></li>' for p in pages]
    return f'<nav class="toc"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def _page_html(title: str, body: Sequence[str]) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}"
        f"<script>{SORT_SCRIPT}{OPACITY_SCRIPT}</script></body></html>"
    )
