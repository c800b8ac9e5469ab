"""pyengine: an interpretability engine for PyTorch models.

``pyengine.run(name, model, inputs, **options)`` runs a technique,
``pyengine.techniques()`` lists them, ``pyengine.capture(...)`` stores activations.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pyengine.api import run  # noqa: E402
from pyengine.capture import capture  # noqa: E402
from pyengine.context import Context  # noqa: E402
from pyengine.errors import NotFoundError, OptionsError, PluginError, PyengineError, StoreError  # noqa: E402
from pyengine.hookspecs import hookimpl  # noqa: E402
from pyengine.host import techniques  # noqa: E402
from pyengine.store import StoreReader  # noqa: E402
from pyengine.technique import Figure, Options, Result, Technique, bad_option  # noqa: E402

__all__ = [
    "Context", "Figure", "NotFoundError", "Options", "OptionsError", "PluginError", "PyengineError",
    "Result", "StoreError", "StoreReader", "Technique", "bad_option", "capture", "hookimpl", "run",
    "techniques",
]
