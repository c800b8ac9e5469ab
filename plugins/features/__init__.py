"""Feature visualization: what a unit responds to.

First-layer filters, feature maps of given inputs, maximally activating dataset patches
cropped to exact receptive fields, and activation maximization.
"""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.plugins.features.activation_max import ActivationMaximization
from pyengine.plugins.features.units import Activations, Filters, MaxPatches


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in (Filters, Activations, MaxPatches, ActivationMaximization):
        register(technique)
