"""What the architecture matrices share (tests/test_architectures.py for vision models,
tests/test_lm_matrix.py for language models): a cell's spec and refusal, running one cell, the
single-thread setting, the MLP-probe spy and the markdown table."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pyengine import host
from pyengine.errors import PyengineError


@dataclass(frozen=True)
class Refusal:
    pattern: str  # a regular expression the one-line message must contain
    reason: str  # the table's words


@dataclass(frozen=True)
class Spec:
    reference: str  # the table's words for a cell that runs
    check: Callable[[Any, Any], None]  # (cell, result): asserts the result equals its reference
    options: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # options for one model
    notes: dict[str, str] = field(default_factory=dict)  # the table's words for one model (default ✓)

    def options_for(self, name: str) -> dict[str, Any]:
        return {**self.options, **self.per_model.get(name, {})}


def run_cell(cell: Any, spec: Spec, refusal: Refusal | None) -> None:
    """Run one cell (``cell.run(**options)``, ``cell.model``): the result passes ``spec.check``, or
    the technique raises one ``PyengineError`` line matching ``refusal``; either way no hook is
    left, the weights are unchanged and the model stays in eval mode."""
    from conftest import hooks_on

    weights = {key: value.clone() for key, value in cell.model.state_dict().items()}
    if refusal is None:
        result = cell.run(**spec.options_for(cell.name))
        assert hooks_on(cell.model) == []
        spec.check(cell, result)
    else:
        with pytest.raises(PyengineError) as caught:
            cell.run(**spec.options_for(cell.name))
        message = str(caught.value)
        assert "\n" not in message and re.search(refusal.pattern, message), message
        assert hooks_on(cell.model) == []
    assert all(torch.equal(value, weights[key]) for key, value in cell.model.state_dict().items())
    assert not cell.model.training


@contextmanager
def single_thread() -> Iterator[None]:
    """Small models: a second intra-op thread gains nothing and spins on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


FIT_MLP_CALLS: list[tuple[int, int, int]] = []  # (features, training rows, validation rows)


def spy_fit_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record (features, training rows, validation rows) of every MLP probe fitted."""
    from pyengine.plugins.probing import probes

    fit = probes.fit_mlp

    def spy(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        FIT_MLP_CALLS.append((x_train.shape[1], x_train.shape[0], x_val.shape[0]))
        return fit(x_train, y_train, x_val, *args, **kwargs)

    FIT_MLP_CALLS.clear()
    monkeypatch.setattr(probes, "fit_mlp", spy)


def markdown_table(
    models: Sequence[str],
    specs: Mapping[str, Spec],
    refusals: Mapping[tuple[str, str], Refusal],
    pending: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """The matrix as markdown: per technique what it is checked against, and per model ✓ (or the
    spec's note), "refused: <reason>" or "pending: <reason>"."""
    lines = ["| technique | checked against | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    for technique in host.techniques():
        spec = specs.get(technique)
        row = []
        for name in models:
            refusal, waiting = refusals.get((technique, name)), (pending or {}).get((technique, name))
            text = f"refused: {refusal.reason}" if refusal else spec.notes.get(name, "✓") if spec else "?"
            row.append(f"pending: {waiting}" if waiting else text)
        reference = spec.reference if spec else "no reference"
        lines.append(f"| {technique} | {reference} | " + " | ".join(row) + " |")
    return "\n".join(lines)
