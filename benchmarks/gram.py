"""Streaming Gram accumulation: pyengine.ops.gram_accumulate vs torch, measured in one run.

Accumulates ROWS x D float32 rows in chunks into a float64 Gram matrix, two ways:
  anchor:   g += x.double().T @ x.double()        (per chunk, torch/BLAS)
  pyengine: pyengine.ops.gram_accumulate(g, x)    (per chunk, fused convert + symmetric)
Runs alternate; the best of REPEATS is kept for each. Prints the time ratio.

    python benchmarks/gram.py [--rows 1000000] [--dim 512] [--chunk 10000] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pyengine import ops


def timed(device: torch.device, work) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=10, help="distinct chunks cycled through (memory bound)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(args.chunk, args.dim, generator=generator).to(device) for _ in range(args.distinct)]
    steps = args.rows // args.chunk

    def anchor() -> torch.Tensor:
        g = torch.zeros(args.dim, args.dim, dtype=torch.float64, device=device)
        for step in range(steps):
            x = chunks[step % args.distinct].double()
            g += x.T @ x
        return g

    def ours() -> torch.Tensor:
        g = torch.zeros(args.dim, args.dim, dtype=torch.float64, device=device)
        for step in range(steps):
            ops.gram_accumulate(g, chunks[step % args.distinct])
        return g

    reference, result = anchor(), ours()  # warm-up and agreement check
    error = float((result - reference).abs().max() / reference.abs().max())
    times: dict[str, list[float]] = {"torch": [], "pyengine": []}
    for _ in range(args.repeats):
        times["torch"].append(timed(device, anchor))
        times["pyengine"].append(timed(device, ours))
    best = {name: min(values) for name, values in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"gram_accumulate: {steps * args.chunk:,} x {args.dim} float32 rows in chunks of {args.chunk:,} "
        f"on {device} ({name}, {torch.get_num_threads()} threads)"
    )
    for method, seconds in best.items():
        rate = steps * args.chunk / seconds
        print(
            f"  {method:9s} best {seconds:8.3f} s   {rate / 1e6:7.2f} M rows/s   runs: "
            + ", ".join(f"{t:.3f}" for t in times[method])
        )
    print(f"  max relative difference {error:.2e}")
    print(
        f"  ratio pyengine/torch time = {best['pyengine'] / best['torch']:.3f} "
        f"(speed-up {best['torch'] / best['pyengine']:.2f}x)"
    )


if __name__ == "__main__":
    main()
