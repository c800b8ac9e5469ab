"""A small stderr progress bar that only appears for steps longer than a second."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


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

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._shown:
            self._draw(final=exc_type is None)
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if not (self.enabled and now - self._start >= self.delay):
            return
        self._shown = True  # the final line is printed on exit
        if self._live and now - self._last >= 0.2:  # redraw in place only on a terminal
            self._last = now
            self._draw()

    def _draw(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            filled = int(30 * min(self.count, self.total) / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{self.desc} [{bar}] {self.count}/{self.total}"
        else:
            text = f"{self.desc} {self.count}"
        suffix = "done" if final else f"{rate:.1f}/s"
        self.stream.write(f"\r{text} {elapsed:.1f}s {suffix}  " if self._live else f"{text} {elapsed:.1f}s {suffix}")
        self.stream.flush()
