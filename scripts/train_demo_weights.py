"""Train the demo CNN from its seed and write the weights ``pyengine demo`` ships with.

    python -P scripts/train_demo_weights.py            # writes pyengine/models/demo_cnn.pt (+ .json)
    python -P scripts/train_demo_weights.py --check    # trains, and says whether the shipped file is what it makes

One thread, fixed seeds: the same bits on CPUs with the same kernels (tests/test_demo_weights.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pyengine.train import SHIPPED_WEIGHTS, TrainConfig, train_demo, write_demo_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped weights instead of writing")
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS, help="where to write (default: the shipped file)")
    args = parser.parse_args(argv)
    config = TrainConfig()
    model, report = train_demo(config)
    print(f"held-out accuracy {report.accuracy:.2%}, trained in {report.seconds:.1f} s")
    if args.check:
        shipped = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
        same = all(torch.equal(value, shipped[key]) for key, value in model.state_dict().items())
        print(f"{SHIPPED_WEIGHTS}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    write_demo_weights(model, report, config, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
