"""The demo's report in a real (headless) browser: no console error, no failed request, every image decoded, every
internal link resolving, offline; and pages with one planted fault each, which the checker must name."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from browser import BrowserError, Chromium, PageReport, check_page, find_chromium

from pyengine.report import png_bytes

BINARY = find_chromium()
if BINARY is None:
    pytest.skip(
        "no Chromium found (chromium, chromium-browser, google-chrome or $PYENGINE_CHROMIUM; "
        "make test installs the system package chromium when it can)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One browser for the module; each check opens (and closes) its own tab."""
    with Chromium(str(BINARY)) as browser:
        yield browser


def test_demo_report_in_browser(
    demo_out: Path, tmp_path: Path, chromium: Chromium, request: pytest.FixtureRequest
) -> None:
    page = demo_out / "report" / "index.html"
    report = check_page(page, tmp_path / "report.png", chromium)
    assert report.problems == [], "\n".join(report.problems)
    assert report.pages[0] == page.resolve()
    assert report.text_length > 200 and report.images > 0, report.summary()  # a page, not an empty shell
    assert report.screenshot == tmp_path / "report.png" and report.screenshot.stat().st_size > 0
    width, height = report.screenshot_size
    assert width == 1400 and height >= 1000, report.summary()
    assert report.render_ms > 0 and report.folder_bytes > 0
    print(f"\nreport in Chromium: {report.summary()}; screenshot {report.screenshot}")
    # the test's properties (what record_property records, without its warning under junit_family xunit2)
    request.node.user_properties.extend(
        [
            ("report_bytes", report.folder_bytes),
            ("report_files", report.folder_files),
            ("report_pages", len(report.pages)),
            ("render_ms", round(report.render_ms, 1)),
            ("render_ms_all_pages", round(report.render_ms_all, 1)),
            ("screenshot", f"{width}x{height}"),
        ]
    )


def _png() -> bytes:
    torch.manual_seed(0)
    return png_bytes(torch.rand(3, 8, 8), scale=4)


def _page(body: str) -> str:
    return f'<!doctype html><html><head><meta charset="utf-8"><title>t</title></head><body>{body}</body></html>'


