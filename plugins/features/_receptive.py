"""Exact receptive fields of a layer's units in any DAG of convolutions, pooling and per-position ops.

Mechanism: one forward pass of one example with gradients on, then a walk of its autograd graph
from the layer's output back to the input. The autograd graph rather than module hooks or
torch.fx, because it holds every op as it ran: functional calls (``F.relu``, ``torch.cat``),
in-place residual adds, ``x * gate``, and models with Python control flow (HF/timm) that symbolic
tracing cannot follow; ``nn.Identity`` and empty ``nn.Sequential`` shortcuts leave no node at all.
Each node maps positions by its type and saved arguments (``_positions``): convolutions, max/avg/
adaptive pooling (``ceil_mode`` included), elementwise and normalisation ops, views, permutes,
cat, split, slice, matmuls (``nn.Linear`` on channels-last maps). A node of any other type is
refused by name. Pieces meeting at a tensor are united when they reach the same channels or the
same positions (both unions are exact), else kept apart, so a unit in one branch of a
concatenation gets that branch's field. Positions are clipped at every tensor, so border units are
exact even where a stride skips trailing pixels or a dilated window straddles the padding.

The field of a unit is, per axis, the bounding interval of the input pixels it depends on through
any path, i.e. the bounding box of its gradient support (for weights without exact zeros). Where
branches differ (a 1x1 shortcut beside a 3x3 path) that is their hull; gaps inside it (pixels no
branch reaches, e.g. between the taps of a stride larger than the kernel) are not reported.

Global paths: a tensor broadcast over positions (a squeeze-excitation gate ``x * gate(x)`` with
the gate (N, C, 1, 1), a global term ``x + f(mean(x))``) and statistics over positions (GroupNorm,
BatchNorm in training mode) keep the field of the spatial paths and are named in ``also_global``.
An op that mixes all positions on a path to the unit (attention, ``nn.Linear`` on flattened maps)
makes the unit see the whole input: the layer is refused, naming the op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.plugins.features._positions import Atom, Axis, Chan, Gate, Op, Piece, Unsupported, Whole, rule_for

MAX_PIECES = 64


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (height, width): field size, jump between adjacent units and where unit 0's field
    starts (negative in the padding): unit i sees [start + i * jump, start + i * jump + size),
    before clipping. ``spans`` holds each unit row's and column's exact clipped [first, end)."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]
    spans: tuple[torch.Tensor, torch.Tensor]  # (H_layer, 2), (W_layer, 2)

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """Unit (y, x)'s exact field in the input: y0, y1, x0, x1 (end exclusive)."""
        (y0, y1), (x0, x1) = self.spans[0][y].tolist(), self.spans[1][x].tolist()
        return y0, y1, x0, x1

    def origin(self, y: int, x: int) -> tuple[int, int]:
        """Input coordinates of the unclipped field's top-left corner."""
        return self.start[0] + y * self.jump[0], self.start[1] + x * self.jump[1]


@dataclass(frozen=True)
class LayerField:
    """The fields of a layer's units: one per group of channels that reach the same paths
    (several only after a concatenation or split), their hull, and the global ops on the way."""

    layer: str
    image: tuple[int, int]  # input height, width the field was computed for
    group: torch.Tensor  # (C,) index into ``fields`` of each channel
    fields: tuple[ReceptiveField, ...]
    hull: ReceptiveField  # over all channels
    also_global: tuple[str, ...]  # ops through which units also depend on the whole input

    def field(self, channel: int) -> ReceptiveField:
        return self.fields[int(self.group[channel])]

    @property
    def layer_size(self) -> tuple[int, int]:
        """The layer's map height and width."""
        return len(self.hull.spans[0]), len(self.hull.spans[1])

    @property
    def size(self) -> tuple[int, int]:
        return self.hull.size

    @property
    def jump(self) -> tuple[int, int]:
        return self.hull.jump

    @property
    def start(self) -> tuple[int, int]:
        return self.hull.start

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        return self.hull.box(y, x)

    def describe(self) -> str:
        """The hull's size, e.g. '27x27', with the range over channels when they differ."""
        sizes = sorted({f.size for f in self.fields})
        (low_h, low_w), (high_h, high_w) = sizes[0], sizes[-1]
        by_channel = f" ({low_h}x{low_w} to {high_h}x{high_w} by channel)" if len(sizes) > 1 else ""
        return f"{self.size[0]}x{self.size[1]}{by_channel}"


# --- the walk ---------------------------------------------------------------------------------


