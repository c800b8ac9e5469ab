"""The cost of ``param_hash`` next to hashlib's raw SHA-256 speed on the same number of bytes.

Builds a CPU model of about --params parameters (conv + BatchNorm stages and wide linear
layers, float32), then times ``param_hash(model)`` and ``hashlib.sha256(buffer)`` over one
contiguous buffer of the same size, alternating; the best of --repeats is kept for each.
Prints both times and their ratio (1.0: no overhead over hashing the bytes once).

    python -P benchmarks/param_hash.py [--params 100_000_000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import time

import torch
from torch import nn

from pyengine.capture import param_hash


def build(params: int) -> nn.Module:
    """Conv/BN stages (~1.2 M parameters) and then square linear layers up to ``params``."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 128, 256, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    layers.append(nn.Flatten())
    total = sum(p.numel() for layer in layers for p in layer.parameters())
    while total < params:
        side = min(8192, int(max(params - total, 1) ** 0.5))
        layers.append(nn.Linear(side, side, bias=False))
        total += side * side
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        model = build(args.params)
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    count = sum(t.numel() for t in state.values())
    buffer = torch.empty(nbytes, dtype=torch.uint8).numpy()
    buffer[:] = 7
    ours, raw = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        param_hash(model)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        hashlib.sha256(memoryview(buffer)).hexdigest()
        raw.append(time.perf_counter() - start)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"state dict: {len(state)} tensors, {count:,} values, {nbytes / 2**20:,.1f} MiB")
    print(f"param_hash    {min(ours):.3f} s  ({nbytes / min(ours) / 2**20:,.0f} MiB/s)")
    print(f"hashlib raw   {min(raw):.3f} s  ({nbytes / min(raw) / 2**20:,.0f} MiB/s)")
    print(f"ratio         {min(ours) / min(raw):.3f}")


if __name__ == "__main__":
    main()
