"""An example third-party pyengine plugin, registered through the ``pyengine`` entry-point
group exactly like the built-in techniques.

``logit-margin``: how decisively the model picks its class, per input (top logit minus
runner-up logit). ``unit-ablation`` (``ablation.py``): the drop of the target score when one
unit of a layer is zeroed, using the host API for layers, rows, progress, randomness and figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import pyengine
from pyengine_example_plugin.ablation import UnitAblation


@dataclass(frozen=True)
class MarginOptions(pyengine.RowOptions):
    """Rows (``start``, ``stop``, ``batch_size``) as every built-in technique spells them."""

    top: int = pyengine.option(2, "the margin is top-1 minus top-`top` logit")

    def validate(self) -> None:
        super().validate()
        self.require_int("top", minimum=2)


@dataclass(frozen=True, kw_only=True)
class MarginResult(pyengine.Result):
    predictions: torch.Tensor  # (N,) predicted class
    margins: torch.Tensor  # (N,) top logit minus runner-up logit
    mean_margin: float

    def summary(self) -> str:
        return f"mean margin {self.mean_margin:.3f} over {self.margins.numel()} inputs"


class LogitMargin(pyengine.Technique):
    name = "logit-margin"
    summary = "top-1 minus top-2 logit per input: how decisive each prediction is"
    Options = MarginOptions
    needs_inputs = True

    def run(self, ctx: pyengine.Context, options: MarginOptions) -> MarginResult:
        predictions, margins = [], []
        with torch.no_grad():
            for rows in ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name):
                best = ctx.scores(rows).topk(options.top, dim=1)
                predictions.append(best.indices[:, 0].cpu())
                margins.append((best.values[:, 0] - best.values[:, -1]).cpu())
        margin = torch.cat(margins)
        return MarginResult(predictions=torch.cat(predictions), margins=margin, mean_margin=float(margin.mean()))


@pyengine.hookimpl
def register_techniques(register: Any) -> None:
    register(LogitMargin)
    register(UnitAblation)
