"""``pyengine demo``: the demo CNN on shapes: capture, run every technique, unit pages, the report."""

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
from pyengine.demo_units import unit_pages
from pyengine.errors import PyengineError
from pyengine.figures import image_grid
from pyengine.layers import relu_layers
from pyengine.models.demo import DemoCNN
from pyengine.report import Link, Report, Section
from pyengine.store import StoreReader
from pyengine.technique import Figure, Result
from pyengine.train import HELD_OUT_SEED, TRAIN_SEED, TrainConfig, load_demo_weights, train_cached


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def capture_layers(model: nn.Module) -> list[str]:
    """The layers the demo stores: every ReLU output."""
    return list(relu_layers(model))


def demo(
    out: str | Path = "demo-out",
    *,
    train: bool = False,
    config: TrainConfig | None = None,
    n_inputs: int = 8,
    progress: bool = True,
) -> int:
    """Run the whole demo into ``out``; returns the number of techniques that failed. The model is
    the shipped demo CNN (``scripts/train_demo_weights.py`` made it), or with ``train`` one
    trained here (cached)."""
    config = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = DemoCNN()
    held_out = Shapes(config.test_size, seed=HELD_OUT_SEED)
    steps: list[tuple[str, float]] = []  # (step, seconds): the table printed at the end
    clock = time.perf_counter()
    if train:
        report = train_cached(model, Shapes(config.train_size, seed=TRAIN_SEED), held_out, config, progress=progress)
        how = "loaded from cache" if report.cached else f"trained in {report.seconds:.1f} s"
        steps.append(("train (or load) demo-cnn", time.perf_counter() - clock))
    else:
        report = load_demo_weights(model, held_out)
        how = "the shipped weights; `pyengine demo --train` trains them here"
        steps.append(("load demo-cnn", time.perf_counter() - clock))
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
    sections: list[Section] = []
    results: dict[str, Result] = {}
    found: list[tuple[str, str, float]] = []  # technique, its one line, seconds: the summary table
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
            sections.append(Section(name, error=str(error), anchor=name))
            steps.append((f"{name} (failed)", time.perf_counter() - started))
            found.append((name, f"FAILED: {error}", time.perf_counter() - started))
            continue
        seconds = time.perf_counter() - started
        steps.append((name, seconds))
        results[name] = result
        found.append((name, result.summary(), seconds))
        _say(f"{name}: {result.summary()} ({seconds:.1f} s; {result.rows})")
        table = result.table()
        lines = result.lines() if not table else [line for line in result.lines() if "WARNING" in line]
        sections.append(
            Section(
                name,
                lines=[*(lines or [result.summary()]), *([f"Rows analysed: {result.rows}."] if result.rows else [])],
                table=table,
                figures=list(result.figures),
                anchor=name,
            )
        )
    clock = time.perf_counter()
    units = unit_pages(model, held_out, activations, inputs, results, progress=progress)
    steps.append(("unit pages (patches, guided maps, activation maximization)", time.perf_counter() - clock))
    with StoreReader(results_path) as reader:
        stored = [f"{t}/{r}" for t, r in reader.results()]
    files = Section(
        "Files",
        lines=[
            f"{activations.name}: activations of {len(held_out)} held-out images",
            f"{results_path.name}: {', '.join(stored) or 'no results'}",
        ],
    )
    summary = _summary_section(model, report.accuracy, how, held_out, found)
    overview = _overview_section(report.losses, inputs)
    clock = time.perf_counter()
    page = Report(
        "pyengine demo: demo-cnn on shapes",
        [summary, overview, *sections, *units.overview, files],
        pages=[units.page] if units.page.sections else [],
        unit_pages=units.links,
    ).write(out / "report", progress=progress)
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


SUMMARY_CHARACTERS = 180  # a technique's finding in the summary table: its first line, cut here


def _one_line(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARACTERS else text[: SUMMARY_CHARACTERS - 1].rsplit(" ", 1)[0] + " …"


def _summary_section(
    model: nn.Module, accuracy: float, how: str, data: Shapes, found: list[tuple[str, str, float]]
) -> Section:
    """One screen: model, data, accuracy, and per technique what it found and how long it took."""
    parameters = sum(p.numel() for p in model.parameters())
    total = sum(seconds for _, _, seconds in found)
    table: list[tuple[object, ...]] = [("technique", "what it found", "seconds")]
    table += [(Link(name, f"#{name}"), _one_line(line), round(seconds, 1)) for name, line, seconds in found]
    return Section(
        "Summary",
        lines=[
            f"Model: demo-cnn ({type(model).__name__}, {parameters:,} parameters: three conv/ReLU/max-pool blocks, "
            f"two linear layers), {how}.",
            f"Data: {len(data)} held-out shapes images of {data.size} x {data.size} pixels; classes "
            f"{', '.join(data.class_names)}; concepts "
            + "; ".join(f"{k} ({', '.join(v)})" for k, v in data.concept_names.items())
            + ".",
            f"Held-out accuracy: {accuracy:.2%}. {len(found)} techniques in {total:.0f} s; "
            "click a technique for its section, a unit (layer#channel) in a table for its page.",
        ],
        table=table,
    )


def _overview_section(losses: tuple[float, ...], inputs: torch.Tensor) -> Section:
    figures = [Figure("Held-out inputs given to the techniques", image=image_grid(inputs, columns=8))]
    if losses:
        figures.append(
            Figure("Training loss per epoch", lines={"loss": list(losses)}, xlabel="epoch", ylabel="cross-entropy")
        )
    return Section("Model and data", figures=figures)
