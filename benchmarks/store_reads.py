"""Random-row reads from a store: HDF5's default chunk cache against the reader's sized one.

Writes a capture-like store (``ActivationWriter``, as a capture does: --rows rows of one layer
of --row-kib KiB float16 rows of half zeros, ~1 MiB chunks, gzip level 1 with shuffle and
fletcher32), then reads --reads random rows (seeded) with ``StoreReader.take`` two ways: one
row per call, and batches of 64 rows per call (as a loader of shuffled rows reads). Each is
timed with ``chunk_cache=0`` (HDF5's default cache: 8 MiB per dataset from HDF5 2.0, 1 MiB
before) and with the default ``CHUNK_CACHE_BYTES``, on fresh readers; runs alternate and the
best of --repeats is kept. Prints the times and the ratio default / sized.

    python -P benchmarks/store_reads.py [--rows 20000] [--row-kib 4] [--reads 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pyengine.store import ActivationWriter, StoreReader
from pyengine.store.reader import CHUNK_CACHE_BYTES

LAYER = "layer"


def make_store(path: Path, rows: int, row_kib: int) -> None:
    shape = (row_kib * 512 // 16, 4, 4)  # float16: 512 values a KiB
    writer = ActivationWriter.create(
        path,
        meta={"model_class": "benchmark", "model_param_hash": "-", "dataset_name": "random", "dataset_size": rows},
        config={"benchmark": "store_reads"},
        layers={LAYER: shape},
        dtype="float16",
        compression="gzip",
        concepts={},
    )
    rng = np.random.default_rng(0)
    for first in range(0, rows, 2000):
        count = min(2000, rows - first)
        values = torch.from_numpy(np.maximum(rng.standard_normal((count, *shape), dtype=np.float32), 0))
        index = torch.arange(first, first + count)
        writer.append(index, torch.full((count,), -1), {}, {LAYER: values})
    writer.finish()


def read_once(path: Path, rows: np.ndarray, batch: int, cache: int) -> tuple[float, torch.Tensor]:
    with StoreReader(path, chunk_cache=cache) as reader:
        start = time.perf_counter()
        parts = [reader.take(LAYER, part) for part in np.array_split(rows, max(1, len(rows) // batch))]
        return time.perf_counter() - start, torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--row-kib", type=int, default=4)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.h5"
        make_store(path, args.rows, args.row_kib)
        with h5py.File(path, "r") as file:
            dataset = file[f"activations/{LAYER}"]
            chunk_mib = np.prod(dataset.chunks) * dataset.dtype.itemsize / 2**20
            default_cache = dataset.id.get_access_plist().get_chunk_cache()[1] / 2**20
            print(
                f"store: {args.rows} rows x {args.row_kib} KiB = {args.rows * args.row_kib / 1024:.0f} MiB raw, "
                f"{path.stat().st_size / 2**20:.0f} MiB on disk, {dataset.id.get_num_chunks()} chunks of "
                f"{dataset.chunks[0]} rows ({chunk_mib:.2f} MiB)"
            )
        machine = platform.processor() or platform.machine()
        print(f"HDF5 {h5py.version.hdf5_version}, h5py {h5py.version.version}, {machine}")
        rows = np.random.default_rng(1).choice(args.rows, args.reads, replace=False)
        caches = {
            f"HDF5 default ({default_cache:.0f} MiB)": 0,
            f"sized ({CHUNK_CACHE_BYTES >> 20} MiB)": CHUNK_CACHE_BYTES,
        }
        for batch in (1, 64):
            best = dict.fromkeys(caches, float("inf"))
            results = {}
            for _ in range(args.repeats):
                for name, cache in caches.items():
                    seconds, results[name] = read_once(path, rows, batch, cache)
                    best[name] = min(best[name], seconds)
            first, second = results.values()
            if not torch.equal(first, second):
                raise RuntimeError("the two caches read different values")
            default, sized = best.values()
            print(
                f"{args.reads} random rows, {batch} per call: "
                + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in best.items())
                + f"; default / sized = {default / sized:.1f}x"
            )


if __name__ == "__main__":
    main()
