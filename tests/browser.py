"""A headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``), no Python dependency.

``check_page(html, screenshot)`` loads a local HTML page and every local page it links to, and reports what a
reader would meet: console errors and uncaught exceptions, failed or external requests, images that do not
decode, links that lead nowhere (a ``#fragment`` with no such id, a missing file, anything online: the page must
work offline); it saves a full-page screenshot of the first page and measures the render time and the size of
the page's folder. ``find_chromium()`` finds the browser ($PYENGINE_CHROMIUM, else chromium, chromium-browser,
google-chrome on PATH).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

WIDTH = 1400  # CSS pixels: the viewport and the screenshot's width
HEIGHT = 1000
CALL_TIMEOUT = 60.0  # seconds for one protocol call or one page load
MAX_PAGES = 500  # a crawl bound: a report that links more local pages than this is reported as such

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# The browser reads commands from fd 3 and writes to fd 4; subprocess can only keep an fd's number, so a child
# Python puts the two pipe ends there and becomes the browser (no preexec_fn: unsafe in a threaded parent).
TRAMPOLINE = (
    "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); os.close(r); "
    "os.close(w); os.execv(sys.argv[3], sys.argv[3:] + ['about:blank'])"
)


class BrowserError(RuntimeError):
    """The browser could not be started, stopped answering, or a call failed."""


def find_chromium() -> str | None:
    """The browser to drive: $PYENGINE_CHROMIUM when set (a path or a name on PATH), else the first of
    chromium, chromium-browser, google-chrome on PATH; None when there is none."""
    named = os.environ.get("PYENGINE_CHROMIUM")
    if named:
        return shutil.which(named)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium process and a DevTools connection over fds 3 (commands) and 4 (replies, events).

    A context manager: leaving it closes the browser (``Browser.close``, then SIGKILL to its whole process group),
    reaps it and removes its temporary profile, whatever happened.
    """

    def __init__(self, binary: str, timeout: float = CALL_TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = bytearray()
        self._process: subprocess.Popen[bytes] | None = None
        self._profile = ""
        self._to_browser = -1
        self._from_browser = -1
        self._log: Any = None

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop()

    def _start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="pyengine-chromium-")
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()
        # the child's ends, moved above 9 so that putting them on 3 and 4 cannot overwrite one with the other
        child_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_write = fcntl.fcntl(replies_write, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (commands_read, replies_write):
            os.close(fd)
        self._to_browser, self._from_browser = commands_write, replies_read
        flags = [
            "--headless=new",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--hide-scrollbars",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--user-data-dir={self._profile}",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._log = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-c", TRAMPOLINE, str(child_read), str(child_write), self.binary, *flags],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=(child_read, child_write),
                start_new_session=True,  # its own process group: the renderers and helpers are killed with it
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self.call("Browser.getVersion")

    def _stop(self) -> None:
        process = self._process
        if process is not None:
            if process.poll() is None and self._to_browser >= 0:
                with contextlib.suppress(BrowserError, OSError):
                    self.call("Browser.close", timeout=5)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group, the browser included
            process.wait(10)
            self._process = None
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_browser = self._from_browser = -1
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = ""

    def _browser_output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-5:])

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        """Send one command; returns its id."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            _, ready, _ = select.select([], [self._to_browser], [], self.timeout)
            if not ready:
                raise BrowserError(f"the browser does not read its commands ({method})")
            try:
                data = data[os.write(self._to_browser, data) :]
            except BrokenPipeError:
                raise BrowserError(f"the browser is gone ({method}): {self._browser_output()}") from None
        return self._next_id

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None when the deadline passes first."""
        end = self._buffer.find(b"\0")
        while end < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser closed its DevTools pipe: {self._browser_output()}")
            end = chunk.find(b"\0")
            if end >= 0:
                end += len(self._buffer)
            self._buffer += chunk
        message: dict[str, Any] = json.loads(self._buffer[:end])
        del self._buffer[: end + 1]
        return message

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 0
    ) -> dict[str, Any]:
        """Send a command and wait for its reply (events that come first are kept in ``events``)."""
        ident = self.send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self.receive(deadline)
            if message is None:
                raise BrowserError(f"no reply to {method} within {timeout or self.timeout:.0f} s")
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, session: str | None = None, timeout: float = 0) -> dict[str, Any]:
        """Wait for an event (it may already be in ``events``); returns its params."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and event.get("sessionId") == session:
                    params: dict[str, Any] = event.get("params", {})
                    return params
            seen = len(self.events)
            message = self.receive(deadline)
            if message is None:
                raise BrowserError(f"no {method} within {timeout or self.timeout:.0f} s")
            if "method" in message:
                self.events.append(message)


@dataclass
class PageReport:
    """What loading a page (and every local page it links to) showed; ``problems`` lists every failure."""

    page: Path
    pages: list[Path] = field(default_factory=list)  # every local page loaded, the first one first
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    undecoded_images: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    external_links: list[str] = field(default_factory=list)
    images: int = 0  # images checked, all pages
    links: int = 0  # links checked, all pages
    text_length: int = 0  # characters of visible text on the first page
    render_ms: float = 0.0  # the first page: navigation start to the end of its load event
    render_ms_all: float = 0.0  # every page loaded, added up
    folder_bytes: int = 0  # every file under the first page's folder
    folder_files: int = 0
    screenshot: Path | None = None
    screenshot_size: tuple[int, int] = (0, 0)  # pixels, width and height

    @property
    def problems(self) -> list[str]:
        return [
            *(f"console error: {m}" for m in self.console_errors),
            *(f"failed request: {m}" for m in self.failed_requests),
            *(f"external request (the page must work offline): {m}" for m in self.external_requests),
            *(f"image not decoded: {m}" for m in self.undecoded_images),
            *(f"broken link: {m}" for m in self.broken_links),
            *(f"external link (the page must work offline): {m}" for m in self.external_links),
        ]

    def summary(self) -> str:
        width, height = self.screenshot_size
        return (
            f"{len(self.pages)} page(s), {self.folder_files} files, {self.folder_bytes / 1e6:.2f} MB; render "
            f"{self.render_ms:.0f} ms (all pages {self.render_ms_all:.0f} ms); {self.images} images, {self.links} "
            f"links; screenshot {width}x{height} px"
        )


# Run in the page after its load event: wait for every image (lazy ones made eager) and report what the page
# holds. An <img> decoded is complete with a natural width; an SVG <image> is loaded afresh and decoded.
PAGE_SCRIPT = """(async () => {
  const images = Array.from(document.images);
  for (const img of images) if (img.loading === 'lazy') img.loading = 'eager';
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const undecoded = images.filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.getAttribute('src') || '(no src)');
  const svgImages = Array.from(document.querySelectorAll('svg image'));
  for (const image of svgImages) {
    const source = image.getAttribute('href') || image.getAttribute('xlink:href') || '';
    const probe = new Image();
    probe.src = new URL(source, document.baseURI).href;
    try { await probe.decode(); } catch (e) { undecoded.push(source || '(no href)'); }
  }
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => {
    const raw = a.getAttribute('href');
    let url = '';
    try { url = new URL(raw, document.baseURI).href; } catch (e) { url = ''; }
    return [raw, url];
  });
  const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id)
    .concat(Array.from(document.querySelectorAll('a[name]')).map(e => e.getAttribute('name')));
  await new Promise(done => requestAnimationFrame(() => setTimeout(done, 0)));
  const timing = performance.getEntriesByType('navigation')[0];
  return {
    undecoded, links, ids, images: images.length + svgImages.length,
    text: document.body ? document.body.innerText.trim().length : 0,
    renderMs: timing ? (timing.loadEventEnd || timing.loadEventStart) : -1,
  };
})()"""


def _file_path(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def _png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise BrowserError("the screenshot is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def folder_size(folder: Path) -> tuple[int, int]:
    """Bytes and files under ``folder``, recursively."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


