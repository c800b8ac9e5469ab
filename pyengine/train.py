"""Seeded training of the demo model on ``shapes``, with a weights cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pyengine.data.base import Dataset
from pyengine.errors import PyengineError
from pyengine.progress import Progress


@dataclass(frozen=True)
class TrainConfig:
    train_size: int = 4000
    test_size: int = 1000
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class TrainReport:
    accuracy: float  # held-out
    seconds: float  # training time (0 when loaded from the cache)
    cached: bool
    losses: tuple[float, ...]  # mean training loss per epoch


def cache_dir() -> Path:
    root = os.environ.get("PYENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyengine")
    return Path(root)


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state dict safely (``weights_only=True``); errors say what does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PyengineError(f"weights file {os.fspath(path)!r} does not exist") from None
    except Exception as error:  # unpickling refused or not a torch file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PyengineError(f"cannot load weights {os.fspath(path)!r} safely: {first}") from None
    if not isinstance(state, dict):
        raise PyengineError(f"weights {os.fspath(path)!r} hold a {type(state).__name__}; expected a state_dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:3])}")
        if mismatched:
            k = mismatched[0]
            details.append(f"{k} is {tuple(state[k].shape)} but the model expects {tuple(expected[k].shape)}")
        raise PyengineError(f"weights {os.fspath(path)!r} do not fit {type(model).__name__}: {'; '.join(details)}")
    model.load_state_dict(state)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 250) -> float:
    model.eval()
    correct = 0
    for batch in data.batches(batch_size):
        correct += int((model(batch.inputs).argmax(1) == batch.labels).sum())
    return correct / len(data)


def train(
    model: nn.Module, train_data: Dataset, test_data: Dataset, config: TrainConfig, *, progress: bool = True
) -> TrainReport:
    """Adam on cross-entropy with a cosine schedule; deterministic for a seed on one machine."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    everything = train_data.batch(range(len(train_data)))
    inputs, labels = everything.inputs, everything.labels
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * ((len(train_data) + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    with Progress(steps, "train demo-cnn", enabled=progress) as bar:
        for _ in range(config.epochs):
            model.train()
            order = torch.randperm(len(train_data), generator=generator)
            total = 0.0
            for first in range(0, len(order), config.batch_size):
                rows = order[first : first + config.batch_size]
                loss = nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(rows)
                bar.update()
            losses.append(total / len(order))
    seconds = time.perf_counter() - start
    return TrainReport(accuracy(model, test_data), seconds, False, tuple(losses))


def train_cached(
    model: nn.Module, train_data: Dataset, test_data: Dataset, config: TrainConfig, *, progress: bool = True
) -> TrainReport:
    """Train once per (model, data, config); later calls load the cached weights."""
    key = json.dumps(
        {
            "model": type(model).__qualname__,
            "train": train_data.describe(),
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "config": asdict(config),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    path = cache_dir() / f"{type(model).__name__.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        load_weights(model, path)
        return TrainReport(accuracy(model, test_data), 0.0, True, ())
    report = train(model, train_data, test_data, config, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), staging)
    os.replace(staging, path)
    return report


# --- the demo's shipped weights ------------------------------------------------------------------

SHIPPED_WEIGHTS = Path(__file__).parent / "models" / "demo_cnn.pt"  # written by scripts/train_demo_weights.py
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # the shapes datasets the demo trains and evaluates on


def train_demo(config: TrainConfig | None = None, *, progress: bool = True) -> tuple[nn.Module, TrainReport]:
    """The demo CNN trained from its seed on one thread: the same bits on every run on CPUs whose
    kernels are the same (``torch.backends.cpu.get_cpu_capability()``)."""
    from pyengine.data.shapes import Shapes
    from pyengine.models.demo import DemoCNN

    config = config or TrainConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(config.seed)
        model = DemoCNN()
        train_data, held_out = Shapes(config.train_size, seed=TRAIN_SEED), Shapes(config.test_size, seed=HELD_OUT_SEED)
        report = train(model, train_data, held_out, config, progress=progress)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), report


def write_demo_weights(
    model: nn.Module, report: TrainReport, config: TrainConfig, path: Path = SHIPPED_WEIGHTS
) -> None:
    """The weights (``path``) and how they were made (``path`` with ``.json``: config, losses,
    accuracy, torch version, CPU kernels), each written whole then renamed."""
    meta = {
        "config": asdict(config),
        "losses": list(report.losses),
        "held_out_accuracy": report.accuracy,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "made_by": "python -P scripts/train_demo_weights.py",
    }
    for target, write in (
        (path, lambda staging: torch.save(model.state_dict(), staging)),
        (path.with_suffix(".json"), lambda staging: staging.write_text(json.dumps(meta, indent=2) + "\n")),
    ):
        staging = target.with_name(target.name + ".partial")
        write(staging)
        os.replace(staging, target)


def load_demo_weights(model: nn.Module, held_out: Dataset, path: Path = SHIPPED_WEIGHTS) -> TrainReport:
    """Load the shipped weights into ``model``; its held-out accuracy measured now, the training
    losses as recorded when they were made."""
    load_weights(model, path)
    meta_path = path.with_suffix(".json")
    losses = tuple(json.loads(meta_path.read_text())["losses"]) if meta_path.exists() else ()
    return TrainReport(accuracy(model, held_out), 0.0, True, losses)
