"""Scale-out: capture, then gram-spectrum and max-patches over the store, with 1 and 2 processes.

The demo's model (DemoCNN, 64x64) and data (shapes), --rows inputs (default 20,000), one thread
per process; the 1-process and the 2-process runs (``torchrun --nproc-per-node 2``, gloo) run
side by side in one invocation, each in a fresh folder. Each phase is timed by rank 0 between
barriers, so it is the slowest rank's time. Prints per phase the seconds, the speed-up and the
parallel efficiency (speed-up / processes), and where the 2-process run spends time that one
process does not (joining the parts, merging top-k lists, serial work every rank repeats).

    python -P benchmarks/scale.py [--rows 20000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import pyengine
from pyengine import distributed
from pyengine.data import Shapes
from pyengine.models import DemoCNN

LAYERS = ["features.relu3", "classifier.relu4"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def worker(rows: int, batch_size: int, folder: Path) -> None:
    """One process of a run: the three phases, timed; rank 0 prints them as JSON."""
    ranks = distributed.init_from_env()
    torch.manual_seed(0)
    model = DemoCNN().eval()
    data = Shapes(rows, seed=0)
    store = folder / "acts.h5"
    timings: dict[str, float] = {}

    def timed(name: str, work: object) -> None:
        _barrier()
        start = time.perf_counter()
        work()  # type: ignore[operator]
        _barrier()
        timings[name] = time.perf_counter() - start

    timed("capture", lambda: pyengine.capture(model, data, LAYERS, store, batch_size=batch_size, progress=False))
    timed(
        "gram-spectrum",
        lambda: pyengine.run("gram-spectrum", model, store=store, batch_size=batch_size, progress=False),
    )
    timed(
        "max-patches",
        lambda: pyengine.run(
            "max-patches", model, data=data, store=store, layers=[LAYERS[0]], k=9, batch_size=batch_size, progress=False
        ),
    )
    if ranks.is_main:
        print(json.dumps(timings))
    distributed.close()


def launch(processes: int, rows: int, batch_size: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        script = [
            str(Path(__file__).resolve()),
            "--worker",
            folder,
            "--rows",
            str(rows),
            "--batch-size",
            str(batch_size),
        ]
        if processes == 1:
            command = [sys.executable, "-P", *script]
        else:
            command = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc-per-node", str(processes), *script]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rows, args.batch_size, Path(args.worker))
        return
    print(f"# scale-out: {args.rows} demo inputs (DemoCNN 64x64), layers {', '.join(LAYERS)}, one thread per process")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    one = launch(1, args.rows, args.batch_size)
    two = launch(2, args.rows, args.batch_size)
    print("| phase | 1 process (s) | 2 processes (s) | speed-up | parallel efficiency |")
    print("| --- | --- | --- | --- | --- |")
    for phase in [*one, "total"]:
        a = sum(one.values()) if phase == "total" else one[phase]
        b = sum(two.values()) if phase == "total" else two[phase]
        print(f"| {phase} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {a / b / 2:.0%} |")


if __name__ == "__main__":
    main()
