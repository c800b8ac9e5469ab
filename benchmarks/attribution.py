"""Occlusion: Captum ``Occlusion`` vs pyengine's plain sweep vs its incremental sweep, in one run.

Cases: a VGG-style CNN (random weights) at 64x64 and 224x224, a ResNet-18-style net with
BatchNorm (torchvision's BasicBlock idiom, half the widths, BN statistics from data) at 224x224,
and the demo CNN trained on shapes (the demo's weights, trained once and cached) at 64x64. Same
window, stride, baseline 0 and windows per forward pass for every method; the methods alternate,
best of --repeats. Prints time ratios to Captum, the FLOPs ratio the geometry gives (plain = 1),
the largest difference to Captum, peak memory (a fresh subprocess per method: CPU the resident
set's peak growth, CUDA torch's peak allocation), and for the approximate modes their quality
against the exact map (Pearson correlation, overlap of the top 10 % of pixels) and, on the
trained demo CNN over 64 held-out images, the pointing game.

    python -P benchmarks/attribution.py [--device cuda] [--repeats 3] [--cases vgg64,vgg224,resnet224,demo]
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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import pyengine

warnings.filterwarnings("ignore")


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


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` called twice, ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet18_style(image_size: int) -> nn.Module:
    """ResNet-18's layout (7x7/2 stem, max pool, 2+2+2+2 basic blocks, global pool) at half width;
    BatchNorm statistics set from random images."""
    del image_size
    torch.manual_seed(0)
    widths = (32, 64, 128, 256)
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = widths[0]
    for k, width in enumerate(widths):
        layers += [BasicBlock(cin, width, 1 if k == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    model.train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
        model(torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def demo_cnn(image_size: int) -> nn.Module:
    """The demo's model with the demo's trained weights (shipped at 64 x 64; trained once, then
    cached, at other sizes)."""
    from pyengine.data import Shapes
    from pyengine.models import DemoCNN
    from pyengine.train import HELD_OUT_SEED, TRAIN_SEED, TrainConfig, load_demo_weights, train_cached

    config = TrainConfig()
    torch.manual_seed(config.seed)
    model = DemoCNN(image_size=image_size)
    held_out = Shapes(config.test_size, seed=HELD_OUT_SEED, size=image_size)
    if image_size == 64:
        load_demo_weights(model, held_out)
    else:
        train_cached(
            model, Shapes(config.train_size, seed=TRAIN_SEED, size=image_size), held_out, config, progress=False
        )
    return model.eval()


# name -> (model builder, image size, inputs, window, stride, windows per forward pass)
CASES: dict[str, tuple[Callable[[int], nn.Module], int, int, tuple[int, ...], tuple[int, ...], int]] = {
    "vgg64": (vgg_style, 64, 4, (3, 8, 8), (3, 4, 4), 16),
    "vgg224": (vgg_style, 224, 2, (3, 32, 32), (3, 16, 16), 8),
    "resnet224": (resnet18_style, 224, 1, (3, 32, 32), (3, 16, 16), 8),
    "demo": (demo_cnn, 64, 8, (3, 8, 8), (3, 4, 4), 16),
}
LABELS = {
    "vgg64": "VGG-style 64x64",
    "vgg224": "VGG-style 224x224",
    "resnet224": "ResNet-18-style (BN, half width) 224x224",
    "demo": "demo CNN (trained) 64x64",
}
# method -> pyengine options (None: Captum)
METHODS: dict[str, dict[str, Any] | None] = {
    "captum": None,
    "plain": {"sweep": "plain"},
    "incremental": {"sweep": "incremental"},
    "field_cap=0.5": {"sweep": "incremental", "field_cap": 0.5},
    "drilldown=0.25": {"sweep": "incremental", "drilldown": 0.25},
    "both": {"sweep": "incremental", "field_cap": 0.5, "drilldown": 0.25},
}
EXACT = ("plain", "incremental")


def problem(case: str, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, size, n, _, _, _ = CASES[case]
    model = build(size).to(device)
    if case == "demo":
        from pyengine.data import Shapes
        from pyengine.demo import HELD_OUT_SEED

        x = Shapes(n, seed=HELD_OUT_SEED).batch(range(n)).inputs.to(device)
    else:
        x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x, torch.arange(n) % 4


def run_method(
    method: str, case: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The maps and the FLOPs ratio to the plain sweep (1 for Captum and plain)."""
    _, _, n, window, stride, per_pass = CASES[case]
    options = METHODS[method]
    if options is None:
        from captum.attr import Occlusion

        maps = Occlusion(model).attribute(
            x,
            sliding_window_shapes=window,
            strides=stride,
            baselines=0.0,
            target=targets,
            perturbations_per_eval=per_pass,
        )
        return maps, 1.0
    result = pyengine.run(
        "occlusion",
        model,
        x,
        target=targets,
        window=window,
        stride=stride,
        baseline=0.0,
        max_batch=per_pass * n,
        progress=False,
        **options,
    )
    return result.attributions, float(result.flops_ratio)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(method: str, case: str, device: str) -> float:
    """Run once in a fresh interpreter; the peak memory the run added."""
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--child", method, "--cases", case, "--device", device],
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


