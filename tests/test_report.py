"""The HTML report escapes everything it prints; PNGs decode to the pixels given."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from pyengine.report import Report, Section, image_grid, png_bytes
from pyengine.technique import Figure


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    idat = b""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, colour, zlib.decompress(idat)


def test_png_round_trip() -> None:
    image = torch.rand(3, 5, 7)
    width, height, colour, raw = decode_png(png_bytes(image))
    assert (width, height, colour) == (7, 5, 2)
    rows = [raw[y * (1 + 21) + 1 : (y + 1) * (1 + 21)] for y in range(5)]
    pixels = torch.tensor([list(row) for row in rows], dtype=torch.uint8).view(5, 7, 3).permute(2, 0, 1)
    assert torch.equal(pixels, (image * 255).round().to(torch.uint8))
    assert decode_png(png_bytes(torch.rand(4, 4)))[2] == 0  # greyscale


def test_grid_places_every_image() -> None:
    images = torch.zeros(5, 1, 2, 2)
    grid = image_grid(images, columns=2, pad=1)
    assert grid.shape == (1, 3 * 3 + 1, 2 * 3 + 1)
    assert int((grid == 0).sum()) == 5 * 4


def test_everything_printed_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    report = Report(
        evil,
        [
            Section(
                evil,
                lines=[evil],
                table=[[evil], [evil]],
                error=evil,
                figures=[
                    Figure(evil, lines={evil: [1.0, 2.0]}, xlabel=evil, ylabel=evil, caption=evil),
                    Figure(evil, image=torch.rand(3, 4, 4)),
                ],
            )
        ],
    )
    page = report.write(tmp_path).read_text()
    assert "<script>alert" not in page and page.count("<script>") == 1  # the one script: the table sorter
    assert page.count("&lt;script&gt;") >= 9
    assert (tmp_path / "figure-001.png").exists()
