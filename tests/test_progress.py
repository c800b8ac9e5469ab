"""Progress bars: rates never read 0.0/s, the time left follows the rate, tqdm is used when installed."""

from __future__ import annotations

import io
import sys
import types
from typing import Any

import pytest

from pyengine import progress
from pyengine.progress import Progress, duration_text, eta_text, rate_text


def test_rates_durations_and_time_left() -> None:
    assert rate_text(50, 4.0) == "12.5/s"
    assert rate_text(3, 12.0) == "4.0 s/it"  # a slow step: seconds per step, not 0.2/s or 0.0/s
    assert rate_text(0, 3.0) == "-/s"
    assert duration_text(7.4) == "0:07" and duration_text(723) == "12:03" and duration_text(3723) == "1:02:03"
    assert eta_text(10, 40, 5.0) == "ETA 0:15"  # 2 per second, 30 to go
    assert eta_text(1, 4, 100.0) == "ETA 5:00"
    assert eta_text(0, 40, 5.0) == "" and eta_text(10, None, 5.0) == "" and eta_text(40, 40, 5.0) == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_fallback_bar_shows_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 102.0, 102.0, 110.0])  # start, update, its draw, the final draw
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    stream = Terminal()
    with Progress(40, "capture", stream=stream) as bar:
        bar.update(10)
    text = stream.getvalue()
    assert "capture [#######-----------------------] 10/40 0:02 5.0/s ETA 0:06" in text  # 30 to go at 5/s
    assert text.rstrip().endswith("done in 0:10 (1.0/s)")  # the final line: 10 steps in 10 s


class FakeTqdm:
    made: list[FakeTqdm] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.updates, self.closed = kwargs, [], False
        FakeTqdm.made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


def test_tqdm_draws_when_installed_and_not_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("tqdm")
    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeTqdm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", package)
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    FakeTqdm.made.clear()
    with Progress(8, "gram-spectrum") as bar:
        bar.update(3)
        bar.update(5)
    (made,) = FakeTqdm.made
    assert made.kwargs["total"] == 8 and made.kwargs["desc"] == "gram-spectrum"
    assert made.updates == [3, 5] and made.closed
    with Progress(8, "quiet", enabled=False) as bar:  # e.g. ranks other than 0
        bar.update(8)
    assert len(FakeTqdm.made) == 1


def test_the_demo_time_table_lists_steps_longest_first_with_the_total() -> None:
    from pyengine.demo import time_table

    table = time_table([("capture", 3.0), ("gram-spectrum", 1.0), ("report", 6.0)]).splitlines()
    assert table[0] == "time per step:"
    assert [line.split()[0] for line in table[1:]] == ["report", "capture", "gram-spectrum", "total"]
    assert table[1].endswith("6.0 s   60%") and table[-1].endswith("10.0 s")


def test_an_interrupt_swallowed_by_a_finalizer_resurfaces_at_the_next_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C that lands in a ``__del__`` is dropped by Python; the CLI's handler also sets a flag
    that the next tick of any bar (drawn or not) raises."""
    import signal

    from pyengine.progress import INTERRUPTED, interrupt_at_ticks

    class Swallows:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the KeyboardInterrupt raised here is ignored

    dropped: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    previous = interrupt_at_ticks()
    try:
        Swallows()  # freed at once: the interrupt is lost inside __del__
        assert dropped == [KeyboardInterrupt]
        bar = Progress(10, "loop", enabled=False)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(10):
                bar.update()
        assert bar.count == 0 and not INTERRUPTED.is_set()
        bar.update()  # raised once per signal
        assert bar.count == 1
    finally:
        INTERRUPTED.clear()
        signal.signal(signal.SIGINT, previous)
