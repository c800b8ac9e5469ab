"""pyengine: an interpretability engine for PyTorch models.

``pyengine.run(name, model, inputs, **options)`` runs a technique,
``pyengine.techniques()`` lists them, ``pyengine.capture(...)`` stores activations.
"""

from __future__ import annotations

from pyengine.api import run
from pyengine.capture import capture
from pyengine.context import Context
from pyengine.errors import NotFoundError, OptionsError, PluginError, PyengineError, StoreError
from pyengine.hookspecs import hookimpl
from pyengine.host import techniques
from pyengine.layers import Layer
from pyengine.store import StoreReader
from pyengine.technique import (
    ColourScale,
    Figure,
    Options,
    Result,
    RowOptions,
    Technique,
    UnitRef,
    bad_option,
    option,
)

__version__ = "0.1.0"

__all__ = [
    "Context",
    "ColourScale",
    "Figure",
    "Layer",
    "NotFoundError",
    "Options",
    "OptionsError",
    "PluginError",
    "PyengineError",
    "Result",
    "RowOptions",
    "StoreError",
    "StoreReader",
    "Technique",
    "UnitRef",
    "bad_option",
    "capture",
    "hookimpl",
    "option",
    "run",
    "techniques",
]
