"""param_hash: every dtype and shape, layout- and device-independent, sensitive to every bit,
checked against SHA-256 over the values' bytes as numpy lays them out; BatchNorm models work."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from conftest import requires_cuda
from pyengine.capture import param_hash
from pyengine.errors import PyengineError
from pyengine.hashing import PARAM_HASH_FORMAT, value_bytes


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ``self.relu`` called twice, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            if stride != 1 or inplanes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def images(n: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5


def resnet() -> TinyResNet:
    """Random weights, BatchNorm running statistics set from data (and num_batches_tracked 4)."""
    torch.manual_seed(0)
    model = TinyResNet()
    for parameter in model.parameters():
        nn.init.uniform_(parameter, -0.6, 0.6)
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(images(32, seed=seed))
    return model.eval()


def holder(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module whose state dict is exactly ``tensors``, each kept as given (strides, storage)."""
    root = nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor)
    return root


def reference_hash(entries: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """The documented framing, built by hand: for each (name, dtype, shape, value bytes) in name
    order an 8-byte little-endian header length, the sorted compact JSON header, the bytes."""
    digest = hashlib.sha256(PARAM_HASH_FORMAT)
    for name, dtype, shape, data in sorted(entries):
        header = json.dumps(
            {"name": name, "dtype": dtype, "shape": list(shape), "bytes": [len(data)]},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        digest.update(len(header).to_bytes(8, "little") + header + data)
    return digest.hexdigest()


def numpy_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes(order="C")


NUMPY_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
SHAPES = [(), (1,), (5,), (3, 4), (2, 0, 3), (2, 3, 1, 2)]


def random_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        parts = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 100
        return torch.complex(parts[0], parts[1]).to(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_equals_sha256_over_numpy_bytes(dtype: torch.dtype) -> None:
    tensors = {f"t{i}": random_values(shape, dtype, seed=i) for i, shape in enumerate(SHAPES)}
    expected = reference_hash(
        [(name, str(dtype), tuple(t.shape), numpy_bytes(t.numpy())) for name, t in tensors.items()]
    )
    assert param_hash(holder(tensors)) == expected


def test_bfloat16_equals_the_top_half_of_float32() -> None:
    """numpy has no bfloat16: its bits are the upper 16 bits of the float32 of the same value."""
    values = random_values((4, 5), torch.float32).to(torch.bfloat16)
    zero_dim = torch.tensor(-2.5, dtype=torch.bfloat16)
    as_bits = {
        name: (t.float().numpy().view(np.uint32) >> 16).astype("<u2").tobytes()
        for name, t in {"w": values, "s": zero_dim}.items()
    }
    expected = reference_hash(
        [("w", "torch.bfloat16", (4, 5), as_bits["w"]), ("s", "torch.bfloat16", (), as_bits["s"])]
    )
    assert param_hash(holder({"w": values, "s": zero_dim})) == expected


def test_other_dtypes_hash_and_differ() -> None:
    """dtypes numpy lacks: unsigned 16-64 bit, float8, complex32; the dtype is part of the hash."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # complex32 is "experimental"
        tensors = [
            torch.zeros(3, dtype=dtype)
            for dtype in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
        ]
        tensors.append(torch.zeros(3, dtype=torch.complex32))
        hashes = {param_hash(holder({"w": t})) for t in tensors}
    assert len(hashes) == len(tensors)


def test_batchnorm_model_hashes_captures_and_saves(tmp_path: Path) -> None:
    model = resnet()
    assert int(model.bn1.num_batches_tracked) == 4 and model.bn1.num_batches_tracked.dim() == 0
    digest = param_hash(model)
    assert len(digest) == 64 and digest == param_hash(resnet())
    x = images(6)
    path = pyengine.capture(model, x, ["layer1.0.relu#2", "layer1.1"], tmp_path / "acts.h5", progress=False)
    with h5py.File(path, "r") as f:
        assert f["meta"].attrs["model_param_hash"] == digest
    result = pyengine.run("gram-spectrum", model, store=path, layers="layer1.1", save=tmp_path / "r.h5", progress=False)
    assert result.units == {"layer1.1": 16} and "store" in result.rows, result.rows
    pyengine.run("saliency", model, x[:2], target=0, save=tmp_path / "r.h5", progress=False)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f["meta"].attrs["model_param_hash"] == digest
        assert set(f["results"]) == {"gram-spectrum", "saliency"}


def test_batchnorm_running_statistics_are_part_of_the_weights(tmp_path: Path) -> None:
    """One training-mode forward pass moves the running stats: the store is then refused."""
    model = resnet()
    path = pyengine.capture(model, images(4), ["layer1.1"], tmp_path / "acts.h5", progress=False)
    model.train()
    with torch.no_grad():
        model(images(8, seed=9))
    model.eval()
    with pytest.raises(PyengineError, match="captured from other weights"):
        pyengine.run("gram-spectrum", model, store=path, progress=False)
    pyengine.run("gram-spectrum", model, store=path, accept_other_model=True, progress=False)


def test_independent_of_layout_storage_and_key_order() -> None:
    model = resnet()
    digest = param_hash(model)
    state = model.state_dict()
    copies = {
        # the same values behind other strides: transposed storage, channels_last, a slice of a
        # larger storage, and the entries in reverse order
        "transposed": {
            k: v.transpose(0, -1).contiguous().transpose(0, -1) if v.dim() > 1 else v for k, v in state.items()
        },
        "channels_last": {
            k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in state.items()
        },
        "views": {
            k: torch.cat([torch.zeros(3, *v.shape[1:]), v, torch.ones(2, *v.shape[1:])])[3:-2] if v.dim() else v
            for k, v in state.items()
        },
        "reversed": dict(reversed(list(state.items()))),
    }
    assert any(not v.is_contiguous() for v in copies["transposed"].values())
    assert any(not v.is_contiguous() for v in copies["channels_last"].values())
    assert any(v.untyped_storage().nbytes() > v.numel() * v.element_size() for v in copies["views"].values())
    for name, state_copy in copies.items():
        assert param_hash(holder(state_copy)) == digest, name
    # a strided view (every second element) hashes its elements, not its storage
    big = torch.arange(20, dtype=torch.float32)
    assert param_hash(holder({"w": big[::2]})) == param_hash(holder({"w": big[::2].clone()}))
    assert param_hash(holder({"w": big[::2]})) != param_hash(holder({"w": big[:10]}))


def test_conjugate_and_negative_views_hash_their_values() -> None:
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    assert z.conj().is_conj()
    assert param_hash(holder({"w": z.conj()})) == param_hash(holder({"w": z.conj().resolve_conj()}))
    assert param_hash(holder({"w": z.conj()})) != param_hash(holder({"w": z}))


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    flipped = tensor.clone()
    as_int = flipped.view(torch.int32).view(-1)
    as_int[index] ^= (1 << bit) if bit < 31 else -(1 << 31)
    return flipped


def test_every_change_changes_the_hash() -> None:
    model = resnet()
    state = model.state_dict()
    digest = param_hash(model)
    assert param_hash(holder(state)) == digest
    weight = "layer1.1.conv2.weight"
    variants: dict[str, dict[str, torch.Tensor]] = {}
    for bit in (0, 22, 31):  # lowest mantissa bit, highest mantissa bit, sign
        variants[f"bit {bit}"] = dict({**state, weight: flip_bit(state[weight], 17, bit)})
    renamed = dict((("bn1.running_avg" if k == "bn1.running_mean" else k), v) for k, v in state.items())
    variants["renamed buffer"] = renamed
    variants["float64"] = dict({**state, weight: state[weight].double()})
    variants["reshaped"] = dict({**state, weight: state[weight].reshape(state[weight].shape[0], -1)})
    variants["running_var"] = dict({**state, "layer1.0.bn2.running_var": state["layer1.0.bn2.running_var"] * 1.0001})
    variants["num_batches_tracked"] = dict({**state, "bn1.num_batches_tracked": torch.tensor(5)})
    variants["dropped"] = dict((k, v) for k, v in state.items() if k != "fc.bias")
    # the same bytes split differently between two entries
    variants["moved byte"] = dict(a=torch.tensor([1, 2], dtype=torch.uint8), b=torch.tensor([3], dtype=torch.uint8))
    hashes = {name: param_hash(holder(values)) for name, values in variants.items()}
    hashes["moved byte 2"] = param_hash(
        holder({"a": torch.tensor([1], dtype=torch.uint8), "b": torch.tensor([2, 3], dtype=torch.uint8)})
    )
    assert digest not in hashes.values()
    assert len(set(hashes.values())) == len(hashes), hashes
    negative_zero = holder({"w": torch.tensor([0.0, -0.0])})
    assert param_hash(negative_zero) != param_hash(holder({"w": torch.tensor([0.0, 0.0])}))


def test_quantized_tensors_include_scale_and_zero_point() -> None:
    values = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        per_tensor = [
            torch.quantize_per_tensor(values, scale, zero, torch.qint8)
            for scale, zero in [(0.1, 0), (0.1, 0), (0.2, 0), (0.1, 1)]
        ]
        scales = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        per_channel = [
            torch.quantize_per_channel(values, s, torch.zeros(3, dtype=torch.long), 0, torch.quint8)
            for s in (scales, scales.clone(), scales * 1.5)
        ]
        hashes = [param_hash(holder({"q": q})) for q in per_tensor + per_channel]
    assert hashes[0] == hashes[1] and hashes[4] == hashes[5]
    assert len({hashes[0], hashes[2], hashes[3], hashes[4], hashes[6]}) == 5


def test_extra_state_and_meta_tensors() -> None:
    class WithExtra(nn.Module):
        def __init__(self, extra: object) -> None:
            super().__init__()
            self.extra = extra
            self.weight = nn.Parameter(torch.ones(2))

        def get_extra_state(self) -> object:
            return self.extra

        def set_extra_state(self, state: object) -> None:
            self.extra = state

    assert param_hash(WithExtra({"a": 1})) == param_hash(WithExtra({"a": 1}))
    assert param_hash(WithExtra({"a": 1})) != param_hash(WithExtra({"a": 2}))
    with torch.device("meta"):
        meta = nn.Linear(3, 2)
    with pytest.raises(PyengineError, match="cannot hash 'bias': it is on the meta device"):
        param_hash(meta)


@requires_cuda
def test_same_hash_on_cuda() -> None:
    model = resnet()
    digest = param_hash(model)
    assert param_hash(model.cuda()) == digest
    assert param_hash(holder({"w": torch.arange(10.0, device="cuda")[::3]})) == param_hash(
        holder({"w": torch.arange(10.0)[::3]})
    )


def test_contiguous_cpu_tensors_are_hashed_in_place() -> None:
    weight = torch.randn(64, 32)
    view = torch.randn(10, 64)[3:7]  # a contiguous view into a larger storage
    for tensor in (weight, view, torch.tensor(3)):
        data = value_bytes(tensor)
        assert np.frombuffer(data, dtype=np.uint8).ctypes.data == tensor.data_ptr()
        assert data.nbytes == tensor.numel() * tensor.element_size()
    transposed = value_bytes(weight.t())  # the values in row-major order: one copy
    assert bytes(transposed) == weight.t().contiguous().numpy().tobytes()
