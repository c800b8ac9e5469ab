"""Hierarchical decomposition: the native op vs the pure-torch autograd reference, one run.

64 inputs x 2 targets (the predicted class and the runner-up) on a VGG-style CNN at 64x64
with random weights; both find the same paths. Prints the time ratio op/reference.

    python -P benchmarks/paths.py [--beam 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.plugins.pathwise._chain import trace_chain
from pyengine.plugins.pathwise.paths import op_arguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import vgg_style  # noqa: E402  (the benchmark CNN)

from pathwise_reference import reference_paths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = vgg_style(64).double().to(args.device)
    x = torch.rand(args.inputs, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(args.device)
    with torch.no_grad():
        logits = model(x)
    targets = logits.topk(2, dim=1).indices.cpu()
    chain = trace_chain(Context(model=model, device=torch.device(args.device)), x, "benchmark")

    started = time.perf_counter()
    activations, weights, indices, geometry = op_arguments(chain)
    paths, scores = ops.hierarchical_paths(activations, weights, indices, geometry, targets.to(args.device), args.beam)
    if args.device == "cuda":
        torch.cuda.synchronize()
    native = time.perf_counter() - started

    started = time.perf_counter()
    steps = [(step.pool, step.linear) for step in chain.steps]
    expected, _ = reference_paths(steps, chain.activations, targets, args.beam)
    reference = time.perf_counter() - started

    same = torch.equal(paths.cpu(), expected)
    print(
        f"hierarchical decomposition, {args.inputs} inputs x 2 targets, beam {args.beam}, VGG-style CNN 64x64 "
        f"({len(chain.layers)} ReLU layers), {args.device}: reference {reference:.2f} s, op {native:.4f} s "
        f"(with argument preparation): ratio {native / reference:.4f} ({reference / native:.0f}x faster); "
        f"same paths: {same}"
    )


if __name__ == "__main__":
    main()
