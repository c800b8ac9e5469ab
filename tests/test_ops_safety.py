"""Ops never crash (issue #13): every argument a fuzzer found crashing or silently accepted is a
clean RuntimeError naming the op and the argument, and a property-based fuzz of every op runs
in one child process (a crash fails the test with the child's signal, not pytest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda
from pyengine import ops

INT64_MAX = 2**63 - 1
TESTS = Path(__file__).resolve().parent

# A child's prelude: a valid one-layer max-pool network (in (1, 4, 4), pooled (1, 2, 2), dense
# to 3 outputs) and `error(call)`, which prints the first line of the call's RuntimeError.
PRELUDE = """
import torch
import torch.nn.functional as F
from pyengine import ops

INT64_MAX = 2**63 - 1
a = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
index = F.max_pool2d(a, 2, 2, return_indices=True)[1]
w = torch.randn(3, 4, dtype=torch.float64)
geometry = [1, 4, 4, 1, 2, 2, 2, 2, 0, 0, 1, 1, 2, 2, 0, 3, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1]
targets = torch.zeros(2, 1, dtype=torch.long)

def with_index(value, at=0, device="cpu"):
    bad = index.clone()
    bad.view(-1)[at] = value
    return lambda: ops.hierarchical_paths(
        [a.to(device)], [w.to(device)], [bad.to(device)], geometry, targets.to(device), 2
    )

def error(call):
    try:
        call()
    except RuntimeError as e:
        print(str(e).splitlines()[0], flush=True)
    else:
        print("no error", flush=True)

