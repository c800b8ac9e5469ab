"""Streaming top-k over an activation store vs loading everything and calling torch.topk.

A store of --rows (default 20,000) shapes images' conv activations (DemoCNN at 32x32, random
weights, features.relu2: 16 channels x 16 x 16, float16). Per channel, the top-k inputs by
their maximum over positions. Alternating runs in one process (best of 3) for time; peak
memory in a fresh process per method (CPU: resident set sampled every ms; CUDA: torch's peak
allocation on the GPU, where --device cuda moves each block, or everything, before the top-k).

    python -P benchmarks/topk.py [--rows 20000] [--k 9] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyengine
from pyengine import ops
from pyengine.data import Shapes
from pyengine.models import DemoCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import ResidentPeak, resident_bytes  # noqa: E402

LAYER = "features.relu2"


def make_store(path: Path, rows: int) -> None:
    torch.manual_seed(0)
    model = DemoCNN(image_size=32).eval()
    pyengine.capture(model, Shapes(rows, seed=0, size=32), [LAYER], path, batch_size=500, progress=False)


def streaming(path: Path, k: int, device: torch.device) -> torch.Tensor:
    with pyengine.StoreReader(path) as store:
        top = None
        first = 0
        for block in store.iter_layer(LAYER, dtype=torch.float16):  # HDF5 chunk by chunk (~1 MiB)
            values = block.to(device).flatten(2).amax(-1)
            top = top or ops.topk_empty(values.shape[1], k, device)
            ops.topk_update(values, torch.arange(first, first + len(values), device=device), None, *top)
            first += len(values)
    return top[1]


def load_all(path: Path, k: int, device: torch.device) -> torch.Tensor:
    with pyengine.StoreReader(path) as store:
        everything = torch.cat(list(store.iter_layer(LAYER, dtype=torch.float16))).to(device)
    return everything.flatten(2).amax(-1).topk(k, dim=0).indices.t()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


METHODS = {"streaming": streaming, "load-all": load_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store")
    parser.add_argument("--child")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        if device.type == "cuda":
            torch.empty(1, device=device)  # the CUDA context, off the measurement
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            METHODS[args.child](Path(args.store), args.k, device)
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            base = resident_bytes()
            with ResidentPeak() as sampler:
                METHODS[args.child](Path(args.store), args.k, device)
            peak = sampler.peak - base
        print(json.dumps({"peak_mib": peak / 2**20}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.h5"
        started = time.perf_counter()
        make_store(path, args.rows)
        with pyengine.StoreReader(path) as store:
            shape = store.shape(LAYER)
        size = path.stat().st_size / 2**20
        print(
            f"store: {shape[0]} images x {shape[1:]} float16 ({size:.0f} MiB on disk, lzf), built in "
            f"{time.perf_counter() - started:.0f} s"
        )
        best = {name: float("inf") for name in METHODS}
        found = {}
        for _ in range(3):
            for name, method in METHODS.items():
                synchronize(device)
                started = time.perf_counter()
                found[name] = method(path, args.k, device)
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - started)
        memory = {}
        for name in METHODS:
            out = subprocess.run(
                [
                    sys.executable,
                    "-P",
                    __file__,
                    "--child",
                    name,
                    "--store",
                    str(path),
                    "--k",
                    str(args.k),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    same = float((found["streaming"].cpu() == found["load-all"].cpu()).double().mean())
    where, peak = ("", "peak") if device.type == "cpu" else (f" on {device}", "GPU peak")
    print(
        f"top-{args.k} per channel{where}: load everything + torch.topk {best['load-all']:.2f} s, "
        f"{peak} +{memory['load-all']:.0f} MiB; "
        f"streaming topk_update {best['streaming']:.2f} s, {peak} +{memory['streaming']:.0f} MiB: time ratio "
        f"{best['streaming'] / best['load-all']:.3f}, memory ratio {memory['streaming'] / memory['load-all']:.3f}; "
        f"same indices for {same:.1%} (torch.topk orders ties arbitrarily)"
    )


if __name__ == "__main__":
    main()
