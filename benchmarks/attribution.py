"""Occlusion: pyengine vs Captum ``Occlusion``, same settings, same batch size.

A VGG-style CNN with random weights at 64x64 and 224x224. Runs alternate in one process
(best of --repeats), pyengine both with its default layout (channels last for conv nets) and
with layout="as-given" (NCHW, as Captum); peak memory is measured in a fresh subprocess per method (CPU: the
resident set's peak growth, sampled every millisecond; CUDA: torch's peak allocation).
Prints pyengine/Captum time ratios.

    python -P benchmarks/attribution.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn

import pyengine

warnings.filterwarnings("ignore")

# (image size, inputs, window, stride, windows per forward pass)
SETTINGS = [
    (64, 4, (3, 8, 8), (3, 4, 4), 16),
    (64, 4, (1, 16, 16), (1, 8, 8), 16),
    (224, 2, (3, 32, 32), (3, 16, 16), 8),
]


def vgg_style(image_size: int) -> nn.Module:
    torch.manual_seed(0)

    def block(cin: int, cout: int, convs: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for k in range(convs):
            layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1), nn.ReLU()]
        return layers + [nn.MaxPool2d(2)]

    features = block(3, 16, 2) + block(16, 32, 2) + block(32, 64, 2) + block(64, 64, 1)
    side = image_size // 16
    return nn.Sequential(
        OrderedDict(
            [
                ("features", nn.Sequential(*features)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64 * side * side, 128)),
                ("relu", nn.ReLU()),
                ("fc2", nn.Linear(128, 10)),
            ]
        )
    ).eval()


def problem(setting: int, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    size, n, _, _, _ = SETTINGS[setting]
    model = vgg_style(size).to(device)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x, torch.arange(n) % 10


def run_method(method: str, setting: int, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    _, n, window, stride, per_pass = SETTINGS[setting]
    if method == "captum":
        from captum.attr import Occlusion

        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=window,
            strides=stride,
            baselines=0.0,
            target=targets,
            perturbations_per_eval=per_pass,
        )
    layout = "as-given" if method == "pyengine-nchw" else "auto"
    return pyengine.run(
        "occlusion",
        model,
        x,
        target=targets,
        window=window,
        stride=stride,
        baseline=0.0,
        max_batch=per_pass * n,
        layout=layout,
        progress=False,
    ).attributions


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(method: str, setting: int, device: str) -> float:
    """Run once in a fresh interpreter; the peak memory the run added."""
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--child", method, "--setting", str(setting), "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class ResidentPeak:
    """Samples the resident set every millisecond in a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak, self._stop = resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> ResidentPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def child(method: str, setting: int, device: str) -> None:
    model, x, targets = problem(setting, device)
    with torch.no_grad():
        model(x[:1])  # load kernels and libraries before measuring
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_method(method, setting, model, x, targets)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resident_bytes()
        with ResidentPeak() as sampler:
            run_method(method, setting, model, x, targets)
        peak = sampler.peak - base
    print(json.dumps({"peak_mib": max(peak, 0) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--setting", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.setting, args.device)
        return
    torch.set_grad_enabled(False)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"occlusion, VGG-style CNN with random weights, on {where}; best of {args.repeats}, alternating")
    for setting, (size, n, window, stride, per_pass) in enumerate(SETTINGS):
        model, x, targets = problem(setting, args.device)
        best = {"captum": float("inf"), "pyengine": float("inf"), "pyengine-nchw": float("inf")}
        maps = {}
        for _ in range(args.repeats):
            for method in best:
                synchronize(args.device)
                started = time.perf_counter()
                maps[method] = run_method(method, setting, model, x, targets)
                synchronize(args.device)
                best[method] = min(best[method], time.perf_counter() - started)
        scale = maps["captum"].abs().max()
        difference = {m: ((maps[m] - maps["captum"]).abs().max() / scale).item() for m in ("pyengine", "pyengine-nchw")}
        memory = {method: peak_memory_mib(method, setting, args.device) for method in best}
        print(
            f"{size}x{size}, {n} inputs, window {window}, stride {stride}, {per_pass * n} samples per pass:\n"
            f"  Captum {best['captum']:.2f} s ({memory['captum']:.0f} MiB)\n"
            f"  pyengine {best['pyengine']:.2f} s ({memory['pyengine']:.0f} MiB): "
            f"ratio {best['pyengine'] / best['captum']:.3f}, max relative difference {difference['pyengine']:.1e}\n"
            f"  pyengine layout=as-given {best['pyengine-nchw']:.2f} s ({memory['pyengine-nchw']:.0f} MiB): "
            f"ratio {best['pyengine-nchw'] / best['captum']:.3f}, "
            f"max relative difference {difference['pyengine-nchw']:.1e}"
        )


if __name__ == "__main__":
    main()