class _PageSession:
    """One tab, attached with a flat session, with Runtime, Log, Network and Page enabled."""

    def __init__(self, browser: Chromium) -> None:
        self.browser = browser
        self.target: str = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = browser.call("Target.attachToTarget", {"targetId": self.target, "flatten": True})
        self.session: str = attached["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 0) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def close(self) -> None:
        """Close the tab (nothing to do when the browser is gone: its own exit says why)."""
        with contextlib.suppress(BrowserError, OSError):
            self.browser.call("Target.closeTarget", {"targetId": self.target})
        self.browser.events.clear()

    def load(self, url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Navigate, wait for the load event and run PAGE_SCRIPT; returns its result and this page's events."""
        self.browser.events.clear()
        navigation = self.call("Page.navigate", {"url": url})
        if navigation.get("errorText"):
            raise BrowserError(f"{url}: {navigation['errorText']}")
        self.browser.wait_for("Page.loadEventFired", self.session)
        found = self.call("Runtime.evaluate", {"expression": PAGE_SCRIPT, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in found:
            raise BrowserError(f"{url}: the page check failed: {found['exceptionDetails'].get('text')}")
        self._settle_requests()
        events = [e for e in self.browser.events if e.get("sessionId") == self.session]
        return found["result"]["value"], events

    def _settle_requests(self) -> None:
        """Wait until every request the page made has finished or failed (bounded by the call timeout)."""
        deadline = time.monotonic() + self.browser.timeout
        seen = 0
        pending: set[str] = set()
        while True:
            for event in self.browser.events[seen:]:
                method, request = event["method"], event.get("params", {}).get("requestId", "")
                if event.get("sessionId") != self.session:
                    continue
                if method == "Network.requestWillBeSent":
                    pending.add(request)
                elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                    pending.discard(request)
            seen = len(self.browser.events)
            if not pending:
                return
            message = self.browser.receive(deadline)
            if message is None:
                raise BrowserError(f"{len(pending)} request(s) never finished")
            if "method" in message:
                self.browser.events.append(message)

    def screenshot(self) -> bytes:
        """The whole page, WIDTH CSS pixels wide, as PNG bytes."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = max(1, int(size["height"] + 0.999))
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True, "fromSurface": True},
            timeout=max(CALL_TIMEOUT, 2 * CALL_TIMEOUT * height / 20000),
        )
        return base64.b64decode(shot["data"])


def _console_text(params: dict[str, Any]) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg.get("value", arg.get("description", arg.get("type", "")))))
    return " ".join(parts)


def _record_events(report: PageReport, name: str, events: list[dict[str, Any]]) -> None:
    """Console errors, exceptions, failed and external requests from one page's events."""
    urls: dict[str, str] = {}
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(f"{name}: console.{params['type']}: {_console_text(params)}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            report.console_errors.append(f"{name}: uncaught exception: {text.splitlines()[0] if text else '?'}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            report.console_errors.append(f"{name}: {entry.get('source', 'log')}: {entry.get('text', '')}{where}")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            urls[params.get("requestId", "")] = url
            if urlsplit(url).scheme not in ("file", "data", "blob", "about"):
                report.external_requests.append(f"{name}: {url}")
        elif method == "Network.loadingFailed":
            url = urls.get(params.get("requestId", ""), "?")
            report.failed_requests.append(f"{name}: {url}: {params.get('errorText', '')}")
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if urlsplit(response.get("url", "")).scheme != "file" and response.get("status", 0) >= 400:
                report.failed_requests.append(f"{name}: {response.get('url')}: HTTP {response.get('status')}")


def check_page(html_path: Path, screenshot: Path, browser: Chromium | str | None = None) -> PageReport:
    """Load ``html_path`` headless and every local HTML page reachable from it by links (each once), check them,
    save a full-page PNG screenshot of the first to ``screenshot``; see PageReport. ``browser``: a running
    Chromium (a fresh tab of it is used, then closed), or the binary to start (default: ``find_chromium()``)."""
    with contextlib.ExitStack() as stack:
        if not isinstance(browser, Chromium):
            binary = browser or find_chromium()
            if binary is None:
                raise BrowserError(
                    "no Chromium found (chromium, chromium-browser, google-chrome or $PYENGINE_CHROMIUM)"
                )
            browser = stack.enter_context(Chromium(binary))
        tab = _PageSession(browser)
        stack.callback(tab.close)
        return _crawl(tab, html_path, screenshot)


def _crawl(tab: _PageSession, html_path: Path, screenshot: Path) -> PageReport:
    first = html_path.resolve()
    root = first.parent
    report = PageReport(page=first)
    report.folder_bytes, report.folder_files = folder_size(root)
    ids: dict[Path, set[str]] = {}
    fragment_links: list[tuple[str, Path, str]] = []  # (where, page, fragment) checked once every page is loaded
    queue = [first]
    while queue:
        page = queue.pop(0)
        if page in ids:
            continue
        if len(ids) >= MAX_PAGES:
            report.broken_links.append(f"more than {MAX_PAGES} local pages: {page} and others not checked")
            break
        name = page.relative_to(root).as_posix() if page.is_relative_to(root) else str(page)
        found, events = tab.load(page.as_uri())
        report.pages.append(page)
        _record_events(report, name, events)
        ids[page] = set(found["ids"])
        report.undecoded_images.extend(f"{name}: {source}" for source in found["undecoded"])
        report.images += found["images"]
        report.render_ms_all += found["renderMs"]
        if page == first:
            report.render_ms, report.text_length = found["renderMs"], found["text"]
            data = tab.screenshot()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(data)
            report.screenshot, report.screenshot_size = screenshot, _png_size(data)
        for raw, url in found["links"]:
            report.links += 1
            where = f"{name}: href={raw!r}"
            target = _file_path(url)
            if target is None:
                report.external_links.append(where)
                continue
            fragment = unquote(urlsplit(url).fragment)
            if not target.exists():
                report.broken_links.append(f"{where}: no such file")
            elif not target.resolve().is_relative_to(root):
                report.broken_links.append(f"{where}: outside the report folder {root}")
            elif target.suffix.lower() in (".html", ".htm"):
                queue.append(target.resolve())
                if fragment:
                    fragment_links.append((where, target.resolve(), fragment))
            elif fragment:
                report.broken_links.append(f"{where}: a fragment on a file that is not HTML")
    for where, page, fragment in fragment_links:
        if page in ids and fragment not in ids[page] and fragment.lower() != "top":  # '#top': the top, by the spec
            report.broken_links.append(f"{where}: no element with id {fragment!r}")
    return report
