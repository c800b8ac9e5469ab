"""The one forward-recording mechanism: layer references, calls, tuple elements, in-place safety."""

from __future__ import annotations

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
    return {"relu@0": hidden, "relu@1": out, "fc2": fc2, "pair[0]": out * 2, "pair[1]": out + 1}


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_references_parse_and_print() -> None:
    assert LayerRef.parse("layer1.0.relu") == LayerRef("layer1.0.relu")
    assert LayerRef.parse("blocks.0.attn[1]@2") == LayerRef("blocks.0.attn", element=1, call=2)
    assert str(LayerRef.parse("a.b[0]@-1")) == "a.b[0]"
    with pytest.raises(PyengineError, match=r"layer 'a\[x\]' is invalid: expected a module path"):
        LayerRef.parse("a[x]")


def test_calls_elements_and_in_place_adds_are_recorded_as_returned(net: Net) -> None:
    x = torch.randn(5, 4)
    names = ["block.relu@0", "block.relu@1", "block.relu", "block.fc2", "pair[0]", "pair[1]"]
    with record(net, names) as seen, torch.no_grad():
        net(x)
        assert seen.calls("block.relu") == 2
        values = {name: seen[name] for name in names}
    expected = by_hand(net, x)
    for name, key in [
        ("block.relu@0", "relu@0"),
        ("block.relu@1", "relu@1"),
        ("block.relu", "relu@1"),
        ("block.fc2", "fc2"),
        ("pair[0]", "pair[0]"),
        ("pair[1]", "pair[1]"),
    ]:
        torch.testing.assert_close(values[name], expected[key], msg=name)
    assert hooks_on(net) == []


def test_a_value_changed_in_place_is_refused_with_gradients(net: Net) -> None:
    """fc2's output is changed by ``out += x`` after fc2 returned it: with gradients the
    recorded tensor is the graph's, so reading it would give the sum; that is an error."""
    with record(net, ["block.fc2"], grad=True) as seen:
        net(torch.randn(2, 4))
        with pytest.raises(PyengineError, match="changed in place after the module returned it"):
            seen["block.fc2"]


def test_gradients_toward_a_layer_of_a_frozen_model(net: Net) -> None:
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 4)
    with record(net, ["block.relu@0"], grad=True) as seen:
        out = net(x)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), seen["block.relu@0"])
    hidden = torch.relu(net.block.fc1(x)).requires_grad_(True)
    mid = torch.relu(net.block.fc2(hidden) + x)
    reference = torch.autograd.grad(net.head(mid * 2 - (mid + 1))[:, 1].sum(), hidden)[0]
    torch.testing.assert_close(grad, reference)


def test_edit_replaces_the_value_in_the_forward_pass(net: Net) -> None:
    x = torch.randn(3, 4)
    with record(net, ["pair[0]"], edit={"pair[0]": torch.zeros_like}) as seen, torch.no_grad():
        out = net(x)
        assert torch.equal(seen["pair[0]"], torch.zeros(3, 4))
    torch.testing.assert_close(out, net.head(-(by_hand(net, x)["relu@1"] + 1)))


def test_clear_errors(net: Net) -> None:
    with pytest.raises(NotFoundError, match="no layer 'block.fc3'"):
        with record(net, ["block.fc3"]):
            pass
    with pytest.raises(PyengineError, match=r"returned a tuple of 2; expected a tensor; name one element"):
        with record(net, ["pair"]), torch.no_grad():
            net(torch.randn(1, 4))
    with pytest.raises(PyengineError, match="call 5 does not exist"):
        with record(net, ["block.relu@5"]), torch.no_grad():
            net(torch.randn(1, 4))
    assert hooks_on(net) == []


def test_trace_lists_leaf_calls_in_order_and_stops(net: Net) -> None:
    with trace(net, until=net.block.fc2) as traced, torch.no_grad():
        net(torch.randn(1, 4))
    assert [c.name for c in traced.calls] == ["block.fc1", "block.relu", "block.fc2"]
    assert hooks_on(net) == []


def test_capture_reads_a_tuple_element_and_a_call(net: Net, tmp_path) -> None:
    data = torch.randn(6, 4)
    path = pyengine.capture(net, data, ["pair[1]", "block.relu@0"], tmp_path / "a.h5", dtype="float32", progress=False)
    expected = by_hand(net, data)
    with pyengine.StoreReader(path) as store:
        torch.testing.assert_close(next(store.iter_layer("pair[1]")), expected["pair[1]"].detach())
        torch.testing.assert_close(next(store.iter_layer("block.relu@0")), expected["relu@0"].detach())
