"""SHA-256 over tensor values: the identity of a model's weights and of dataset rows.

A tensor is hashed as a framed block: a length-prefixed JSON header (name, dtype, shape,
byte counts, quantizer) and then its values' raw bytes in row-major order, so neither memory
layout, device, strides nor a larger storage behind a view changes the hash, while any
change of a name, dtype, shape or single bit does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pyengine.errors import PyengineError

PARAM_HASH_FORMAT = b"pyengine.param_hash/2\n"


def value_bytes(tensor: torch.Tensor) -> memoryview:
    """The values of a strided, non-quantized tensor as raw bytes, row-major, native byte order.

    No copy for a contiguous CPU tensor (a view of a larger storage gives its own elements
    only); one copy for another device or memory layout; a conjugate or negative view is
    resolved to the values it stands for.
    """
    data = tensor.detach()
    if data.layout != torch.strided:
        data = data.to_dense()
    data = data.resolve_conj().resolve_neg().cpu().contiguous()
    if data.numel() == 0:
        return memoryview(b"")
    return data.reshape(-1).view(torch.uint8).numpy().data


def add_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Add ``tensor`` under ``name`` to a hashlib ``digest``: header, then its bytes."""
    if tensor.device.type == "meta":
        raise PyengineError(f"cannot hash {name!r}: it is on the meta device and has no values; load the weights first")
    header: dict[str, Any] = {"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    if tensor.is_quantized:
        scheme = tensor.qscheme()
        header["qscheme"] = str(scheme)
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            header.update(scale=float(tensor.q_scale()), zero_point=int(tensor.q_zero_point()))
            blocks = [value_bytes(tensor.int_repr())]
        else:
            header["axis"] = int(tensor.q_per_channel_axis())
            scales = tensor.q_per_channel_scales().double()
            zero_points = tensor.q_per_channel_zero_points().long()
            blocks = [value_bytes(tensor.int_repr()), value_bytes(scales), value_bytes(zero_points)]
    else:
        blocks = [value_bytes(tensor)]
    header["bytes"] = [block.nbytes for block in blocks]
    _add_header(digest, header)
    for block in blocks:
        digest.update(block)


def _add_header(digest: Any, header: Mapping[str, Any]) -> None:
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    digest.update(len(encoded).to_bytes(8, "little"))
    digest.update(encoded)


def _json_or_none(value: Any) -> str | None:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return None


def param_hash(model: nn.Module) -> str:
    """SHA-256 (hex) of the state dict: names, dtypes, shapes and values, buffers included.

    Equal state dicts give equal hashes, in any key order, on any device and memory layout;
    a changed name, dtype, shape or single bit gives another. Quantized tensors add their
    scales and zero points. A non-tensor entry (a module's extra state) adds its value if it is
    JSON-compatible, else only its type.
    """
    digest = hashlib.sha256(PARAM_HASH_FORMAT)
    for name, value in sorted(model.state_dict().items(), key=lambda item: item[0]):
        if isinstance(value, torch.Tensor):
            add_tensor(digest, name, value)
        else:
            kind = type(value)
            _add_header(
                digest,
                {"name": name, "extra": _json_or_none(value), "type": f"{kind.__module__}.{kind.__qualname__}"},
            )
    return digest.hexdigest()
