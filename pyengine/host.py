"""The plugin host: one pluggy PluginManager, the built-in plugins, the registries."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from pyengine import hookspecs
from pyengine.errors import NotFoundError, PluginError
from pyengine.technique import Technique

ENTRY_POINT_GROUP = "pyengine"
DEFAULT_PLUGINS = (
    "pyengine.models",
    "pyengine.data",
    "pyengine.plugins.attribution",
    "pyengine.plugins.features",
    "pyengine.plugins.probing",
    "pyengine.plugins.pathwise",
    "pyengine.plugins.degeneracy",
)

pm = pluggy.PluginManager("pyengine")
pm.add_hookspecs(hookspecs)
_loaded = False
_packages: dict[str, str] = {}  # plugin name -> "distribution version"


def load_plugins() -> None:
    """Register installed entry-point plugins (``PYENGINE_LOAD_PLUGINS`` restricts which), then the built-ins."""
    global _loaded
    if _loaded:
        return
    available = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    selected = os.environ.get("PYENGINE_LOAD_PLUGINS")
    names = sorted(available) if selected is None else [n for n in (p.strip() for p in selected.split(",")) if n]
    for name in names:
        if name not in available:
            known = ", ".join(sorted(available)) or "none installed"
            raise PluginError(
                f"PYENGINE_LOAD_PLUGINS names {name!r}, which is not an installed pyengine plugin (installed: {known})"
            )
        if pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        entry_point = available[name]
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party package must not look like our crash
            raise PluginError(f"plugin {name!r} ({entry_point.value}) failed to import: {error}") from error
        pm.register(plugin, name=name)
        if entry_point.dist is not None:
            _packages[name] = f"{entry_point.dist.name} {entry_point.dist.version}"
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    _loaded = True


MODEL_SEED = 0


def build_seeded(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """``factory(**kwargs)`` under a fixed seed: a model built by name without weights is the same
    model every time (so a killed capture can resume, two runs compare). The caller's RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        return factory(**kwargs)


@dataclass(frozen=True)
class Entry:
    """A registered model or dataset factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    summary: str
    plugin: str


def _collect(
    hook_name: str, make_register: Callable[[str, dict[str, Any], dict[str, str]], Callable[..., None]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Call one discovery hook plugin by plugin; returns (name -> thing, name -> plugin)."""
    load_plugins()
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        impl.function(register=make_register(impl.plugin_name, found, owners))
    return dict(sorted(found.items())), owners


def _claim(kind: str, name: str, plugin: str, owners: dict[str, str]) -> None:
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
    if name in owners:
        raise PluginError(f"{kind} name {name!r} is registered by two plugins: {owners[name]!r} and {plugin!r}")
    owners[name] = plugin


def _technique_registry() -> tuple[dict[str, type[Technique]], dict[str, str]]:
    def make_register(plugin: str, found: dict[str, Any], owners: dict[str, str]) -> Callable[..., None]:
        def register(technique: type[Technique]) -> None:
            if not (isinstance(technique, type) and issubclass(technique, Technique)):
                raise PluginError(f"plugin {plugin!r} registered {technique!r}; expected a pyengine.Technique subclass")
            technique.check_definition()
            _claim("technique", technique.name, plugin, owners)
            found[technique.name] = technique

        return register

    return _collect("register_techniques", make_register)


def techniques() -> dict[str, type[Technique]]:
    """Every registered technique, name -> Technique class."""
    return _technique_registry()[0]


def technique_plugins() -> dict[str, str]:
    """Technique name -> name of the plugin that registered it."""
    return _technique_registry()[1]


def _entries(hook_name: str, kind: str) -> dict[str, Entry]:
    def make_register(plugin: str, found: dict[str, Any], owners: dict[str, str]) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], summary: str = "") -> None:
            if not callable(factory):
                raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} with a non-callable factory")
            _claim(kind, name, plugin, owners)
            found[name] = Entry(name, factory, summary, plugin)

        return register

    return _collect(hook_name, make_register)[0]


def models() -> dict[str, Entry]:
    """Registered model factories."""
    return _entries("register_models", "model")


def datasets() -> dict[str, Entry]:
    """Registered dataset factories."""
    return _entries("register_datasets", "dataset")


def get_technique(name: str) -> type[Technique]:
    found = techniques()
    if name not in found:
        raise NotFoundError(f"unknown technique {name!r}; registered: {', '.join(found) or 'none'}")
    return found[name]


def get_entry(kind: str, name: str) -> Entry:
    found = models() if kind == "model" else datasets()
    if name not in found:
        raise NotFoundError(f"unknown {kind} {name!r}; registered: {', '.join(found) or 'none'}")
    return found[name]


def plugin_listing() -> list[dict[str, Any]]:
    """What ``pyengine plugins`` prints: each plugin with what it registered."""
    load_plugins()
    rows: dict[str, dict[str, Any]] = {}
    for plugin_object in pm.get_plugins():
        name = pm.get_name(plugin_object) or repr(plugin_object)
        rows[name] = {
            "name": name,
            "builtin": name in DEFAULT_PLUGINS,
            "package": _packages.get(name),
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin_object) or []),
            "techniques": [],
            "models": [],
            "datasets": [],
        }
    for technique, plugin in technique_plugins().items():
        rows[plugin]["techniques"].append(technique)
    for entry in models().values():
        rows[entry.plugin]["models"].append(entry.name)
    for entry in datasets().values():
        rows[entry.plugin]["datasets"].append(entry.name)
    return sorted(rows.values(), key=lambda row: (not row["builtin"], row["name"]))
