"""Run a build command and show its progress: ninja's ``[k/N]`` steps as a bar with the elapsed time
and an ETA; the full output is kept and printed only if the command fails.

    python -P scripts/build_progress.py "native build" -- pip install -v --no-build-isolation .

Exits with the command's status. Standalone (the package is not importable before it is built).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import deque

STEP = re.compile(rb"\[(\d+)/(\d+)\]")
TAIL_LINES = 60  # printed when the command fails


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: build_progress.py LABEL -- COMMAND ...", file=sys.stderr)
        return 2
    label, command = argv[0], argv[2:]
    start = time.perf_counter()
    tail: deque[bytes] = deque(maxlen=TAIL_LINES)
    live = sys.stderr.isatty()
    last_shown = -1.0
    done = total = 0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if process.stdout is None:
        return 1
    for line in process.stdout:
        tail.append(line)
        match = STEP.search(line)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
        elapsed = time.perf_counter() - start
        if elapsed - last_shown < (0.5 if live else 10.0):
            continue
        last_shown = elapsed
        if total:
            eta = elapsed / max(done, 1) * (total - done)
            text = (
                f"{label}: step {done}/{total} ({done / total:.0%}), {duration(elapsed)} elapsed, ETA {duration(eta)}"
            )
        else:
            text = f"{label}: preparing ({duration(elapsed)} elapsed)"
        print(f"\r{text:<90}" if live else text, end="" if live else "\n", file=sys.stderr, flush=True)
    status = process.wait()
    elapsed = time.perf_counter() - start
    if live:
        print(file=sys.stderr)
    if status != 0:
        sys.stderr.write(b"".join(tail).decode(errors="replace"))
        print(
            f"{label}: FAILED (exit {status}) after {duration(elapsed)}; the last {len(tail)} lines above",
            file=sys.stderr,
        )
    else:
        print(f"{label}: done in {duration(elapsed)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