def _walk(
    root: Any, out_nr: int, start: Piece, target: Any, name: Callable[[Any], str]
) -> tuple[list[Piece], list[str]]:
    """Pieces reaching ``target`` (the input's AccumulateGrad) from ``root``, in topological order,
    and the global gates on the way; raises ``Whole`` when some path mixes all positions."""
    parents: dict[int, list[Any]] = {}
    stack, seen = [root], {id(root)}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(id(child), []).append(node)
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    live, queue = {id(target)}, [target]
    while queue:
        for parent in parents.get(id(queue.pop()), []):
            if id(parent) not in live:
                live.add(id(parent))
                queue.append(parent)
    if id(root) not in live:
        raise Unsupported("its value does not depend on the input")
    waiting = {key: sum(id(p) in live for p in ps) for key, ps in parents.items() if key in live}
    state: dict[tuple[int, int], list[Piece]] = {(id(root), out_nr): [start]}
    ready, notes, wholes = [root], [], []
    while ready:
        node = ready.pop()
        if node is target:
            continue
        op = Op(node, live, name)
        rule = rule_for(op.kind)
        pieces = [(nr, p) for nr in range(max(len(op.outs), 1)) for p in state.pop((id(node), nr), [])]
        if pieces and rule is None:
            raise Unsupported(f"cannot follow positions through {op.where}")
        for nr, piece in pieces:
            try:
                for edge, out in rule(op, nr, piece):  # type: ignore[misc]
                    child, child_nr = node.next_functions[edge]
                    _add(state.setdefault((id(child), child_nr), []), out)
            except Gate as gate:
                notes.append(str(gate))
            except Whole as whole:
                wholes.append(str(whole))
        notes += op.notes
        for child, _ in node.next_functions:
            if child is not None and id(child) in live:
                waiting[id(child)] -= 1
                if waiting[id(child)] == 0:
                    ready.append(child)
    if wholes:
        raise Whole(wholes[0])
    return state.get((id(target), 0), []), notes


def _add(pieces: list[Piece], new: Piece) -> None:
    """Unite ``new`` with a piece of the same channels (hull of the axes) or of the same axes (union
    of the channels): both unions are exact products; else keep it apart."""
    if not bool(new.chan.table.any()):
        return  # no layer channel comes this way (another branch of a concatenation)
    for k, old in enumerate(pieces):
        if old.layout != new.layout:
            continue
        if all(_same(old.axes[a], new.axes[a]) for a in old.axes):
            pieces[k] = replace(old, chan=old.chan | new.chan)
            return
        if old.chan.same(new.chan):
            pieces[k] = replace(old, axes={a: _hull(old.axes[a], new.axes[a]) for a in old.axes})
            return
    if len(pieces) == MAX_PIECES:
        raise Unsupported(f"more than {MAX_PIECES} distinct paths meet at one tensor")
    pieces.append(new)


def _same(a: Axis, b: Axis) -> bool:
    return (a.start, a.jump, a.size) == (b.start, b.jump, b.size) and torch.equal(a.reach, b.reach)


def _hull(a: Axis, b: Axis) -> Axis:
    if a.jump != b.jump and len(a.reach) > 1:
        raise Unsupported(f"paths with different strides ({a.jump} and {b.jump}) meet")
    low, high = min(a.start, b.start), max(a.start + a.size, b.start + b.size)
    return Axis(a.reach | b.reach, low, max(a.jump, b.jump), high - low)


# --- the entry point --------------------------------------------------------------------------


def _counter() -> int:
    """The autograd sequence number the next op gets (nodes are numbered as they are made)."""
    return int(torch.zeros((), requires_grad=True).view(()).grad_fn._sequence_nr()) + 1  # type: ignore[union-attr]


