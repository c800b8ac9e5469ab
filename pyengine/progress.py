"""Progress bars for steps longer than a second: ``tqdm`` (``tqdm.auto`` in notebooks) when it is
installed, else a small stderr bar of our own; both show the rate and the time left."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

# Ctrl-C: Python raises KeyboardInterrupt wherever the main thread is, and one raised inside a
# finalizer (a ``__del__`` of some library's object) is printed and dropped, so a long technique
# would run on. With ``interrupt_at_ticks()`` (the CLI), the signal also sets this flag and the
# next tick of any bar (drawn or not: every long loop ticks one) raises it again.
INTERRUPTED = threading.Event()


def interrupt_at_ticks() -> Any:
    """Make SIGINT raise KeyboardInterrupt as usual and, if that is swallowed, at the next tick;
    returns the handler it replaced (None off the main thread, where nothing changes)."""

    def handler(signum: int, frame: Any) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def rate_text(count: int, elapsed: float) -> str:
    """``12.5/s``, or ``4.0 s/it`` when one step takes over a second (never ``0.0/s``)."""
    if count <= 0 or elapsed <= 0:
        return "-/s"
    rate = count / elapsed
    return f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s/it"


def duration_text(seconds: float) -> str:
    """``0:07``, ``12:03``, ``1:02:03``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(count: int, total: int | None, elapsed: float) -> str:
    """``ETA 0:15`` at the rate so far; empty when there is no total or no rate yet."""
    if not total or count <= 0 or elapsed <= 0 or count >= total:
        return ""
    return f"ETA {duration_text((total - count) * elapsed / count)}"


def _tqdm_class() -> Any:
    """``tqdm.auto.tqdm`` (a notebook widget in Jupyter, a terminal bar elsewhere), or None."""
    try:
        return getattr(importlib.import_module("tqdm.auto"), "tqdm", None)
    except ImportError:
        return None


class Progress:
    """``with Progress(total, "capture") as bar: bar.update(n)``; silent when disabled."""

    def __init__(
        self, total: int | None, desc: str, *, enabled: bool = True, stream: TextIO | None = None, delay: float = 1.0
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.count = 0
        self._start = time.perf_counter()
        self._last = 0.0
        self._shown = False
        self._live = bool(getattr(self.stream, "isatty", lambda: False)())
        tqdm = _tqdm_class() if enabled and stream is None else None
        self._tqdm = tqdm(total=total, desc=desc, delay=delay, file=self.stream, leave=True) if tqdm else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            return
        if self._shown:
            self._draw(final=exc_type is None)
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1) -> None:
        if INTERRUPTED.is_set():
            INTERRUPTED.clear()
            raise KeyboardInterrupt
        self.count += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.perf_counter()
        if not (self.enabled and now - self._start >= self.delay):
            return
        self._shown = True  # the final line is printed on exit
        if self._live and now - self._last >= 0.2:  # redraw in place only on a terminal
            self._last = now
            self._draw()

    def _draw(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        if self.total:
            filled = int(30 * min(self.count, self.total) / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{self.desc} [{bar}] {self.count}/{self.total}"
        else:
            text = f"{self.desc} {self.count}"
        if final:
            suffix = f"done in {duration_text(elapsed)} ({rate_text(self.count, elapsed)})"
        else:
            suffix = " ".join(
                part for part in (rate_text(self.count, elapsed), eta_text(self.count, self.total, elapsed)) if part
            )
            suffix = f"{duration_text(elapsed)} {suffix}"
        self.stream.write(f"\r{text} {suffix}  " if self._live else f"{text} {suffix}")
        self.stream.flush()
