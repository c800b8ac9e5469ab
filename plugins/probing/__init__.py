"""Probing: can a concept be read from a layer's units, on held-out data?

Single-neuron, linear and MLP probes, each scored against a control task.
"""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.plugins.probing.probes import ProbeLinear, ProbeMLP, ProbeNeurons


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in (ProbeNeurons, ProbeLinear, ProbeMLP):
        register(technique)