def _newest(value: Any) -> int:
    items = value if isinstance(value, (tuple, list)) else (value,)
    seqs = [t.grad_fn._sequence_nr() for t in items if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    return max(seqs, default=-1)


def receptive_field(
    ctx: Context, layer: str, example: torch.Tensor, technique: str = "receptive field", unit_dim: int = 1
) -> LayerField | None:
    """The receptive fields of the units of ``layer`` (its output), for inputs shaped like
    ``example``; None for a (N, F) layer, whose units see the whole input. ``unit_dim`` 3 reads a
    4-D output as a channels-last (N, H, W, C) map."""
    if not example.is_floating_point() or example.dim() != 4:
        raise PyengineError(f"{technique}: receptive fields need (N, C, H, W) float images, got {example.dtype} "
                            f"of shape {tuple(example.shape)}")  # fmt: skip
    x = example[:1].detach().clone().to(ctx.device).requires_grad_(True)
    names = {id(m): n for n, m in ctx.model.named_modules() if n}
    opened: list[int] = []
    calls: list[tuple[str, int, int, int]] = []  # name, first and last node made, output rank

    def before(module: Any, args: Any) -> None:
        opened.append(_counter())

    def after(module: Any, args: Any, output: Any) -> None:
        rank = output.dim() if isinstance(output, torch.Tensor) else 0
        calls.append((names[id(module)], opened.pop(), _newest(output), rank))

    with ctx.record([layer], grad=True) as seen, ctx.hooks() as scope, torch.enable_grad():
        for module in ctx.model.modules():
            if id(module) in names:
                scope.forward_pre(module, before)
                scope.forward(module, after)
        ctx.model(x)
        out = seen[layer]

    def name(node: Any) -> str:
        seq = node._sequence_nr()
        inside = next((n for n, first, last, _ in calls if first <= seq <= last), None)
        return f"{node.name()} in {inside!r}" if inside else node.name()

    if out.dim() == 2:
        return None
    if out.dim() != 4:
        raise PyengineError(_not_a_map(technique, layer, out, calls, name))
    target = x.view_as(x).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
    root = out.grad_fn if out.grad_fn is not None else target if out is x else None
    last = unit_dim in (3, -1)
    channels, height, width = (out.shape[3], *out.shape[1:3]) if last else out.shape[1:]
    eye = lambda n: torch.eye(n, dtype=torch.bool)  # noqa: E731
    c, h, w = (Atom("C", channels),), (Atom("H", height),), (Atom("W", width),)
    layout = ((Atom("N", 1),), h, w, c) if last else ((Atom("N", 1),), c, h, w)
    start = Piece(
        layout,
        Chan.of(torch.arange(channels), eye(channels)),
        {"H": Axis(eye(height), 0, 1, 1), "W": Axis(eye(width), 0, 1, 1)},
    )
    try:
        if root is None:
            raise Unsupported("its value does not depend on the input")
        pieces, notes = _walk(root, out.output_nr, start, target, name)
        return _result(layer, pieces, notes, (x.shape[2], x.shape[3]), technique)
    except Unsupported as error:
        raise PyengineError(f"{technique}: no receptive field for {layer!r}: {error}") from None
    except Whole as whole:
        raise PyengineError(f"{technique}: the units of {layer!r} see the whole input through {whole}") from None


def _result(layer: str, pieces: list[Piece], notes: list[str], image: tuple[int, int], technique: str) -> LayerField:
    kept = []
    for piece in pieces:
        atoms = piece.layout[2:] if len(piece.layout) == 4 else ()
        if atoms == ((Atom("H", image[0]),), (Atom("W", image[1]),)):
            kept.append(piece)
        elif hidden := [a.origin for dim in atoms for a in dim if a.origin]:
            raise Whole(f"a contraction over positions ({hidden[0]})")
        else:
            raise Unsupported("the layer's rows and columns do not map to the input's rows and columns")
    also = tuple(dict.fromkeys(notes))
    if not kept:
        raise Whole(also[0] if also else "global ops")
    member = torch.stack([p.chan.table.any(1)[p.chan.index] for p in kept], 1)  # (layer channels, pieces)
    if not bool(member.any(1).all()):
        channel = int((~member.any(1)).nonzero()[0])
        raise PyengineError(f"{technique}: channel {channel} of {layer!r} sees the input only through global ops "
                            f"({', '.join(also) or 'none'}); no receptive field")  # fmt: skip
    rows, group = torch.unique(member, dim=0, return_inverse=True)
    fields = tuple(_field([p for p, used in zip(kept, row.tolist(), strict=True) if used]) for row in rows)
    return LayerField(layer, image, group, fields, _field(kept), also)


def _field(pieces: list[Piece]) -> ReceptiveField:
    axes = [pieces[0].axes[a] for a in "HW"]
    for piece in pieces[1:]:
        axes = [_hull(axis, piece.axes[a]) for axis, a in zip(axes, "HW", strict=True)]

    def spans(reach: torch.Tensor) -> torch.Tensor:
        first = reach.float().argmax(1)
        return torch.stack([first, reach.shape[1] - reach.flip(1).float().argmax(1)], 1)

    h, w = axes
    return ReceptiveField((h.size, w.size), (h.jump, w.jump), (h.start, w.start), (spans(h.reach), spans(w.reach)))


def _not_a_map(
    technique: str, layer: str, out: torch.Tensor, calls: list[tuple[str, int, int, int]], name: Callable[[Any], str]
) -> str:
    """Why a layer that is not an (N, C, H, W) map has no receptive field, and which map before it has."""
    message = f"{technique}: {layer!r} outputs {tuple(out.shape)}, not an (N, C, H, W) map"
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if any(kind in node.name() for kind in ("Attention", "Softmax", "Bmm")):
            message += f": its units see the whole input through {name(node)}"
            break
        stack.extend(child for child, _ in node.next_functions)
    path = layer.split("#")[0].split("[")[0]
    before = [n for n, *_, rank in calls[: next((k for k, c in enumerate(calls) if c[0] == path), 0)] if rank == 4]
    return message + (f"; the last map before it is {before[-1]!r}" if before else "")
