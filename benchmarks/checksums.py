"""The cost of fletcher32 checksums on capture: the same capture with and without, in one run.

Captures --rows (default 4,000) shapes images through DemoCNN at 32x32 (random weights) into
a fresh store, three layers (features.relu1, features.relu2, classifier.relu4; float16, lzf),
with every dataset checksummed (the default) and with ``pyengine.store.CHECKSUMS = False``.
Runs alternate; the best of --repeats is kept for each. Prints the time ratio.

    python -P benchmarks/checksums.py [--rows 4000] [--repeats 3] [--compression lzf]
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
import pyengine.store
from pyengine.data import Shapes
from pyengine.models import DemoCNN

LAYERS = ["features.relu1", "features.relu2", "classifier.relu4"]


def capture_once(model: torch.nn.Module, data: Shapes, path: Path, compression: str, checksums: bool) -> float:
    pyengine.store.CHECKSUMS = checksums
    try:
        start = time.perf_counter()
        pyengine.capture(model, data, LAYERS, path, batch_size=256, compression=compression, progress=False)
        seconds = time.perf_counter() - start
    finally:
        pyengine.store.CHECKSUMS = True
    with h5py.File(path, "r") as file:
        if file[f"activations/{LAYERS[0]}"].fletcher32 != checksums:
            raise RuntimeError("the CHECKSUMS switch did not take effect")
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="lzf", choices=["lzf", "gzip", "none"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DemoCNN(image_size=32).eval()
    data = Shapes(args.rows, seed=0, size=32)
    data.batch(range(min(args.rows, 256)))  # warm-up: imports, allocator
    best = {True: float("inf"), False: float("inf")}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for checksums in (False, True) if repeat % 2 == 0 else (True, False):
                seconds = capture_once(model, data, Path(folder) / "bench.h5", args.compression, checksums)
                best[checksums] = min(best[checksums], seconds)
    print(f"capture of {args.rows} shapes images, {len(LAYERS)} layers, {args.compression}, {platform.machine()}")
    print(f"  without checksums: {best[False]:.3f} s   with fletcher32: {best[True]:.3f} s")
    print(f"  ratio (with / without): {best[True] / best[False]:.3f}")


if __name__ == "__main__":
    main()
