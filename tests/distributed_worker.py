"""Run by tests/test_distributed.py, in one process (``python -P``) or under ``torchrun``.

``distributed_worker.py OUT.pt techniques``: runs techniques through ``pyengine.run`` and saves
(rank 0) every result's arrays and scalars. ``distributed_worker.py OUT.h5 capture [KILL_AT]``:
captures through ``pyengine.capture``; with KILL_AT, rank 1 kills itself (SIGKILL) once it has
written that many rows.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import pyengine
from pyengine import distributed
from pyengine.data import Shapes
from pyengine.models import DemoCNN

LAYERS = ["features.relu1", "features.relu2"]


def model() -> DemoCNN:
    torch.manual_seed(0)
    net = DemoCNN(width=4, image_size=16).eval()
    with torch.no_grad():  # larger weights than the default init: outputs with real signal
        for parameter in net.parameters():
            parameter.mul_(2.0)
    return net


def data() -> Shapes:
    return Shapes(90, seed=3, size=16)


RUNS: dict[str, dict[str, Any]] = {
    "gram-spectrum": {"layers": LAYERS, "batch_size": 16},
    "relu-sync": {"layers": LAYERS, "batch_size": 16},
    "probe-neurons": {"layers": LAYERS, "batch_size": 16},
    "probe-linear": {"layers": LAYERS[-1:], "batch_size": 16},
    "max-patches": {"layers": ["features.relu2"], "k": 5, "batch_size": 16},
    "jacobian-gram": {"layers": LAYERS[-1:], "batch_size": 16, "sources": "random", "random_sources": 3},
    "interaction-basis": {"layers": LAYERS, "batch_size": 16},
    "llc": {"chains": 3, "burn_in": 5, "draws": 10, "batch_size": 30, "stop": 60},
    "occlusion": {"window": (3, 4, 4), "stride": (3, 4, 4), "batch_size": 8, "stop": 24},
    "saliency": {"batch_size": 8, "stop": 24},
    "integrated-gradients": {"batch_size": 8, "stop": 24, "n_steps": 8},
    "grad-cam": {"batch_size": 8, "stop": 24},
    "smoothgrad": {"batch_size": 8, "stop": 24, "samples": 3},
    "hierarchical-decomposition": {"batch_size": 8, "stop": 24},
    "path-linear": {"batch_size": 8, "stop": 24},
    "faithfulness": {"techniques": ["saliency"], "batch_size": 8, "stop": 24, "steps": 8},
}


def techniques(out: Path) -> None:
    saved: dict[str, Any] = {}
    for name, options in RUNS.items():
        result = pyengine.run(name, model(), data=data(), progress=False, **options)
        saved[name] = {"arrays": result.arrays(), "scalars": result.scalars(), "rows": result.rows}
    if distributed.current().is_main:
        torch.save(saved, out)


def capture(out: Path, kill_at: int) -> None:
    ranks = distributed.current()

    def on_batch(rows: int) -> None:
        if ranks.rank == 1 and rows >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    pyengine.capture(model(), data(), LAYERS, out, batch_size=8, progress=False, on_batch=on_batch if kill_at else None)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.use_deterministic_algorithms(True)
    distributed.init_from_env()
    try:
        if mode == "techniques":
            techniques(out)
        else:
            capture(out, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    finally:
        distributed.close()


if __name__ == "__main__":
    main()
