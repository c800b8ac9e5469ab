"""unit-ablation against plain forward hooks, and the host behaviour a plugin gets for free: the
built-ins' one-line error for a mistyped layer (Python and CLI), their progress bar, the seeded rng."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pyengine
from pyengine import context, figures

CLI = Path(sys.executable).parent / "pyengine"


class SharedReLUNet(nn.Module):
    """torchvision's idiom: one ``self.relu`` called twice, ``out += identity`` on a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.conv1(x))
        out = self.conv2(identity)
        out += identity
        return self.head(self.relu(out).mean((2, 3)))


def model_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SharedReLUNet().eval()
    for conv in (model.conv1, model.conv2):
        nn.init.uniform_(conv.weight, -0.5, 0.5)  # larger than the default init: units matter
    return model, torch.rand(5, 3, 8, 8)


def zeroed_call(module: nn.Module, call: int, unit: int) -> Any:
    """A forward hook zeroing channel ``unit`` of the module's ``call``-th output (per pass)."""
    seen = {"calls": 0}

    def hook(_: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        seen["calls"] += 1
        if seen["calls"] != call:
            return None
        output = output.clone()
        output[:, unit] = 0
        return output

    def reset(_: nn.Module, args: Any) -> None:
        seen["calls"] = 0

    return hook, reset


def test_drops_equal_plain_hooks() -> None:
    model, x = model_and_inputs()
    layers = ["conv2", "relu#1", "relu#2"]
    res = pyengine.run("unit-ablation", model, x, layers=layers, units=0, target="predicted", progress=False)
    with torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(1)
    assert torch.equal(res.targets, predicted)
    for layer in layers:
        path, _, call = layer.partition("#")
        assert torch.equal(res.units[layer], torch.arange(6))
        expected = []
        for unit in range(6):
            hook, reset = zeroed_call(model.get_submodule(path), int(call or 1), unit)
            handles = [model.get_submodule(path).register_forward_hook(hook), model.register_forward_pre_hook(reset)]
            with torch.no_grad():
                ablated = model(x)
            for handle in handles:
                handle.remove()
            expected.append(logits.gather(1, predicted[:, None])[:, 0] - ablated.gather(1, predicted[:, None])[:, 0])
        torch.testing.assert_close(res.drops[layer], torch.stack(expected, 1), rtol=0, atol=1e-5)
        assert res.drops[layer].abs().max() > 1e-2  # the ablations do change the output
    assert res.unit_axis == {layer: "channels" for layer in layers}


def test_units_drawn_from_the_seeded_rng() -> None:
    model, x = model_and_inputs()
    runs = [
        pyengine.run("unit-ablation", model, x, layers=["conv2"], units=3, seed=s, progress=False) for s in (0, 0, 1)
    ]
    drawn = [run.units["conv2"] for run in runs]
    assert torch.equal(drawn[0], drawn[1])
    expected = [torch.randperm(6, generator=torch.Generator().manual_seed(s))[:3].sort().values for s in (0, 1)]
    assert torch.equal(drawn[0], expected[0]) and torch.equal(drawn[2], expected[1])
    everything = pyengine.run("unit-ablation", model, x, layers=["conv2"], units=0, progress=False)
    columns = [int(u) for u in drawn[2]]
    torch.testing.assert_close(runs[2].drops["conv2"], everything.drops["conv2"][:, columns])


def test_default_layers_and_figure() -> None:
    model, x = model_and_inputs()
    res = pyengine.run("unit-ablation", model, x, units=2, progress=False)
    assert list(res.drops) == ["relu#1", "relu#2"]  # every call of a nonlinearity module, by the host's rule
    assert "layers=relu#1, relu#2 (every nonlinearity's output)" in res.defaults
    means = torch.stack([res.drops[layer].mean(0).sort(descending=True).values for layer in ("relu#1", "relu#2")])
    expected = figures.heatmap(means)
    (figure,) = res.figures
    factor = figure.image.shape[-1] // 2
    torch.testing.assert_close(figure.image[:, ::factor, ::factor], expected)


def test_a_mistyped_layer_is_the_builtins_error() -> None:
    model, x = model_and_inputs()
    messages = []
    for name in ("unit-ablation", "activations", "gram-spectrum", "grad-cam"):
        with pytest.raises(pyengine.PyengineError) as caught:
            pyengine.run(name, model, x, layers=["reluu"], progress=False)
        messages.append(str(caught.value))
    assert len(set(messages)) == 1 and "\n" not in messages[0], messages
    assert messages[0] == "no layer 'reluu' in SharedReLUNet; closest: relu"
    with pytest.raises(pyengine.PyengineError) as caught:  # a shared module without its call number
        pyengine.run("unit-ablation", model, x, layers=["relu"], progress=False)
    with pytest.raises(pyengine.PyengineError) as builtin:
        pyengine.run("gram-spectrum", model, x, layers=["relu"], progress=False)
    assert str(caught.value) == str(builtin.value)
    assert "ran 2 times in one forward pass; name the call, e.g. 'relu#2'" in str(caught.value)


CONFIG = """out = "r.h5"
[model]
name = "demo-cnn"
args = {{ width = 4, image_size = 16 }}
[data]
name = "shapes"
args = {{ n = 8, size = 16 }}
inputs = 4
[[technique]]
name = "{technique}"
options = {{ layers = ["features.relu9"] }}
"""


def test_a_mistyped_layer_on_the_cli(tmp_path: Path) -> None:
    lines = []
    for technique in ("unit-ablation", "gram-spectrum"):
        config = tmp_path / f"{technique}.toml"
        config.write_text(CONFIG.format(technique=technique))
        result = subprocess.run([str(CLI), "-q", "run", str(config)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        lines.append(result.stderr.strip())
    assert (
        lines[0]
        == lines[1]
        == (
            "pyengine: error: no layer 'features.relu9' in DemoCNN; "
            "closest: features.relu3, features.relu2, features.relu1"
        )
    )


def test_progress_goes_through_the_hosts_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Any] = []

    class Recorded(context.Progress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(context, "Progress", Recorded)
    model, x = model_and_inputs()
    pyengine.run("unit-ablation", model, x, batch_size=2, layers=["conv1"], progress=True)
    pyengine.run("saliency", model, x, batch_size=2, progress=True)
    assert [(bar.desc, bar.total, bar.count, bar.enabled) for bar in bars] == [
        ("unit-ablation", 5, 5, True),
        ("saliency", 5, 5, True),
    ]
    bars.clear()
    pyengine.run("unit-ablation", model, x, layers=["conv1"], progress=False)
    assert [bar.enabled for bar in bars] == [False]
