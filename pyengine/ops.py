"""Typed wrappers over ``torch.ops.pyengine.*``, with fake (meta) implementations.

The only module that imports the native extension ``pyengine._C``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import pyengine._C as _C

HAS_CUDA: bool = bool(_C.has_cuda)


def _one_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Fake kernels also run for meta tensors, and a meta tensor among CPU or CUDA ones
    routes the whole call here: mixed devices must fail as in the native kernels, not pass
    as a silent no-op."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"pyengine.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def build_info() -> dict[str, object]:
    """How the native extension was built (version, C++ standard, pybind11, CUDA)."""
    return dict(_C.build_info())


def gram_accumulate(gram: torch.Tensor, x: torch.Tensor, sums: torch.Tensor | None = None) -> None:
    """In place: ``gram += x.T @ x`` in float64 and, if given, ``sums += x.sum(0)``.

    ``x`` is (n, d) float16/bfloat16/float32/float64, any strides; ``gram`` is a contiguous
    float64 (d, d) and ``sums`` a contiguous float64 (d,), on x's device.
    """
    torch.ops.pyengine.gram_accumulate(gram, x, sums)


@torch.library.register_fake("pyengine::gram_accumulate")
def _gram_accumulate_fake(gram: torch.Tensor, x: torch.Tensor, sums: torch.Tensor | None = None) -> None:
    _one_device("gram_accumulate", x=x, gram=gram, sums=sums)
    torch._check(x.dim() == 2, lambda: "pyengine.gram_accumulate: x must be 2-D")
    torch._check(gram.shape == (x.shape[1], x.shape[1]), lambda: "pyengine.gram_accumulate: gram must be (d, d)")
    return None


def gram_eigh(
    gram: torch.Tensor, *, n: int | None = None, center_sums: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of an accumulated Gram matrix.

    With ``n`` (rows accumulated) the matrix is divided by n; with ``center_sums`` too, it
    is centred first: ``(gram - s s^T / n) / n`` is the covariance.
    """
    values, vectors = torch.ops.pyengine.gram_eigh(gram, n=n, center_sums=center_sums)
    return values, vectors


