"""The one forward-recording mechanism: layer references, calls, tuple elements, in-place safety."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pyengine
from conftest import hooks_on
from pyengine.errors import NotFoundError, PyengineError
from pyengine.layers import LayerRef, record, trace


class Block(nn.Module):
    """torchvision's idiom: one ``self.relu`` called twice and an in-place residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.fc1(x))
        out = self.fc2(out)
        out += x
        return self.relu(out)


class Pair(nn.Module):
    """A module returning a tuple, as attention blocks and RNNs do."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.pair, self.head = Block(), Pair(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.pair(self.block(x))
        return self.head(first - second)


def by_hand(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    hidden = torch.relu(net.block.fc1(x))
    fc2 = net.block.fc2(hidden)
    out = torch.relu(fc2 + x)
    return {"relu#1": hidden, "relu#2": out, "fc2": fc2, "pair[0]": out * 2, "pair[1]": out + 1}


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_references_parse_and_print() -> None:
    assert LayerRef.parse("layer1.0.relu") == LayerRef("layer1.0.relu")
    assert LayerRef.parse("blocks.0.attn[1]#2") == LayerRef("blocks.0.attn", element=1, call=2)
    assert LayerRef.parse("blocks.0.attn#2[1]") == LayerRef("blocks.0.attn", element=1, call=2)
    assert str(LayerRef.parse("a.b[0]#3")) == "a.b#3[0]"
    for bad in ("a[x]", "a#0", "a#-1", "a#1[0]#2", "a@1"):
        with pytest.raises(PyengineError, match=rf"layer '{re.escape(bad)}' is invalid: expected a module path"):
            LayerRef.parse(bad)


def test_calls_elements_and_in_place_adds_are_recorded_as_returned(net: Net) -> None:
    """fc2's output is changed by ``out += x`` and the first ReLU's by nothing: both are
    recorded as the module returned them, on every pass."""
    names = ["block.relu#1", "block.relu#2", "block.fc2", "pair[0]", "pair[1]"]
    with record(net, names) as seen, torch.no_grad():
        for _ in range(3):  # the first pass finds out what to copy; later passes rely on it
            x = torch.randn(5, 4)
            net(x)
            assert seen.calls("block.relu#1") == 2
            values = {name: seen[name] for name in names}
            expected = by_hand(net, x)
            for name in names:
                torch.testing.assert_close(values[name], expected[name.removeprefix("block.")], msg=name)
    assert hooks_on(net) == []


def test_only_values_the_model_changes_are_copied(net: Net) -> None:
    """After the first pass, a value the model leaves alone is the model's own tensor (no copy);
    one it changes in place (fc2's, by ``out += x``) is copied on every pass."""
    produced: dict[str, torch.Tensor] = {}
    net.pair.register_forward_hook(lambda m, a, out: produced.update(pair=out[0]))
    net.block.fc2.register_forward_hook(lambda m, a, out: produced.update(fc2=out))
    shared = []
    with record(net, ["pair[0]", "block.fc2"]) as seen, torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 4))
            shared.append(
                {
                    k: seen[n].data_ptr() == produced[k].data_ptr()
                    for k, n in [("pair", "pair[0]"), ("fc2", "block.fc2")]
                }
            )
    assert shared == [{"pair": False, "fc2": False}] + [{"pair": True, "fc2": False}] * 2


def test_a_module_run_several_times_needs_a_call_number(net: Net) -> None:
    with record(net, ["block.relu"]) as seen, torch.no_grad():
        net(torch.randn(2, 4))
        with pytest.raises(
            PyengineError,
            match=r"module 'block.relu' ran 2 times in one forward pass; name the call, e.g. 'block.relu#2'",
        ):
            seen["block.relu"]


def test_gradients_toward_a_value_the_model_changes_in_place(net: Net) -> None:
    """fc2's output is changed by ``out += x`` after fc2 returned it: with gradients the
    recorded value is still fc2's output, and the gradient toward it is the true one."""
    x = torch.randn(3, 4)
    with record(net, ["block.fc2"], grad=True) as seen:
        for _ in range(2):
            out = net(x)
            value = seen["block.fc2"]
            (grad,) = torch.autograd.grad(out[:, 0].sum(), value)
            torch.testing.assert_close(value, by_hand(net, x)["fc2"])
    fc2 = by_hand(net, x)["fc2"].detach().requires_grad_(True)
    mid = torch.relu(fc2 + x)
    reference = torch.autograd.grad(net.head(mid * 2 - (mid + 1))[:, 0].sum(), fc2)[0]
    torch.testing.assert_close(grad, reference)
    with torch.no_grad():
        torch.testing.assert_close(net(x), out)  # the recording did not change the output


