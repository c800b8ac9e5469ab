"""The cost of fletcher32 checksums on capture: the same capture with and without, in one run.

Captures --rows (default 4,000) shapes images through DemoCNN at 32x32 (random weights) into
a fresh store, three layers (features.relu1, features.relu2, classifier.relu4; float16, lzf),
with every dataset checksummed (the default) and with ``pyengine.store._h5.CHECKSUMS = False``.
Runs alternate; the best of --repeats is kept for each, as wall time and as this process's
CPU time (steadier on a shared machine). Prints both ratios.

    python -P benchmarks/checksums.py [--rows 4000] [--repeats 5] [--compression lzf]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import h5py
import torch

import pyengine
import pyengine.store._h5
from pyengine.data import Shapes
from pyengine.models import DemoCNN

LAYERS = ["features.relu1", "features.relu2", "classifier.relu4"]


def capture_once(
    model: torch.nn.Module, data: Shapes, path: Path, compression: str, checksums: bool
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one capture into a fresh ``path``."""
    pyengine.store._h5.CHECKSUMS = checksums
    try:
        start, cpu = time.perf_counter(), time.process_time()
        pyengine.capture(model, data, LAYERS, path, batch_size=256, compression=compression, progress=False)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    finally:
        pyengine.store._h5.CHECKSUMS = True
    with h5py.File(path, "r") as file:
        if file[f"activations/{LAYERS[0]}"].fletcher32 != checksums:
            raise RuntimeError("the CHECKSUMS switch did not take effect")
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compression", default="lzf", choices=["lzf", "gzip", "none"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DemoCNN(image_size=32).eval()
    data = Shapes(args.rows, seed=0, size=32)
    wall = {True: float("inf"), False: float("inf")}
    cpu = dict(wall)
    with tempfile.TemporaryDirectory() as folder:
        capture_once(model, data, Path(folder) / "bench.h5", args.compression, True)  # warm-up, not counted
        for repeat in range(args.repeats):
            for checksums in (False, True) if repeat % 2 == 0 else (True, False):
                seconds = capture_once(model, data, Path(folder) / "bench.h5", args.compression, checksums)
                wall[checksums] = min(wall[checksums], seconds[0])
                cpu[checksums] = min(cpu[checksums], seconds[1])
    print(f"capture of {args.rows} shapes images, {len(LAYERS)} layers, {args.compression}, {platform.machine()}")
    print(f"  wall: without checksums {wall[False]:.3f} s, with fletcher32 {wall[True]:.3f} s")
    print(f"  cpu:  without checksums {cpu[False]:.3f} s, with fletcher32 {cpu[True]:.3f} s")
    print(f"  ratio (with / without): wall {wall[True] / wall[False]:.3f}, cpu {cpu[True] / cpu[False]:.3f}")


if __name__ == "__main__":
    main()
