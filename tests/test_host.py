"""The plugin host: registration, duplicates, options validation, run(), no hook leaks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import pyengine
from conftest import hooks_on
from pyengine import host
from pyengine.errors import NotFoundError, OptionsError, PluginError, PyengineError


@dataclass(frozen=True)
class CountOptions(pyengine.Options):
    scale: float = 1.0
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise pyengine.bad_option("scale", self.scale, "a positive number")


@dataclass(frozen=True, kw_only=True)
class CountResult(pyengine.Result):
    total: float
    per_layer: dict[str, torch.Tensor]


class CountTechnique(pyengine.Technique):
    name = "test-count"
    summary = "sums layer outputs (test technique)"
    Options = CountOptions
    needs_inputs = True

    def run(self, ctx: pyengine.Context, options: CountOptions) -> CountResult:
        seen: dict[str, torch.Tensor] = {}
        with ctx.hooks() as scope:
            for name in options.layers:
                scope.forward(ctx.module(name), lambda m, a, out, name=name: seen.__setitem__(name, out.sum().detach()))
            ctx.model(ctx.require_inputs(self.name))
            if "boom" in options.layers:
                raise RuntimeError("failure inside the hook scope")
        return CountResult(total=float(sum(seen.values(), torch.tensor(0.0))) * options.scale, per_layer=seen)


class Plugin:
    def __init__(self, *techniques: type[pyengine.Technique]) -> None:
        self.techniques = techniques

    @pyengine.hookimpl
    def register_techniques(self, register: Any) -> None:
        for technique in self.techniques:
            register(technique)


@pytest.fixture
def registered() -> Any:
    added: list[str] = []

    def add(name: str, *techniques: type[pyengine.Technique]) -> None:
        host.load_plugins()
        host.pm.register(Plugin(*techniques), name=name)
        added.append(name)

    yield add
    for name in added:
        host.pm.unregister(name=name)


def test_builtins_are_registered_like_plugins() -> None:
    found = pyengine.techniques()
    assert "gram-spectrum" in found
    assert issubclass(found["gram-spectrum"], pyengine.Technique)
    assert host.technique_plugins()["gram-spectrum"] == "pyengine.plugins.degeneracy"
    assert {"demo-cnn", "demo-mlp"} <= set(host.models())
    assert "shapes" in host.datasets()


def test_duplicate_technique_names_both_plugins(registered: Any) -> None:
    registered("first-plugin", CountTechnique)
    registered("second-plugin", CountTechnique)
    with pytest.raises(PluginError, match="'test-count' is registered by two plugins") as info:
        pyengine.techniques()
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)


def test_a_plugin_cannot_shadow_a_builtin(registered: Any) -> None:
    class Impostor(CountTechnique):
        name = "gram-spectrum"

    registered("impostor", Impostor)
    with pytest.raises(PluginError, match="pyengine.plugins.degeneracy"):
        pyengine.techniques()


def test_bad_registrations_are_named(registered: Any) -> None:
    class NoName(CountTechnique):
        name = "Bad Name"

    registered("bad-name", NoName)
    with pytest.raises(PluginError, match="lowercase-dashed"):
        pyengine.techniques()
    host.pm.unregister(name="bad-name")

    class NotTechnique:
        name = "x"

    host.pm.register(Plugin(NotTechnique), name="not-technique")  # type: ignore[arg-type]
    try:
        with pytest.raises(PluginError, match="plugin 'not-technique' registered .*expected a pyengine.Technique"):
            pyengine.techniques()
    finally:
        host.pm.unregister(name="not-technique")


def test_options_validate_themselves(registered: Any) -> None:
    registered("counting", CountTechnique)
    with pytest.raises(OptionsError, match=r"test-count: unknown option 'scael'; valid options: scale, layers"):
        CountTechnique.options(scael=2)
    with pytest.raises(OptionsError, match=r"option scale=-1 is invalid: expected a positive number"):
        pyengine.run("test-count", nn.Identity(), torch.ones(2), scale=-1)
    with pytest.raises(dataclasses_frozen_error()):
        CountTechnique.options(scale=2).scale = 3  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_run_api(registered: Any, small_cnn: nn.Module) -> None:
    registered("counting", CountTechnique)
    inputs = torch.rand(3, 3, 16, 16)
    result = pyengine.run("test-count", small_cnn, inputs, layers=("features.conv1",), scale=2.0)
    expected = small_cnn.features.conv1(inputs).sum().detach() * 2
    assert result.total == pytest.approx(float(expected), rel=1e-5)
    assert set(result.arrays()) == {"per_layer/features.conv1"}
    assert result.scalars() == {"total": result.total, "rows": "3 given inputs"}
    with pytest.raises(NotFoundError, match="unknown technique 'nope'; registered: .*gram-spectrum"):
        pyengine.run("nope", small_cnn)
    with pytest.raises(PyengineError, match="test-count needs inputs"):
        pyengine.run("test-count", small_cnn)
    with pytest.raises(
        NotFoundError,
        match=r"no layer 'features.conv9' in DemoCNN; closest: features.conv3, features.conv2, features.conv1",
    ):
        pyengine.run("test-count", small_cnn, inputs, layers=("features.conv9",))
    assert hooks_on(small_cnn) == []


def test_hooks_are_removed_when_a_technique_fails(registered: Any, small_cnn: nn.Module) -> None:
    registered("counting", CountTechnique)
    small_cnn.boom = nn.Identity()
    with pytest.raises(RuntimeError, match="failure inside the hook scope"):
        pyengine.run("test-count", small_cnn, torch.rand(1, 3, 16, 16), layers=("features.conv1", "boom"))
    assert hooks_on(small_cnn) == []


def test_run_restores_training_mode(registered: Any, small_cnn: nn.Module) -> None:
    registered("counting", CountTechnique)
    small_cnn.train()
    pyengine.run("test-count", small_cnn, torch.rand(1, 3, 16, 16))
    assert small_cnn.training


@pytest.mark.parametrize("name", sorted(pyengine.techniques()))
def test_every_registered_technique_leaves_no_hooks(
    name: str, small_cnn: nn.Module, small_shapes: Any, tmp_path: Any
) -> None:
    store = pyengine.capture(
        small_cnn, small_shapes, ["features.relu1", "classifier.relu4"], tmp_path / "a.h5", progress=False
    )
    technique = pyengine.techniques()[name]
    inputs = small_shapes.batch(range(4)).inputs if technique.needs_inputs else None
    rows = {"stop": 4} if technique.explains_inputs else {}
    result = pyengine.run(name, small_cnn, inputs, data=small_shapes, store=store, progress=False, **rows)
    assert hooks_on(small_cnn) == []
    if technique.needs_data:
        assert result.rows, "the result says which rows were analysed"


def test_saved_results_carry_options_and_scalars(registered: Any, small_cnn: nn.Module, tmp_path: Any) -> None:
    registered("counting", CountTechnique)
    inputs = torch.rand(2, 3, 16, 16)
    path = tmp_path / "results.h5"
    first = pyengine.run("test-count", small_cnn, inputs, save=path, layers=("features.conv1",))
    pyengine.run("test-count", small_cnn, inputs, save=path, layers=("features.conv1",), scale=3.0)
    with pyengine.StoreReader(path) as reader:
        assert reader.results() == [("test-count", "run-001"), ("test-count", "run-002")]
        arrays, attrs = reader.result("test-count", "run-001")
    assert torch.equal(arrays["per_layer/features.conv1"], first.per_layer["features.conv1"])
    assert attrs["total"] == pytest.approx(first.total)
    assert '"scale": 1.0' in attrs["options"]
    with pytest.raises(pyengine.StoreError, match="exists; choose another run name"):
        pyengine.run("test-count", small_cnn, inputs, save=path, run_name="run-001")


def test_option_helpers_name_the_option() -> None:
    @dataclass(frozen=True)
    class Numbers(pyengine.Options):
        steps: int = 1
        rate: float = 0.1

        def validate(self) -> None:
            self.require_int("steps")
            self.require_number("rate", positive=True)

    with pytest.raises(OptionsError, match=r"option steps=0 is invalid: expected a positive integer"):
        Numbers(steps=0)
    with pytest.raises(OptionsError, match=r"option steps=True is invalid"):
        Numbers(steps=True)
    with pytest.raises(OptionsError, match=r"option rate=0 is invalid: expected a positive number"):
        Numbers(rate=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_an_absent_gpu_is_a_clear_error(small_cnn: nn.Module) -> None:
    with pytest.raises(PyengineError, match="device='cuda' is not available: this torch sees no CUDA GPU"):
        pyengine.run("gram-spectrum", small_cnn, torch.rand(2, 3, 16, 16), device="cuda")


@dataclass(frozen=True)
class ConstantOptions(pyengine.RowOptions):
    target: Any = pyengine.option(0, "the explained class")


class ConstantMaps(pyengine.Technique):
    """A third-party attribution technique: every element gets target + 1, the last pixel 10x."""

    name = "test-constant-maps"
    summary = "constant maps (test technique)"
    Options = ConstantOptions
    attribution = True

    def run(self, ctx: pyengine.Context, options: Any) -> Any:
        from pyengine.attribution import AttributionResult, resolve_targets

        maps, targets, index = [], [], []
        offset = 0
        for rows in ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name):
            t = resolve_targets(options.target, ctx.model, rows.inputs, rows.labels, offset)[:, 0]
            offset += len(rows)
            m = torch.ones_like(rows.inputs) * (t.to(rows.inputs) + 1).view(-1, 1, 1, 1)
            m[..., -1, -1] *= 10
            maps.append(m.cpu())
            targets.append(t)
            index.append(rows.index)
        return AttributionResult(
            technique=self.name, attributions=torch.cat(maps), targets=torch.cat(targets), index=torch.cat(index)
        )


def test_a_third_party_attribution_technique_is_smoothed_and_scored(
    registered: Any, small_cnn: nn.Module, small_shapes: Any
) -> None:
    registered("constant", ConstantMaps)
    x = small_shapes.batch(range(3)).inputs
    smoothed = pyengine.run(
        "smoothgrad", small_cnn, x, base="test-constant-maps", target=[0, 1, 2], samples=3, square=True, progress=False
    )
    expected = torch.ones_like(x) * torch.tensor([1.0, 4.0, 9.0]).view(-1, 1, 1, 1)
    expected[..., -1, -1] *= 100
    assert torch.allclose(smoothed.attributions, expected)
    scored = pyengine.run(
        "faithfulness",
        small_cnn,
        data=small_shapes,
        techniques=["test-constant-maps"],
        stop=6,
        curves=False,
        progress=False,
    )
    batch = small_shapes.batch(range(6))
    x, y = batch.inputs.shape[-1] - 0.5, batch.inputs.shape[-2] - 0.5  # the centre of the peak, the last pixel
    boxes = batch.boxes
    hit = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    assert scored.pointing["test-constant-maps"] == pytest.approx(float(hit.double().mean()))
    assert "6 rows 0-5 of dataset" in scored.rows