def test_gradients_toward_a_layer_of_a_frozen_model(net: Net) -> None:
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 4)
    with record(net, ["block.relu#1"], grad=True) as seen:
        out = net(x)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), seen["block.relu#1"])
    hidden = torch.relu(net.block.fc1(x)).requires_grad_(True)
    mid = torch.relu(net.block.fc2(hidden) + x)
    reference = torch.autograd.grad(net.head(mid * 2 - (mid + 1))[:, 1].sum(), hidden)[0]
    torch.testing.assert_close(grad, reference)


def test_edit_replaces_the_value_in_the_forward_pass(net: Net) -> None:
    x = torch.randn(3, 4)
    with record(net, ["pair[0]"], edit={"pair[0]": torch.zeros_like}) as seen, torch.no_grad():
        out = net(x)
        assert torch.equal(seen["pair[0]"], torch.zeros(3, 4))
    torch.testing.assert_close(out, net.head(-(by_hand(net, x)["relu#2"] + 1)))


def test_clear_errors(net: Net) -> None:
    with pytest.raises(NotFoundError, match="no layer 'block.fc3'"):
        with record(net, ["block.fc3"]):
            pass
    with pytest.raises(PyengineError, match=r"returned a tuple of 2; expected a tensor; name one element"):
        with record(net, ["pair"]), torch.no_grad():
            net(torch.randn(1, 4))
    with pytest.raises(PyengineError, match="call #5 does not exist"):
        with record(net, ["block.relu#5"]), torch.no_grad():
            net(torch.randn(1, 4))
    assert hooks_on(net) == []


def test_trace_lists_leaf_calls_in_order_and_stops(net: Net) -> None:
    with trace(net, until=net.block.fc2) as traced, torch.no_grad():
        net(torch.randn(1, 4))
    assert [c.name for c in traced.calls] == ["block.fc1", "block.relu", "block.fc2"]
    assert hooks_on(net) == []


def test_capture_reads_a_tuple_element_and_a_call(net: Net, tmp_path) -> None:
    data = torch.randn(6, 4)
    path = pyengine.capture(net, data, ["pair[1]", "block.relu#1"], tmp_path / "a.h5", dtype="float32", progress=False)
    expected = by_hand(net, data)
    with pyengine.StoreReader(path) as store:
        torch.testing.assert_close(next(store.iter_layer("pair[1]")), expected["pair[1]"].detach())
        torch.testing.assert_close(next(store.iter_layer("block.relu#1")), expected["relu#1"].detach())


class Encoder(nn.Module):
    """A Hugging Face-style module returning a dict-like output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.fc(x)
        return {"last_hidden_state": hidden, "pooled": hidden.mean(1)}


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = Encoder(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)["last_hidden_state"]))


def test_a_python_selector_reads_and_differentiates_a_dict_output() -> None:
    torch.manual_seed(0)
    net, x = EncoderNet().eval(), torch.randn(3, 4)
    layer = pyengine.Layer("encoder", lambda out: out["last_hidden_state"], name="encoder.hidden")
    assert layer == "encoder.hidden" and isinstance(layer, str)
    for p in net.parameters():
        p.requires_grad_(False)
    with record(net, [layer], grad=True) as seen:
        out = net(x)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), seen[layer])
    hidden = net.encoder.fc(x).requires_grad_(True)
    expected = torch.autograd.grad(net.head(torch.tanh(hidden))[:, 1].sum(), hidden)[0]
    torch.testing.assert_close(grad, expected)
    result = pyengine.run("gram-spectrum", net, x, layers=[layer], progress=False)
    assert result.units == {"encoder.hidden": 4}
    with pytest.raises(PyengineError, match="its selector returned a tuple of 1; expected a tensor"):
        with record(net, [pyengine.Layer("encoder", lambda out: (out["pooled"],))]) as seen, torch.no_grad():
            net(x)