def _write(folder: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder / "index.html"


GOOD_UNIT = _page('<h2 id="unit-3">unit 3</h2><img src="../figure.png" alt="u"><a href="../index.html#top-of">back</a>')
GOOD = {
    "index.html": _page(
        '<h1 id="top-of">report</h1><nav><a href="#sec-1">section 1</a> <a href="units/unit-3.html#unit-3">unit</a> '
        '<a href="#">top</a></nav><section id="sec-1"><p>'
        + "text "
        * 300
        + '</p><img src="figure.png" alt="f"><svg width="40" height="40"><image href="figure.png" width="32" '
        'height="32"/><a href="#top-of"><text y="30">up</text></a></svg></section>'
        '<script>document.body.dataset.ready = "1"; console.log("fine");</script>'
    ),
    "units/unit-3.html": GOOD_UNIT,
}


def test_good_page_passes(tmp_path: Path, chromium: Chromium) -> None:
    index = _write(tmp_path / "report", {**GOOD, "figure.png": _png()})
    report = check_page(index, tmp_path / "shot.png", chromium)
    assert report.problems == [], report.problems
    assert [p.relative_to(index.parent).as_posix() for p in report.pages] == ["index.html", "units/unit-3.html"]
    assert report.images == 3 and report.links == 5
    assert report.screenshot_size[0] == 1400 and (tmp_path / "shot.png").read_bytes()[:4] == b"\x89PNG"
    assert report.folder_files == 3 and report.folder_bytes == sum(
        p.stat().st_size for p in (tmp_path / "report").rglob("*") if p.is_file()
    )


# Each: the page's body (or a change to the good report), the list of PageReport that must name the fault, and a
# fragment of the message. Every other list may also name it (a missing image is a failed request, a console
# message and an undecoded image), but the named one must.
FAULTS: dict[str, tuple[dict[str, str | bytes], str, str]] = {
    "console-error": (
        {"index.html": _page('<p>x</p><script>console.error("planted failure 1")</script>')},
        "console_errors",
        "index.html: console.error: planted failure 1",
    ),
    "console-assert": (
        {"index.html": _page('<p>x</p><script>console.assert(1 === 2, "planted assert")</script>')},
        "console_errors",
        "planted assert",
    ),
    "js-exception": (
        {"index.html": _page("<p>x</p><script>null.planted();</script>")},
        "console_errors",
        "uncaught exception: TypeError",
    ),
    "missing-image-request": (
        {"index.html": _page('<img src="figure-404.png" alt="gone">')},
        "failed_requests",
        "figure-404.png: net::ERR_FILE_NOT_FOUND",
    ),
    "missing-image": (
        {"index.html": _page('<img src="figure-404.png" alt="gone">')},
        "undecoded_images",
        "index.html: figure-404.png",
    ),
    "garbage-image": (
        {"index.html": _page('<img src="garbage.png" alt="bad">'), "garbage.png": bytes(range(256)) * 4},
        "undecoded_images",
        "index.html: garbage.png",
    ),
    "garbage-svg-image": (
        {
            "index.html": _page('<svg width="40" height="40"><image href="garbage.png" width="9" height="9"/></svg>'),
            "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(100),
        },
        "undecoded_images",
        "index.html: garbage.png",
    ),
    "missing-anchor": (
        {"index.html": _page('<h1 id="here">x</h1><a href="#nowhere">to nowhere</a>')},
        "broken_links",
        "index.html: href='#nowhere': no element with id 'nowhere'",
    ),
    "missing-page": (
        {"index.html": _page('<a href="units/unit-9.html">unit 9</a>')},
        "broken_links",
        "index.html: href='units/unit-9.html': no such file",
    ),
    "missing-anchor-on-unit-page": (
        {**GOOD, "units/unit-3.html": GOOD_UNIT.replace("#top-of", "#top-of-nothing")},
        "broken_links",
        "units/unit-3.html: href='../index.html#top-of-nothing': no element with id 'top-of-nothing'",
    ),
    "error-on-unit-page": (
        {**GOOD, "units/unit-3.html": GOOD_UNIT + "<script>console.error('unit page broken')</script>"},
        "console_errors",
        "units/unit-3.html: console.error: unit page broken",
    ),
    "outside-folder": (
        {"index.html": _page('<a href="../elsewhere.html">out</a>'), "../elsewhere.html": _page("<p>out</p>")},
        "broken_links",
        "href='../elsewhere.html': outside the report folder",
    ),
    "external-link": (
        {"index.html": _page('<a href="https://example.com/docs">docs</a>')},
        "external_links",
        "index.html: href='https://example.com/docs'",
    ),
    "external-request": (
        {"index.html": _page('<p>x</p><script src="http://127.0.0.1:9/cdn.js"></script>')},
        "external_requests",
        "http://127.0.0.1:9/cdn.js",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_named(tmp_path: Path, chromium: Chromium, fault: str) -> None:
    files, kind, fragment = FAULTS[fault]
    index = _write(tmp_path / "report", {"figure.png": _png(), **files})
    report: PageReport = check_page(index, tmp_path / "shot.png", chromium)
    found: list[str] = getattr(report, kind)
    assert any(fragment in message for message in found), (fault, kind, report.problems)
    assert report.problems, fault


def test_not_a_browser_fails_at_once(tmp_path: Path) -> None:
    """A binary that does not speak the protocol: a BrowserError naming it, not a hang."""
    with pytest.raises(BrowserError, match="the browser (closed its DevTools pipe|is gone)"):
        with Chromium(shutil.which("true") or "/bin/true", timeout=20):
            pass
