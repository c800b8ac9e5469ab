"""The plugin contract: hooks only discover things. Implement any of them with ``hookimpl``."""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("pyengine")
hookimpl = pluggy.HookimplMarker("pyengine")


@hookspec
def register_techniques(register: Any) -> None:
    """Call ``register(TechniqueClass)`` for each technique the plugin provides."""


@hookspec
def register_models(register: Any) -> None:
    """Call ``register(name, factory, summary=...)``; ``factory(**kwargs)`` returns an nn.Module."""


@hookspec
def register_datasets(register: Any) -> None:
    """Call ``register(name, factory, summary=...)``; ``factory(**kwargs)`` returns a dataset."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add CLI subcommands: ``cli`` is the argparse subparsers object; set ``handler=``."""