ops.hierarchical_paths([a], [w], [index], geometry, targets, 2)  # the valid call works
"""

MAX_INDEX = "max_indices[0] must be flat indices into the 4 x 4 input plane, in [0, 16)"
CRASHES = {
    # hierarchical_paths did not range-check max_indices (SIGSEGV, glibc double free)
    "max_indices far out of range": (
        ["with_index(2**40)", "with_index(-1, at=7)", "with_index(INT64_MAX, at=3)"],
        [MAX_INDEX] * 3,
    ),
    # ... and read the neighbouring channel, or past the end, when just out of range
    "max_indices one past the plane": (["with_index(16)", "with_index(16, at=7)"], [MAX_INDEX] * 2),
    # its geometry size products wrapped around int64 and passed its own size checks
    "geometry products overflow": (
        [
            "lambda: ops.hierarchical_paths([torch.zeros(1, 0)], [torch.zeros(1, 0)], [torch.zeros(0).long()],"
            " [2**32, 2**32, 1, 0, 1, 1, 1, 1, 0, 0, 1, 2**32, 2**32, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1],"
            " torch.zeros(1, 1).long(), 1)",
            "lambda: ops.hierarchical_paths([torch.zeros(1, 4)], [torch.zeros(0)], [torch.zeros(0).long()],"
            " [1, 2, 2, 0, 1, 1, 1, 1, 0, 0, 1, 1, 2, 2, 1, 1, 1, 1, 2**32, 2**32, 1, 1, 0, 0, 1, 1],"
            " torch.zeros(1, 1).long(), 1)",
            "lambda: ops.hierarchical_paths([a], [w], [index], geometry, targets, 2**62)",
        ],
        [
            "step 0 input shape c * h * w overflows int64",
            "step 0 weight size overflows int64",
            "paths size (batch * targets * beam * layers * 8 bytes) overflows int64",
        ],
    ),
    # occlusion_batch formed first + count and count * B in wrapping int64 arithmetic: windows
    # before the first (negative offsets), or count * B wrapped to a small positive row count
    "occlusion first + count, count * B overflow": (
        [
            "lambda: ops.occlusion_batch(torch.zeros(3, 4), torch.zeros(4), (2,), (2,), 1, INT64_MAX)",
            "lambda: ops.occlusion_batch(torch.zeros(2, 9999), torch.zeros(9999), (1,), (1,), INT64_MAX, 2)",
            "lambda: ops.occlusion_batch(torch.zeros(4, 30), torch.zeros(30), (1,), (1,), 2**62, 2**62 + 1)",
            "lambda: ops.occlusion_batch(torch.empty_strided((0, 2**32, 2**32), (0, 2**32, 1)), torch.zeros(0),"
            " (1, 1), (1, 1), 0, 1)",
            "lambda: ops.occlusion_accumulate(torch.zeros(1, 1, 4).double(), torch.zeros(2, 1, 1), (2,), (2,),"
            " INT64_MAX - 1)",
        ],
        [
            "windows first = 1, count = 9223372036854775807 are out of range",
            "windows first = 9223372036854775807, count = 2 are out of range",
            "windows first = 4611686018427387904, count = 4611686018427387905 are out of range",
            "input size (product of the non-batch dimensions) overflows int64",
            "windows first = 9223372036854775806, count = 2 are out of range",
        ],
    ),
}


def run_child(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=timeout)


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode < 0:
        return f"the child died of {signal.Signals(-result.returncode).name}:\n{result.stderr[-3000:]}"
    return f"the child exited {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("cause", sorted(CRASHES))
def test_former_crashes_are_clean_errors(cause: str) -> None:
    calls, messages = CRASHES[cause]
    code = PRELUDE + "".join(f"error({call})\n" for call in calls)
    result = run_child(code, timeout=120)
    assert result.returncode == 0, outcome(result)
    lines = result.stdout.splitlines()
    assert len(lines) == len(calls), result.stdout
    for line, message in zip(lines, messages):
        assert line.startswith("pyengine.") and message in line, (line, message)


@requires_cuda
def test_cuda_max_indices_are_range_checked_before_launch() -> None:
    code = PRELUDE + 'error(with_index(16, device="cuda"))\nerror(with_index(-1, device="cuda"))\n'
    result = run_child(code, timeout=120)
    assert result.returncode == 0, outcome(result)
    assert result.stdout.splitlines() == [f"pyengine.hierarchical_paths: {MAX_INDEX}"] * 2


META_MIXED = [
    (lambda: ops.gram_accumulate(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3, device="meta")), "gram"),
    (
        lambda: ops.occlusion_accumulate(
            torch.zeros(1, 1, 4, dtype=torch.float64), torch.zeros(2, 1, 1, device="meta"), (2,), (2,), 0
        ),
        "occlusion_accumulate",
    ),
    (lambda: ops.topk_update(torch.zeros(4, 3, device="meta"), torch.arange(4), None, *ops.topk_empty(3, 2)), "topk"),
    (
        lambda: ops.binned_statistics(
            torch.zeros(4, 2), torch.zeros(1, 4, device="meta"), torch.zeros(2), torch.ones(2), 4
        ),
        "binned_statistics",
    ),
    (
        lambda: ops.occlusion_batch(torch.zeros(2, 4), torch.zeros(4, device="meta"), (2,), (2,), 0, 1),
        "occlusion_batch",
    ),
]


@pytest.mark.parametrize("call, name", META_MIXED, ids=[name for _, name in META_MIXED])
def test_meta_tensors_mixed_with_cpu_tensors_are_errors(call, name: str) -> None:
    with pytest.raises(RuntimeError, match=r"^pyengine\.\w+: .* is on (meta|cpu) .*all tensors must be on one device"):
        call()


def test_aliased_in_place_arguments_are_errors() -> None:
    g = torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"pyengine\.gram_accumulate: gram shares memory with x"):
        ops.gram_accumulate(g, g)
    assert torch.equal(g, torch.eye(3, dtype=torch.float64))  # untouched
    with pytest.raises(RuntimeError, match="pyengine.gram_accumulate: gram shares memory with sums"):
        ops.gram_accumulate(g, torch.zeros(2, 3), g[1])
    with pytest.raises(RuntimeError, match="pyengine.gram_accumulate: sums shares memory with x"):
        x = torch.zeros(2, 3, dtype=torch.float64)
        ops.gram_accumulate(torch.zeros(3, 3, dtype=torch.float64), x, x[0])
    top = ops.topk_empty(3, 3)
    with pytest.raises(RuntimeError, match="pyengine.topk_update: top_ids shares memory with top_payload"):
        ops.topk_update(torch.zeros(4, 3), torch.arange(4), None, top[0], top[1], top[1])
    with pytest.raises(RuntimeError, match="pyengine.topk_update: top_payload shares memory with payload"):
        ops.topk_update(torch.zeros(3, 3), torch.arange(3), top[2], *top)
    sums = torch.zeros(1, 1, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="pyengine.occlusion_accumulate: sums shares memory with drops"):
        ops.occlusion_accumulate(sums, sums, (1,), (1,), 0)


def test_separate_views_of_one_storage_are_not_aliases() -> None:
    storage = torch.zeros(20, dtype=torch.float64)
    gram, sums = storage[:9].view(3, 3), storage[9:12]
    x = torch.ones(2, 3)
    ops.gram_accumulate(gram, x, sums)
    assert torch.equal(gram, torch.full((3, 3), 2.0, dtype=torch.float64)) and torch.equal(sums, torch.full((3,), 2.0))


def test_fuzz_every_op_in_one_child() -> None:
    """Hypothesis draws shapes, dtypes, strides, devices, aliases and extreme ints for every op;
    ``make fuzz`` runs the same with PYENGINE_FUZZ_EXAMPLES=5000 and a random seed."""
    examples = int(os.environ.get("PYENGINE_FUZZ_EXAMPLES", "2500"))
    command = [sys.executable, str(TESTS / "ops_fuzz.py"), str(examples)]
    if os.environ.get("PYENGINE_FUZZ_RANDOM"):
        command.append("--random")
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=max(600, examples))
    last_calls = "\n".join(result.stdout.splitlines()[-3:])
    assert result.returncode == 0, f"{outcome(result)}\nlast calls:\n{last_calls}"
    assert result.stdout.splitlines()[-1] == "fuzz: done"
    print(*[line for line in result.stdout.splitlines() if line.startswith("fuzz: ")], sep="\n")
    print(f"fuzz: {examples} examples in {time.monotonic() - start:.1f} s")
