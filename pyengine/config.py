"""``pyengine run CONFIG.toml``: the config file, validated before anything runs.

device = "cpu"             # optional
out = "results.h5"         # results file (relative paths: to the config file)
seed = 0

[model]
name = "demo-cnn"          # a registered model, or: factory = "package.module:callable"
args = {}                  # keyword arguments for the factory
weights = "weights.pt"     # optional state_dict, loaded with torch.load(weights_only=True)

[data]
name = "shapes"            # a registered dataset
args = { n = 256, seed = 1 }
inputs = 8                 # the first rows are given to techniques as `inputs`
store = "acts.h5"          # optional activation store

[[technique]]
name = "gram-spectrum"
options = { center = true }
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pyengine import host
from pyengine.data.base import Dataset, as_dataset
from pyengine.errors import PyengineError
from pyengine.train import load_weights


@dataclass(frozen=True)
class ModelSpec:
    name: str = ""
    factory: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None


@dataclass(frozen=True)
class DataSpec:
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    inputs: int = 8
    store: Path | None = None


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    run: str = ""


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    data: DataSpec | None
    techniques: tuple[TechniqueSpec, ...]
    out: Path
    device: str | None = None
    seed: int = 0


def _table(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PyengineError(f"{where} must be a table, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PyengineError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")
    return value


def _typed(where: str, value: Any, kind: type | tuple[type, ...], expected: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise PyengineError(f"{where}={value!r} is invalid: expected {expected}")
    return value


def load_config(path: str | Path) -> RunConfig:
    """Parse and check a run config; every error names the key and what is expected."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PyengineError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise PyengineError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError:
        raise PyengineError(f"{path}: not a UTF-8 text file; expected a TOML config") from None
    base = path.parent
    top = _table(str(path), raw, {"device", "out", "seed", "model", "data", "technique"})

    model_raw = _table("[model]", top.get("model", {}), {"name", "factory", "args", "weights"})
    if bool(model_raw.get("name")) == bool(model_raw.get("factory")):
        raise PyengineError('[model] needs exactly one of name = "<registered model>" or factory = "module:callable"')
    model = ModelSpec(
        name=_typed("model.name", model_raw.get("name", ""), str, "a string"),
        factory=_typed("model.factory", model_raw.get("factory", ""), str, "'module:callable'"),
        args=_table("model.args", model_raw.get("args", {}), set(model_raw.get("args", {}) or {})),
        weights=base / _typed("model.weights", model_raw["weights"], str, "a path") if "weights" in model_raw else None,
    )

    data = None
    if "data" in top:
        data_raw = _table("[data]", top["data"], {"name", "args", "inputs", "store"})
        inputs = _typed("data.inputs", data_raw.get("inputs", 8), int, "a non-negative integer")
        if inputs < 0:
            raise PyengineError(f"data.inputs={inputs} is invalid: expected a non-negative integer")
        data = DataSpec(
            name=_typed("data.name", data_raw.get("name", ""), str, "a registered dataset name"),
            args=_table("data.args", data_raw.get("args", {}), set(data_raw.get("args", {}) or {})),
            inputs=inputs,
            store=base / _typed("data.store", data_raw["store"], str, "a path") if "store" in data_raw else None,
        )

    entries = top.get("technique", [])
    if not isinstance(entries, list) or not entries:
        raise PyengineError(f"{path}: no [[technique]] entries; expected at least one")
    techniques = []
    for k, entry in enumerate(entries):
        item = _table(f"technique[{k}]", entry, {"name", "options", "run"})
        name = _typed(f"technique[{k}].name", item.get("name"), str, "a technique name")
        options = _table(f"technique[{k}].options", item.get("options", {}), set(item.get("options", {}) or {}))
        techniques.append(
            TechniqueSpec(name, options, _typed(f"technique[{k}].run", item.get("run", ""), str, "a run name"))
        )

    out = base / _typed("out", top.get("out", "results.h5"), str, "a path")
    device = _typed("device", top["device"], str, "a torch device like 'cpu' or 'cuda:0'") if "device" in top else None
    return RunConfig(model, data, tuple(techniques), out, device, _typed("seed", top.get("seed", 0), int, "an integer"))


def import_callable(reference: str) -> Any:
    """``package.module:attribute`` -> the attribute."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PyengineError(f"factory={reference!r} is invalid: expected 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise PyengineError(f"factory={reference!r}: cannot import {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PyengineError(f"factory={reference!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise PyengineError(f"factory={reference!r} is not callable")
    return target


def build_model(spec: ModelSpec) -> nn.Module:
    factory = host.get_entry("model", spec.name).factory if spec.name else import_callable(spec.factory)
    try:
        model = host.build_seeded(factory, **spec.args)
    except TypeError as error:
        raise PyengineError(f"model arguments {dict(spec.args)} rejected: {error}") from None
    if not isinstance(model, nn.Module):
        raise PyengineError(f"model factory returned {type(model).__name__}; expected an nn.Module")
    if spec.weights is not None:
        load_weights(model, spec.weights)
    return model.eval()


def build_dataset(name: str, args: Mapping[str, Any]) -> Dataset:
    factory = host.get_entry("dataset", name).factory
    try:
        return as_dataset(factory(**args))
    except TypeError as error:
        raise PyengineError(f"dataset {name!r} arguments {dict(args)} rejected: {error}") from None
