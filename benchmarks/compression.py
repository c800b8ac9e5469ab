"""Capture speed and file size per compression: gzip (with shuffle; every libhdf5 has it), lzf
(h5py's own filter: a plain libhdf5 without the plugin cannot read it) and none, in one run.

Captures --rows (default 4,000) shapes images through DemoCNN at 32x32 (random weights, float16,
three layers, fletcher32 checksums as always) into a fresh store; runs rotate through the
compressions and the best of --repeats is kept, as wall time and as this process's CPU time.

    python -P benchmarks/compression.py [--rows 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import pyengine
from pyengine.data import Shapes
from pyengine.models import DemoCNN

LAYERS = ["features.relu1", "features.relu2", "classifier.relu4"]
COMPRESSIONS = ("gzip", "lzf", "none")


def capture_once(model: torch.nn.Module, data: Shapes, path: Path, compression: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, bytes on disk) of one capture into a fresh ``path``."""
    start, cpu = time.perf_counter(), time.process_time()
    pyengine.capture(model, data, LAYERS, path, batch_size=256, compression=compression, progress=False)
    wall, used = time.perf_counter() - start, time.process_time() - cpu
    size = path.stat().st_size
    path.unlink()
    return wall, used, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DemoCNN(image_size=32).eval()
    data = Shapes(args.rows, seed=0, size=32)
    best = {name: (float("inf"), float("inf"), 0) for name in COMPRESSIONS}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.h5"
        capture_once(model, data, path, "none")  # warm-up, not counted
        for repeat in range(args.repeats):
            order = COMPRESSIONS[repeat % 3 :] + COMPRESSIONS[: repeat % 3]
            for name in order:
                wall, cpu, size = capture_once(model, data, path, name)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu), size)
    print(f"capture of {args.rows} shapes images, {len(LAYERS)} layers, float16, {platform.machine()}")
    base_wall, base_cpu, base_size = best["none"]
    for name in COMPRESSIONS:
        wall, cpu, size = best[name]
        print(
            f"  {name:5} wall {wall:.3f} s ({wall / base_wall:.2f}x none), cpu {cpu:.3f} s ({cpu / base_cpu:.2f}x), "
            f"{size / 2**20:.1f} MiB ({size / base_size:.2f}x none)"
        )


if __name__ == "__main__":
    main()
