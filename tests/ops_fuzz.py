"""Property-based fuzzing of every ``pyengine.ops`` op: random shapes, dtypes, strides, devices,
aliases and extreme integers. Every call must return or raise ``RuntimeError``; anything else
fails, and a crash kills this process (so it runs as a child: tests/test_ops_safety.py).

    python tests/ops_fuzz.py EXAMPLES [--random]

Each call is printed (one line) before it runs, so a crash's last line names it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops_fuzz_paths import paths_arguments
from pyengine import ops

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
EXTREME = [0, -1, 1, 2**62, INT64_MAX, INT64_MIN]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = [torch.int64, torch.int32, torch.uint8, torch.bool]
LAYOUTS = ["contiguous", "strided", "transposed", "expanded", "meta"]

Draw = Callable[..., object]
Call = tuple[Callable[..., object], tuple[object, ...], dict[str, object]]


def some_int(draw: Draw, low: int = 0, high: int = 6) -> int:
    """A small int, or (one time in eight) an extreme one."""
    return int(draw(st.one_of(*[st.integers(low, high)] * 7, st.sampled_from(EXTREME))))


def fill(shape: list[int], dtype: torch.dtype, draw: Draw, int_high: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(draw(st.integers(0, 2**16))))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        if t.numel() and draw(st.booleans()):
            t.view(-1)[0] = float(draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300])))
        return t.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    t = torch.randint(-2, int_high + 1, shape, generator=generator)
    if t.numel() and dtype == torch.int64 and draw(st.booleans()):
        t.view(-1)[int(draw(st.integers(0, t.numel() - 1)))] = int(draw(st.sampled_from(EXTREME)))
    return t.to(dtype)


def tensor(draw: Draw, shape: list[int], dtypes: list[torch.dtype], int_high: int = 6) -> torch.Tensor:
    """A tensor of `shape`: contiguous, a strided or transposed view, an expanded view, or meta."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS + ["contiguous"] * 3))
    if layout == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if layout == "strided" and shape:
        return fill([*shape[:-1], 2 * shape[-1]], dtype, draw, int_high)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        return fill([*shape[:-2], shape[-1], shape[-2]], dtype, draw, int_high).transpose(-1, -2)
    if layout == "expanded" and shape:
        return fill([1, *shape[1:]], dtype, draw, int_high).expand(shape)
    return fill(shape, dtype, draw, int_high)


def dims(draw: Draw, count: int, high: int = 5) -> list[int]:
    return [int(draw(st.integers(0, high))) for _ in range(count)]


def maybe_rank(draw: Draw, rank: int) -> int:
    """Usually `rank`, sometimes one off."""
    return int(draw(st.sampled_from([rank] * 6 + [max(rank - 1, 0), rank + 1])))


def gram_call(draw: Draw) -> Call:
    n, d = dims(draw, 2)
    x = tensor(draw, dims(draw, maybe_rank(draw, 2)) if draw(st.booleans()) else [n, d], FLOATS + [torch.int32])
    gram = tensor(draw, [d, d], [torch.float64] * 3 + [torch.float32])
    sums = tensor(draw, [d], [torch.float64]) if draw(st.booleans()) else None
    alias = draw(st.sampled_from(["none", "none", "x", "sums"]))
    if alias == "x":
        x = gram
    elif alias == "sums" and gram.dim() == 2 and gram.numel():
        sums = gram[0]
    return ops.gram_accumulate, (gram, x, sums), {}


def eigh_call(draw: Draw) -> Call:
    d = int(draw(st.integers(0, 4)))
    gram = tensor(draw, dims(draw, maybe_rank(draw, 2)) if draw(st.booleans()) else [d, d], FLOATS)
    n = some_int(draw, -1, 9) if draw(st.booleans()) else None
    sums = tensor(draw, [d], FLOATS) if draw(st.booleans()) else None
    return ops.gram_eigh, (gram,), {"n": n, "center_sums": sums}


def firing_call(draw: Draw) -> Call:
    if draw(st.booleans()):
        h = tensor(draw, dims(draw, maybe_rank(draw, 2), 70), FLOATS + [torch.int64])
        threshold = float(draw(st.sampled_from([0.0, -1.0, 0.5, float("nan"), float("inf")])))
        return ops.pack_firing, (h, threshold), {}
    bits = tensor(draw, dims(draw, maybe_rank(draw, 2), 40), [torch.int64] * 3 + [torch.int32])
    return ops.firing_disagreements, (bits,), {}