def binned_statistics(
    h: torch.Tensor, labels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of h (n, d): counts and sums of the values in each of ``bins`` equal-width
    bins spanning [low[j], high[j]] (edge bins take values outside), split by each target's
    0/1 label. labels: (targets, n). Returns counts, sums: (targets, d, 2, bins) float64.
    """
    counts, sums = torch.ops.pyengine.binned_statistics(h, labels, low, high, bins)
    return counts, sums


@torch.library.register_fake("pyengine::binned_statistics")
def _binned_statistics_fake(
    h: torch.Tensor, labels: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _one_device("binned_statistics", h=h, labels=labels, low=low, high=high)
    torch._check(h.dim() == 2 and labels.dim() == 2, lambda: "pyengine.binned_statistics: h and labels must be 2-D")
    shape = (labels.shape[0], h.shape[1], 2, bins)
    return h.new_empty(shape, dtype=torch.float64), h.new_empty(shape, dtype=torch.float64)


def pack_firing(h: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Firing patterns of h (n, units) as bitsets: (units, ceil(n / 64)) int64 words, bit
    r % 64 of word r // 64 set when h[r, unit] > threshold. 32x smaller than float32."""
    return torch.ops.pyengine.pack_firing(h, threshold)


@torch.library.register_fake("pyengine::pack_firing")
def _pack_firing_fake(h: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    torch._check(h.dim() == 2, lambda: "pyengine.pack_firing: h must be 2-D (rows, units)")
    return h.new_empty((h.shape[1], (h.shape[0] + 63) // 64), dtype=torch.int64)


def firing_disagreements(bits: torch.Tensor) -> torch.Tensor:
    """(units, units) int64: rows where exactly one of the two units fires (XOR popcount)."""
    return torch.ops.pyengine.firing_disagreements(bits)


@torch.library.register_fake("pyengine::firing_disagreements")
def _firing_disagreements_fake(bits: torch.Tensor) -> torch.Tensor:
    torch._check(bits.dim() == 2, lambda: "pyengine.firing_disagreements: bits must be 2-D (units, words)")
    return bits.new_empty((bits.shape[0], bits.shape[0]), dtype=torch.int64)


def occlusion_batch(
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    window: tuple[int, ...],
    stride: tuple[int, ...],
    first: int,
    count: int,
) -> torch.Tensor:
    """Occluded copies of inputs (B, *S) for windows ``first .. first + count - 1``: (count * B, *S),
    window-major. Inside a window the elements come from ``baseline`` ((*S) or (B, *S)).

    Windows start at multiples of ``stride`` and are numbered row-major over the grid of
    ``ceil((S - window) / stride) + 1`` positions per dimension (Captum's Occlusion grid).
    """
    return torch.ops.pyengine.occlusion_batch(inputs, baseline, list(window), list(stride), first, count)


@torch.library.register_fake("pyengine::occlusion_batch")
def _occlusion_batch_fake(
    inputs: torch.Tensor, baseline: torch.Tensor, window: list[int], stride: list[int], first: int, count: int
) -> torch.Tensor:
    _one_device("occlusion_batch", inputs=inputs, baseline=baseline)
    torch._check(inputs.dim() >= 2, lambda: "pyengine.occlusion_batch: inputs must be (B, *S)")
    return inputs.new_empty((count * inputs.shape[0], *inputs.shape[1:]))


def occlusion_accumulate(
    sums: torch.Tensor, drops: torch.Tensor, window: tuple[int, ...], stride: tuple[int, ...], first: int
) -> None:
    """In place: ``sums[b, t] += drops[p, b, t]`` over the elements of window ``first + p``.

    sums: contiguous float64 (B, T, *S); drops: (count, B, T) output drops of the windows.
    """
    torch.ops.pyengine.occlusion_accumulate(sums, drops, list(window), list(stride), first)


@torch.library.register_fake("pyengine::occlusion_accumulate")
def _occlusion_accumulate_fake(
    sums: torch.Tensor, drops: torch.Tensor, window: list[int], stride: list[int], first: int
) -> None:
    _one_device("occlusion_accumulate", sums=sums, drops=drops)
    return None


def hierarchical_paths(
    activations: list[torch.Tensor],
    weights: list[torch.Tensor],
    max_indices: list[torch.Tensor],
    geometry: list[int],
    targets: torch.Tensor,
    beam: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-down paths through a ReLU network's layers (Cheng et al., Algorithm 1, with a beam).

    Per ReLU layer l (forward order): its outputs ``activations[l]`` (B, ...), the weight of the
    Linear/Conv2d after it, the max-pool indices between them (or an empty tensor), and 26
    geometry values (shapes, pooling, convolution; see ``pyengine/core/paths.h``). ``targets``:
    (B, T) output indices. Returns paths (B, T, beam, layers) flat unit indices and scores
    (B, T, beam), the summed importances w(t, j) * a_j of each path's steps. Float64 inside.
    """
    paths, scores = torch.ops.pyengine.hierarchical_paths(activations, weights, max_indices, geometry, targets, beam)
    return paths, scores


@torch.library.register_fake("pyengine::hierarchical_paths")
def _hierarchical_paths_fake(
    activations: list[torch.Tensor],
    weights: list[torch.Tensor],
    max_indices: list[torch.Tensor],
    geometry: list[int],
    targets: torch.Tensor,
    beam: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    lists = {"activations": activations, "weights": weights, "max_indices": max_indices}
    named = {f"{kind}[{i}]": t for kind, ts in lists.items() for i, t in enumerate(ts)}
    _one_device("hierarchical_paths", targets=targets, **named)
    shape = (targets.shape[0], targets.shape[1], beam)
    return targets.new_empty((*shape, len(activations))), targets.new_empty(shape, dtype=torch.float64)


def topk_update(
    values: torch.Tensor,
    ids: torch.Tensor,
    payload: torch.Tensor | None,
    top_values: torch.Tensor,
    top_ids: torch.Tensor,
    top_payload: torch.Tensor,
) -> None:
    """In place, per column c of values (n, C): merge the rows (value, id ids[i], payload[i, c])
    into the running top-k lists top_values / top_ids / top_payload (C, k), kept sorted by value
    descending, then id ascending (ties go to the lower id, whatever the chunking). Empty
    slots hold -inf and id -1; start from ``topk_empty``."""
    torch.ops.pyengine.topk_update(values, ids, payload, top_values, top_ids, top_payload)


@torch.library.register_fake("pyengine::topk_update")
def _topk_update_fake(
    values: torch.Tensor,
    ids: torch.Tensor,
    payload: torch.Tensor | None,
    top_values: torch.Tensor,
    top_ids: torch.Tensor,
    top_payload: torch.Tensor,
) -> None:
    _one_device(
        "topk_update",
        values=values,
        ids=ids,
        payload=payload,
        top_values=top_values,
        top_ids=top_ids,
        top_payload=top_payload,
    )
    return None


def topk_merge(lists: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, ...]:
    """The top-k lists (values, ids, payload), each (C, k), of disjoint sets of rows merged into
    one by ``topk_update``'s rule: value descending, then id ascending; empty slots (id -1) last.
    Equal to one ``topk_update`` over all the rows, whatever the split."""
    values = torch.cat([v for v, _, _ in lists], 1)
    ids = torch.cat([i for _, i, _ in lists], 1)
    payload = torch.cat([p for _, _, p in lists], 1)
    order = torch.argsort(torch.where(ids < 0, torch.iinfo(torch.long).max, ids), dim=1, stable=True)
    values, ids, payload = values.gather(1, order), ids.gather(1, order), payload.gather(1, order)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order), payload.gather(1, order)


def topk_empty(
    columns: int, k: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty running top-k lists for ``topk_update``: values -inf, ids -1, payload 0."""
    return (
        torch.full((columns, k), float("-inf"), dtype=torch.float64, device=device),
        torch.full((columns, k), -1, dtype=torch.long, device=device),
        torch.zeros((columns, k), dtype=torch.long, device=device),
    )
