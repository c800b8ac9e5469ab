"""Adding a run to a results file that holds many: copy-write-rename against run files.

Builds two results files of --runs (default 49) runs of --run-mb (default 10) MB each (float32
noise): the old layout, every run inline in one file (written in one session), and the current
one (``write_results`` per run: a small file, an index and a file per run). Then adds one more
run of the same size to each, alternately, --repeats times: to the old file the way
``write_results`` did before (copy the file to ``.partial``, add the run, rename), to the new one
with ``write_results`` (which also fsyncs the files it writes; the old way did not). Prints the
best time of each and the ratio.

    python -P benchmarks/results_append.py [--runs 49] [--run-mb 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pyengine.store import LIBVER, PendingResult, write_results
from pyengine.store._h5 import write_meta


def run_values(mb: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(mb * 250_000, dtype=np.float32))


def copy_write_rename(path: Path, pending: PendingResult) -> None:
    """What ``write_results`` did before run files: cost proportional to the whole file."""
    staging = path.with_name(path.name + ".partial")
    shutil.copyfile(path, staging)
    with h5py.File(staging, "a", libver=LIBVER) as file:
        group = file.create_group(f"results/{pending.technique}/{pending.run}")
        for name, value in pending.arrays.items():
            group.create_dataset(name, data=value.numpy(), fletcher32=True)
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=49)
    parser.add_argument("--run-mb", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        old, new = Path(folder) / "old.h5", Path(folder) / "new.h5"
        with h5py.File(old, "w", libver=LIBVER) as file:
            write_meta(file, {}, {})
            for k in range(args.runs):
                values = run_values(args.run_mb, k).numpy()
                file.create_dataset(f"results/demo/run-{k + 1:03d}/values", data=values, fletcher32=True)
        for k in range(args.runs):
            write_results(
                new, [PendingResult("demo", f"run-{k + 1:03d}", {"values": run_values(args.run_mb, k)}, {})], meta={}
            )
        total = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        print(f"{args.runs} runs of {args.run_mb} MB in each layout ({total / 1e6:.0f} MB on disk in all)")
        best = {"copy-write-rename": float("inf"), "write_results": float("inf")}
        for repeat in range(args.repeats):
            pending = PendingResult(
                "demo", f"run-{args.runs + 1 + repeat:03d}", {"values": run_values(args.run_mb, 99)}, {}
            )
            start = time.perf_counter()
            copy_write_rename(old, pending)
            best["copy-write-rename"] = min(best["copy-write-rename"], time.perf_counter() - start)
            start = time.perf_counter()
            write_results(new, [pending], meta={})
            best["write_results"] = min(best["write_results"], time.perf_counter() - start)
        before, after = best.values()
        print(
            f"adding run #{args.runs + 1}: copy-write-rename {before:.3f} s, write_results {after:.3f} s; "
            f"before / after = {before / after:.1f}x"
        )


if __name__ == "__main__":
    main()
