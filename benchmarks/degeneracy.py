"""relu-sync's bitsets vs the float-matrix approach, measured in one run.

NEURONS units over INPUTS inputs. pyengine packs the firing patterns into bitsets
(pyengine.ops.pack_firing) and counts pairwise agreement by XOR popcount
(pyengine.ops.firing_disagreements). The anchor holds the patterns as a float32 0/1
matrix A and computes agreement = A^T A + (1 - A)^T (1 - A) with two matrix products.
Prints the time ratio and the memory of the patterns. Then the interaction basis of the
trained demo CNN's last layers (pool3: 2048 units, relu4: 64) over 1,000 held-out images,
with the time split between Gram accumulation, Jacobian VJPs and eigendecomposition.

    python benchmarks/degeneracy.py [--neurons 4096] [--inputs 50000] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from pyengine import ops


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=4096)
    parser.add_argument("--inputs", type=int, default=50_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(0)
    h = torch.randn(args.inputs, args.neurons, generator=generator).to(device)
    h[:, 1] = 2 * h[:, 0]  # one synchronized pair, for the agreement check

    ops.firing_disagreements(ops.pack_firing(h[:128, :64]))  # warm-up
    sync()
    start = time.perf_counter()
    bits = ops.pack_firing(h)
    disagreements = ops.firing_disagreements(bits)
    sync()
    ours = time.perf_counter() - start

    start = time.perf_counter()
    fires = (h > 0).float()
    agreement = fires.T @ fires + (1 - fires).T @ (1 - fires)
    sync()
    anchor = time.perf_counter() - start

    same = torch.equal((args.inputs - disagreements).cpu(), agreement.round().long().cpu())
    print(
        f"relu-sync patterns: {args.neurons} neurons x {args.inputs:,} inputs on {device} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"  float32 matrices (anchor)   {anchor:8.3f} s   patterns {fires.nbytes / 2**20:8.1f} MiB")
    print(f"  bitsets + popcount          {ours:8.3f} s   patterns {bits.nbytes / 2**20:8.1f} MiB")
    print(f"  identical agreement counts: {same}; synchronized pair found: {int(disagreements[0, 1]) == 0}")
    print(
        f"  ratio pyengine/anchor time = {ours / anchor:.4f} (speed-up {anchor / ours:.1f}x); "
        f"pattern memory {fires.nbytes / bits.nbytes:.0f}x smaller"
    )
    return args.device


def interaction_basis_split(device: str = "cpu") -> None:
    import pyengine
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN
    from pyengine.train import HELD_OUT_SEED, TrainConfig, load_demo_weights

    model = DemoCNN()
    held_out = Shapes(TrainConfig().test_size, seed=HELD_OUT_SEED)
    load_demo_weights(model, held_out)  # the demo's shipped weights
    start = time.perf_counter()
    result = pyengine.run(
        "interaction-basis",
        model.eval(),
        data=held_out,
        progress=False,
        device=device,
        layers=["features.pool3", "classifier.relu4"],
    )
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    where = "" if device == "cpu" else f" on {device}"
    split = ", ".join(f"{phase} {seconds:.2f} s ({seconds / total:.0%})" for phase, seconds in result.seconds.items())
    print(f"interaction basis of demo-cnn (pool3, relu4) over {len(held_out)} images{where}: {total:.2f} s: {split}")
    for line in result.lines()[:3]:
        print(f"  {line}")


if __name__ == "__main__":
    interaction_basis_split(main())