def child(method: str, case: str, device: str) -> None:
    model, x, targets = problem(case, device)
    with torch.no_grad():
        model(x[:1])  # load kernels and libraries before measuring
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_method(method, case, model, x, targets)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resident_bytes()
        with ResidentPeak() as sampler:
            run_method(method, case, model, x, targets)
        peak = sampler.peak - base
    print(json.dumps({"peak_mib": max(peak, 0) / 2**20}))


def quality(approximate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Mean over inputs of the Pearson correlation and of the overlap of the top 10 % of pixels
    (channels summed) between an approximate map and the exact one."""
    a, e = approximate.sum(1).flatten(1).double(), exact.sum(1).flatten(1).double()
    pearson = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, e)]).mean()
    k = max(1, int(0.1 * a.shape[1]))
    top_a, top_e = a.topk(k, 1).indices, e.topk(k, 1).indices
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(top_a, top_e)]).mean()
    return float(pearson), float(overlap)


def pointing(device: str) -> None:
    """The pointing game of the exact and approximate maps on the trained demo CNN."""
    from pyengine.data import Shapes
    from pyengine.demo import HELD_OUT_SEED
    from pyengine.plugins.attribution.faithfulness import pointing_game

    model = demo_cnn(64).to(device)
    batch = Shapes(64, seed=HELD_OUT_SEED).batch(range(64))
    x, boxes = batch.inputs.to(device), batch.boxes
    print(
        "\npointing game, demo CNN (trained), 64 held-out shapes images, window (3, 8, 8), stride (3, 4, 4), "
        "mean baseline:"
    )
    exact = None
    for method, options in METHODS.items():
        if options is None or method == "plain":
            continue
        maps = pyengine.run(
            "occlusion", model, x, window=(3, 8, 8), stride=(3, 4, 4), progress=False, **options
        ).attributions
        exact = maps if method == "incremental" else exact
        hits = float(pointing_game(maps.cpu(), x.cpu(), boxes).double().mean())
        extra = ""
        if exact is not None and method != "incremental":
            pearson, overlap = quality(maps, exact)
            extra = f", Pearson {pearson:.3f}, top-10% overlap {overlap:.2f} vs exact"
        print(f"  {method}: pointing game {hits:.3f}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per method)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.cases, args.device)
        return
    torch.set_grad_enabled(False)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"occlusion on {where}; best of {args.repeats}, methods alternating; ratios to Captum's time")
    print(
        "| case | method | time (s) | / Captum | FLOPs / plain | max diff to Captum "
        "| Pearson, top-10% vs exact | peak MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        model, x, targets = problem(case, args.device)
        best = {method: float("inf") for method in METHODS}
        maps: dict[str, torch.Tensor] = {}
        flops: dict[str, float] = {}
        for _ in range(args.repeats):
            for method in METHODS:
                synchronize(args.device)
                started = time.perf_counter()
                maps[method], flops[method] = run_method(method, case, model, x, targets)
                synchronize(args.device)
                best[method] = min(best[method], time.perf_counter() - started)
        scale = maps["captum"].abs().max()
        for method in METHODS:
            difference = ((maps[method] - maps["captum"]).abs().max() / scale).item()
            shown = f"{difference:.1e}" if method in ("plain", "incremental") else "-"
            fit = "-"
            if method not in ("captum", *EXACT):
                fit = "{:.3f}, {:.2f}".format(*quality(maps[method], maps["incremental"]))
            memory = f"{peak_memory_mib(method, case, args.device):.0f}" if args.memory else "-"
            print(
                f"| {LABELS[case]} | {method} | {best[method]:.2f} | {best[method] / best['captum']:.3f} | "
                f"{flops[method]:.3f} | {shown} | {fit} | {memory} |"
            )
    if "demo" in args.cases.split(","):
        pointing(args.device)


if __name__ == "__main__":
    main()
