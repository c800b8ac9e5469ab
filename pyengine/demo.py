"""``pyengine demo``: train the demo CNN on shapes, capture, run every technique, report."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyengine import host
from pyengine.api import run
from pyengine.capture import capture
from pyengine.data.shapes import Shapes
from pyengine.errors import PyengineError
from pyengine.figures import image_grid
from pyengine.layers import after_relu, conv_layers, relu_layers
from pyengine.models.demo import DemoCNN
from pyengine.report import Report, Section
from pyengine.store import StoreReader
from pyengine.technique import Figure
from pyengine.train import TrainConfig, train_cached

DEMO_SEED = 0
HELD_OUT_SEED = 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def capture_layers(model: nn.Module) -> list[str]:
    """The layers the demo stores: every ReLU output."""
    return list(relu_layers(model))


def demo(
    out: str | Path = "demo-out", *, config: TrainConfig | None = None, n_inputs: int = 8, progress: bool = True
) -> int:
    """Run the whole demo into ``out``; returns the number of techniques that failed."""
    config = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = DemoCNN()
    train_data = Shapes(config.train_size, seed=DEMO_SEED)
    held_out = Shapes(config.test_size, seed=HELD_OUT_SEED)
    steps: list[tuple[str, float]] = []  # (step, seconds): the table printed at the end
    clock = time.perf_counter()
    report = train_cached(model, train_data, held_out, config, progress=progress)
    steps.append(("train (or load) demo-cnn", time.perf_counter() - clock))
    how = "loaded from cache" if report.cached else f"trained in {report.seconds:.1f} s"
    print(f"demo-cnn: held-out accuracy {report.accuracy:.2%} on {len(held_out)} shapes images ({how})", flush=True)
    model.eval()

    activations = out / "activations.h5"
    clock = time.perf_counter()
    capture(model, held_out, capture_layers(model), activations, overwrite=True, progress=progress)
    steps.append(("capture", time.perf_counter() - clock))
    _say(f"captured {', '.join(capture_layers(model))} -> {activations}")

    inputs = held_out.batch(range(n_inputs)).inputs
    results_path = out / "results.h5"
    results_path.unlink(missing_ok=True)
    sections = [_overview_section(report.accuracy, how, report.losses, held_out, inputs)]
    failures = 0
    for name, technique in host.techniques().items():
        # Techniques that explain single inputs get the first few held-out images; the others
        # analyse the whole held-out set (from the store where they read activations).
        rows: dict[str, Any] = {"stop": n_inputs} if technique.explains_inputs else {}
        started = time.perf_counter()
        try:
            given = inputs if technique.needs_inputs else None
            result = run(
                name,
                model,
                given,
                data=held_out,
                store=activations,
                save=results_path,
                run_name="demo",
                progress=progress,
                **rows,
            )
        except PyengineError as error:
            failures += 1
            _say(f"{name}: FAILED: {error}")
            sections.append(Section(name, error=str(error)))
            steps.append((f"{name} (failed)", time.perf_counter() - started))
            continue
        seconds = time.perf_counter() - started
        steps.append((name, seconds))
        _say(f"{name}: {result.summary()} ({seconds:.1f} s; {result.rows})")
        sections.append(
            Section(
                name,
                lines=[*result.lines(), f"Rows analysed: {result.rows}."],
                table=result.table(),
                figures=list(result.figures),
            )
        )
    clock = time.perf_counter()
    sections += feature_sections(model, held_out, activations, inputs, progress=progress)
    steps.append(("unit pages (patches, guided maps, activation maximization)", time.perf_counter() - clock))
    with StoreReader(results_path) as reader:
        stored = [f"{t}/{r}" for t, r in reader.results()]
    sections.append(
        Section(
            "Files",
            lines=[
                f"{activations.name}: activations of {len(held_out)} held-out images",
                f"{results_path.name}: {', '.join(stored) or 'no results'}",
            ],
        )
    )
    clock = time.perf_counter()
    page = Report("pyengine demo: demo-cnn on shapes", sections).write(out / "report")
    steps.append(("report", time.perf_counter() - clock))
    print(f"wrote {results_path} and {page}", flush=True)
    print(time_table(steps), flush=True)
    return failures


def time_table(steps: list[tuple[str, float]]) -> str:
    """Where the demo's time went: one line per step, longest first, and the total."""
    width = max(len(name) for name, _ in steps)
    total = sum(seconds for _, seconds in steps)
    lines = ["time per step:"]
    for name, seconds in sorted(steps, key=lambda item: -item[1]):
        lines.append(f"  {name:<{width}}  {seconds:7.1f} s  {seconds / total:4.0%}" if total else f"  {name}")
    lines.append(f"  {'total':<{width}}  {total:7.1f} s")
    return "\n".join(lines)


def feature_sections(
    model: nn.Module, data: Shapes, store: Path, inputs: torch.Tensor, *, channels: int = 4, progress: bool = True
) -> list[Section]:
    """Per conv layer: its filters (first layer), feature maps of one input, the top-9 dataset
    patches with their guided-backprop maps, and activation-maximization images, for the first
    ``channels`` channels side by side."""
    sections: list[Section] = []
    available = host.techniques()
    wanted = ("filters", "activations", "max-patches", "activation-maximization")
    if any(name not in available for name in wanted):
        return sections  # a plugin set without the feature-visualization family
    for k, conv in enumerate(conv_layers(model, "demo")):
        layer = after_relu(model, conv)
        figures: list[Figure] = []
        try:
            if k == 0:
                figures += run("filters", model, layers=conv, progress=False).figures
            figures += run("activations", model, inputs[:1], layers=layer, progress=False).figures
            patches = run(
                "max-patches",
                model,
                data=data,
                store=store,
                layers=layer,
                channels=list(range(channels)),
                guided=True,
                figure_channels=channels,
                progress=progress,
            )
            optimised = run(
                "activation-maximization",
                model,
                data=data,
                layers=conv,
                channels=list(range(channels)),
                steps=64,
                progress=False,
            )
        except PyengineError as error:
            sections.append(Section(f"Feature visualization of {layer}", error=str(error)))
            continue
        figures += list(patches.figures) + [optimised.figures[0]]
        sections.append(
            Section(
                f"Feature visualization of {layer}",
                lines=[
                    f"{patches.summary()}.",
                    f"Activation maximization of {conv} channels 0-{channels - 1}: {optimised.summary()}.",
                ],
                figures=figures,
            )
        )
    return sections


def _overview_section(
    accuracy: float, how: str, losses: tuple[float, ...], data: Shapes, inputs: torch.Tensor
) -> Section:
    figures = [Figure("Held-out inputs given to the techniques", image=image_grid(inputs, columns=8))]
    if losses:
        figures.append(
            Figure("Training loss per epoch", lines={"loss": list(losses)}, xlabel="epoch", ylabel="cross-entropy")
        )
    return Section(
        "Model and data",
        lines=[
            f"demo-cnn on shapes: held-out accuracy {accuracy:.2%} ({how}).",
            f"Classes: {', '.join(data.class_names)}; concepts: "
            + "; ".join(f"{k} ({', '.join(v)})" for k, v in data.concept_names.items())
            + ".",
        ],
        figures=figures,
    )