def binning_call(draw: Draw) -> Call:
    n, d, targets = dims(draw, 3)
    h = tensor(draw, [n, d], FLOATS)
    labels = tensor(draw, [targets, n] if draw(st.booleans()) else dims(draw, maybe_rank(draw, 2)), INTS)
    low, high = tensor(draw, [d], FLOATS[2:]), tensor(draw, [d], FLOATS[2:])
    bins = some_int(draw, -1, 9)
    return ops.binned_statistics, (h, labels, low, high, bins), {}


def occlusion_call(draw: Draw) -> Call:
    rank = int(draw(st.integers(1, 3)))
    shape = [int(draw(st.integers(1, 5))) for _ in range(rank)]
    window = [some_int(draw, 1, 5) for _ in range(maybe_rank(draw, rank))]
    stride = [some_int(draw, 1, 5) for _ in range(maybe_rank(draw, rank))]
    first = some_int(draw, 0, 8)
    batch = int(draw(st.integers(0, 3)))
    if draw(st.booleans()):
        inputs = tensor(draw, [batch, *shape], FLOATS + INTS)
        baseline = tensor(draw, shape if draw(st.booleans()) else [batch, *shape], [inputs.dtype] * 3 + FLOATS)
        count = some_int(draw, 0, 8)
        return ops.occlusion_batch, (inputs, baseline, tuple(window), tuple(stride), first, count), {}
    targets = int(draw(st.integers(0, 3)))
    sums = tensor(draw, [batch, targets, *shape], [torch.float64] * 3 + [torch.float32])
    drops = tensor(draw, [int(draw(st.integers(0, 6))), batch, targets], FLOATS)
    if draw(st.integers(0, 5)) == 0 and sums.dim() == 3:
        drops = sums  # an alias: (batch, targets, S) read as (count, batch, targets)
    return ops.occlusion_accumulate, (sums, drops, tuple(window), tuple(stride), first), {}


def topk_call(draw: Draw) -> Call:
    n, columns = dims(draw, 2)
    k = int(draw(st.integers(0, 4)))
    values = tensor(draw, [n, columns], FLOATS)
    ids = tensor(draw, [n], [torch.int64] * 3 + [torch.int32], int_high=2**62)
    payload = tensor(draw, [n, columns], [torch.int64]) if draw(st.booleans()) else None
    top = [tensor(draw, [columns, k], [dtype] * 3 + [torch.float32]) for dtype in (torch.float64, torch.int64)]
    top.append(tensor(draw, [columns, k], [torch.int64]))
    alias = draw(st.sampled_from(["none", "none", "ids-payload", "payload", "values"]))
    if alias == "ids-payload":
        top[2] = top[1]
    elif alias == "payload":
        payload = top[2]
    elif alias == "values" and n == columns:
        values = top[0][:, :n] if k >= n else values
    return ops.topk_update, (values, ids, payload, *top), {}


def paths_call(draw: Draw) -> Call:
    return ops.hierarchical_paths, paths_arguments(draw, tensor, some_int), {}


def describe(value: object) -> str:
    """One line naming every argument: tensors by dtype, shape, strides and device."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype)[6:]}{list(value.shape)}/{list(value.stride())}@{value.device}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


CALLS = [gram_call, eigh_call, firing_call, binning_call, occlusion_call, topk_call, paths_call]


def run(examples: int, derandomize: bool) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        function, args, kwargs = data.draw(st.sampled_from(CALLS))(data.draw)
        print(function.__name__, describe(args), describe(kwargs), flush=True)
        try:
            function(*args, **kwargs)
            returned[function.__name__] = returned.get(function.__name__, 0) + 1
        except RuntimeError:
            raised[function.__name__] = raised.get(function.__name__, 0) + 1

    returned: dict[str, int] = {}
    raised: dict[str, int] = {}
    fuzz()
    for name in sorted(set(returned) | set(raised)):
        print(f"fuzz: {name}: {returned.get(name, 0)} returned, {raised.get(name, 0)} raised RuntimeError")


if __name__ == "__main__":
    torch.set_num_threads(2)
    run(int(sys.argv[1]), derandomize="--random" not in sys.argv)
    print("fuzz: done", flush=True)
