"""How autograd nodes move positions: the per-op rules of the receptive-field walk (``_receptive``).

A *piece* is what flows back from the layer's output toward the input: a product of, per layer
channel, the channels of the current tensor it reaches (``Chan``) and, per spatial axis of the
layer, which positions of the current tensor each layer position reaches (``Axis``, clipped to the
tensor, with the unclipped affine geometry beside it). ``Piece.layout`` says which tensor dims
hold the batch, features and the layer's rows and columns (``Atom``), so views, permutes and
channels-last ``nn.Linear`` are followed. A rule maps a piece at a node's output to pieces at its
inputs; ``RULES`` holds them by node type.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import torch


class Atom(NamedTuple):
    """A factor of a tensor dim: 'N' batch, 'C' features, 'H'/'W' the layer's rows/columns."""

    kind: str
    size: int
    origin: str = ""  # a feature dim made by a contraction or reduction (that op): it may hide positions


Layout = tuple[tuple[Atom, ...], ...]


@dataclass(frozen=True)
class Axis:
    """Along one of the layer's axes: the positions of a tensor that each layer position reaches."""

    reach: torch.Tensor  # bool (layer positions, tensor positions)
    start: int  # unclipped, layer position i reaches [start + i * jump, start + i * jump + size)
    jump: int
    size: int


@dataclass(frozen=True)
class Chan:
    """Which channels of a tensor each layer channel reaches: row ``index[c]`` of ``table``. Rows are
    kept unique, so the many layer channels that reach the same channels share one row."""

    index: torch.Tensor  # (layer channels,) long
    table: torch.Tensor  # bool (rows, product of the tensor's 'C' atom sizes in layout order)

    @staticmethod
    def of(index: torch.Tensor, table: torch.Tensor) -> Chan:
        table, inverse = torch.unique(table.reshape(len(table), -1), dim=0, return_inverse=True)
        return Chan(inverse[index], table)

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Chan:
        """Apply ``f`` to every row (it maps rows independently and keeps empty rows empty)."""
        return Chan.of(self.index, f(self.table))

    def __or__(self, other: Chan) -> Chan:
        pairs, index = torch.unique(torch.stack([self.index, other.index], 1), dim=0, return_inverse=True)
        return Chan.of(index, self.table[pairs[:, 0]] | other.table[pairs[:, 1]])

    def same(self, other: Chan) -> bool:
        return torch.equal(self.index, other.index) and torch.equal(self.table, other.table)


@dataclass(frozen=True)
class Piece:
    layout: Layout
    chan: Chan
    axes: dict[str, Axis]  # 'H', 'W'


class Whole(Exception):
    """This path mixes all positions (the message names the op): the unit sees the whole input."""


class Gate(Exception):
    """This path is a global gate or term broadcast over positions (the message names the op)."""


class Unsupported(Exception):
    """Positions cannot be followed through this op."""


class Op:
    """One autograd node with the shapes around it."""

    def __init__(self, node: Any, live: set[int], name: Callable[[Any], str]) -> None:
        self.node, self.kind, self._name = node, node.name().rstrip("0123456789"), name
        self.outs = [tuple(m.shape) for m in getattr(node, "_input_metadata", ())]
        self.out_shape = self.outs[0] if self.outs else ()
        edges = node.next_functions
        self.shapes = [None if c is None else tuple(c._input_metadata[nr].shape) for c, nr in edges]
        self.live = [c is not None and id(c) in live for c, _ in edges]
        self.notes: list[str] = []

    @cached_property
    def where(self) -> str:
        return self._name(self.node)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of the first input (the one a conv, pool, view or reduction reads)."""
        if self.shapes[0] is None:
            raise Unsupported(f"{self.where} reads a tensor that needs no gradient")
        return self.shapes[0]

    def only_input(self) -> None:
        if any(self.live[1:]):
            raise Unsupported(f"{self.where} takes weights computed from the input")


Rule = Callable[[Op, int, Piece], Iterator[tuple[int, Piece]]]


# --- moving dims and channels -----------------------------------------------------------------


def _signed(value: int, ndim: int) -> int:
    """A saved dim (negative ones come back as unsigned 64-bit) as an index into ``ndim`` dims."""
    return (value - 2**64 if value >= 2**63 else value) % ndim


def _redim(p: Piece, d: int, atoms: tuple[Atom, ...], f: Callable[[torch.Tensor], torch.Tensor]) -> Piece:
    """Replace dim ``d``'s atoms; ``f`` maps channel rows viewed as (rows, before, dim d, after)."""
    sizes = [a.size for dim in p.layout for a in dim if a.kind == "C"]
    before = sum(a.kind == "C" for dim in p.layout[:d] for a in dim)
    inside = sum(a.kind == "C" for a in p.layout[d])
    shape = (math.prod(sizes[:before]), math.prod(sizes[before : before + inside]), -1)
    chan = p.chan.map(lambda t: f(t.reshape(len(t), *shape)))
    return replace(p, layout=p.layout[:d] + (atoms,) + p.layout[d + 1 :], chan=chan)


def _mixed(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Every channel of the dim reaches every one of ``size`` new channels."""
    return lambda c: c.any(2, keepdim=True).expand(-1, -1, size, -1)


def _embedded(size: int, index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dim's channels are channels ``index`` of ``size``."""

    def f(c: torch.Tensor) -> torch.Tensor:
        out = c.new_zeros(c.shape[0], c.shape[1], size, c.shape[3])
        out[:, :, index] = c
        return out

    return f


def _gathered(size: int, index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``size`` channels, channel i being the dim's channel ``index[i]`` (none where out of range)."""

    def f(c: torch.Tensor) -> torch.Tensor:
        out, valid = c.new_zeros(c.shape[0], c.shape[1], size, c.shape[3]), (index >= 0) & (index < c.shape[2])
        out[:, :, valid] = c[:, :, index[valid]]
        return out

    return f


def _part(start: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dim's channels ``start .. start + size`` (one input of a concatenation)."""
    return lambda c: c[:, :, start : start + size]


def _fresh(p: Piece, d: int, size: int, origin: str) -> Piece:
    """Dim ``d`` mixed into ``size`` features of unknown meaning (made by op ``origin``)."""
    if any(a.kind in "HW" for a in p.layout[d]):
        raise Whole(f"a contraction over positions ({origin})")
    return _redim(p, d, (Atom("C", size, origin),), _mixed(size))


def _spatial(p: Piece, d: int, op: Op) -> Atom:
    atoms = p.layout[d]
    if len(atoms) == 1 and atoms[0].kind in "HW":
        return atoms[0]
    hidden = [a.origin for a in atoms if a.origin]
    if hidden:
        raise Whole(f"a contraction over positions ({hidden[0]})")
    raise Unsupported(f"{op.where} slides over dim {d}, which is not one of the layer's spatial axes")


def _window(p: Piece, d: int, taps: torch.Tensor, n_in: int, geometry: tuple[int, int, int], op: Op) -> Piece:
    """Dim ``d`` through a windowed op: ``taps`` (out positions, k) are the input positions each output
    position reads (outside [0, n_in): padding); ``geometry`` is (extent, stride, padding)."""
    atom = _spatial(p, d, op)
    axis = p.axes[atom.kind]
    valid = (taps >= 0) & (taps < n_in)
    step = torch.zeros(len(taps), n_in, dtype=torch.int)
    step[torch.arange(len(taps))[:, None].expand_as(taps)[valid], taps[valid]] = 1
    reach = (axis.reach.int() @ step) > 0
    if not bool(reach.any(1).all()):  # a unit would see only padding along this axis: not a product any more
        raise Unsupported(f"a unit sees only the padding of {op.where} along one axis")
    extent, stride, pad = geometry
    new = Axis(reach, axis.start * stride - pad, axis.jump * stride, (axis.size - 1) * stride + extent)
    layout = p.layout[:d] + ((Atom(atom.kind, n_in),),) + p.layout[d + 1 :]
    return replace(p, layout=layout, axes={**p.axes, atom.kind: new})


def _taps(n_out: int, kernel: int, stride: int, pad: int, dilation: int) -> torch.Tensor:
    return torch.arange(n_out)[:, None] * stride - pad + torch.arange(kernel)[None] * dilation


def _plain(p: Piece, op: Op) -> None:
    """Batch and channel dims (0, 1) of a conv or pooling output hold no spatial axis."""
    if len(p.layout) != 4 or any(a.kind in "HW" for dim in p.layout[:2] for a in dim):
        raise Unsupported(f"{op.where} works on a tensor laid out other than (N, C, H, W)")


def _unbroadcast(p: Piece, out_shape: tuple[int, ...], shape: tuple[int, ...], op: Op) -> Piece:
    """From an elementwise op's output to an operand of ``shape`` broadcast to it."""
    extra = len(out_shape) - len(shape)
    for d, size in enumerate(out_shape):
        if size != 1 and (d < extra or shape[d - extra] == 1):
            if any(a.kind in "HW" for a in p.layout[d]):
                raise Gate(f"a global gate or term ({op.where})")
            p = _redim(p, d, (Atom("C", 1),), lambda c: c.any(2, keepdim=True))
    if any(a.kind in "HW" for dim in p.layout[:extra] for a in dim):
        raise Gate(f"a global gate or term ({op.where})")
    return replace(p, layout=p.layout[extra:])


def _regroup(p: Piece, shape: tuple[int, ...], op: Op) -> Piece:
    """The layout of a view's input: the same atoms (features may split), regrouped into ``shape``."""
    atoms, dims, k = [a for dim in p.layout for a in dim], [], 0
    for d, size in enumerate(shape):
        group, have = [], 1
        while k < len(atoms):
            a = atoms[k]
            if have == size:  # size-1 atoms go here only if enough remain for the dims after
                if a.size != 1 or len(atoms) - k - 1 < len(shape) - d - 1:
                    break
            elif size % (have * a.size):
                factor = size // have
                if a.kind in "HW" or size % have or factor == 1 or a.size % factor:
                    raise Unsupported(f"{op.where} reshapes across the layer's spatial axes (windows, patches)")
                atoms[k : k + 1] = [a._replace(size=factor), a._replace(size=a.size // factor)]
                continue
            group.append(a)
            have *= a.size
            k += 1
        if have != size:
            raise Unsupported(f"{op.where} reshapes across the layer's spatial axes (windows, patches)")
        dims.append(tuple(group))
    if any(a.kind in "HW" for a in atoms[k:]):
        raise Unsupported(f"{op.where} drops a spatial axis")
    return replace(p, layout=tuple(dims))


# --- rules by node type -----------------------------------------------------------------------


def _conv(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    node, shape = op.node, op.input_shape
    if node._saved_transposed or len(node._saved_stride) != 2:
        raise Unsupported(f"{op.where} is not a plain 2-d convolution")
    op.only_input()
    _plain(p, op)
    kernel = node._saved_weight.shape[2:]
    for d in (2, 3):
        k, s, pad, dil = (
            kernel[d - 2],
            node._saved_stride[d - 2],
            node._saved_padding[d - 2],
            node._saved_dilation[d - 2],
        )
        p = _window(p, d, _taps(op.out_shape[d], k, s, pad, dil), shape[d], ((k - 1) * dil + 1, s, pad), op)
    groups, cin = node._saved_groups, shape[1]

    def grouped(c: torch.Tensor) -> torch.Tensor:
        n, pre, cout, post = c.shape
        reach = c.reshape(n, pre, groups, cout // groups, post).any(3, keepdim=True)
        return reach.expand(n, pre, groups, cin // groups, post).reshape(n, pre, cin, post)

    yield 0, _redim(p, 1, (Atom("C", cin),), grouped)


def _pool(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    node, shape = op.node, op.input_shape
    _plain(p, op)

    def pair(values: Any, default: tuple[int, ...]) -> tuple[int, ...]:
        values = tuple(values) or default
        return values * 2 if len(values) == 1 else values

    kernel = pair(node._saved_kernel_size, ())
    stride, pad = pair(node._saved_stride, kernel), pair(node._saved_padding, (0,))
    dilation = pair(getattr(node, "_saved_dilation", ()), (1,))
    for d in (2, 3):
        k, s, pd, dl = kernel[d - 2], stride[d - 2], pad[d - 2], dilation[d - 2]
        p = _window(p, d, _taps(op.out_shape[d], k, s, pd, dl), shape[d], ((k - 1) * dl + 1, s, pd), op)
    yield 0, p


def _adaptive(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    _plain(p, op)
    for d in (2, 3):
        n_in, n_out = op.input_shape[d], op.out_shape[d]
        if n_in % n_out:
            raise Unsupported(f"{op.where} pools {n_in} positions into {n_out} uneven windows")
        k = n_in // n_out
        p = _window(p, d, _taps(n_out, k, k, 0, 1), n_in, (k, k, 0), op)
    yield 0, p


def _reduce(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    shape = op.input_shape
    saved = getattr(op.node, "_saved_dim", ())
    saved = (saved,) if isinstance(saved, int) else tuple(saved)
    dims = sorted({_signed(d, len(shape)) for d in saved}) or list(range(len(shape)))
    if not getattr(op.node, "_saved_keepdim", False):
        layout = list(p.layout)
        for d in dims:
            layout.insert(d, ())
        p = replace(p, layout=tuple(layout))
    for d in dims:
        atoms = p.layout[d]
        if len(atoms) == 1 and atoms[0].kind in "HW" and atoms[0].size == 1:  # the whole axis, exactly
            p = _window(p, d, _taps(1, shape[d], 1, 0, 1), shape[d], (shape[d], 1, 0), op)
        else:
            p = _fresh(p, d, shape[d], op.where)
    yield 0, p


def _elementwise(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    for edge, shape in enumerate(op.shapes):
        if op.live[edge] and shape is not None:
            try:
                yield edge, _unbroadcast(p, op.out_shape, shape, op)
            except Gate as gate:
                op.notes.append(str(gate))


def _norm(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    op.only_input()
    if op.kind == "NativeLayerNormBackward":
        for d in range(len(p.layout) - len(op.node._saved_normalized_shape), len(p.layout)):
            if any(a.kind in "HW" for a in p.layout[d]):
                op.notes.append(f"statistics over positions ({op.where})")
            p = _redim(p, d, p.layout[d], lambda c: c.any(2, keepdim=True).expand_as(c))
    elif op.kind == "NativeGroupNormBackward" or getattr(op.node, "_saved_training", False):
        op.notes.append(f"statistics over positions ({op.where})")
    yield 0, p


def _view(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    shape = op.input_shape
    yield 0, (_unbroadcast(p, op.out_shape, shape, op) if op.kind == "ExpandBackward" else _regroup(p, shape, op))


def _permute(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    n = len(p.layout)
    if op.kind == "PermuteBackward":
        order = [_signed(d, n) for d in op.node._saved_dims]
    else:  # transpose: forward output dim i is input dim order[i]
        order = list(range(n))
        a, b = (1, 0) if op.kind == "TBackward" else (_signed(op.node._saved_dim0, n), _signed(op.node._saved_dim1, n))
        if n > 1:
            order[a], order[b] = order[b], order[a]
    ids, counter = [], 0
    for dim in p.layout:
        ids.append([counter + j for j in range(sum(a.kind == "C" for a in dim))])
        counter += len(ids[-1])
    layout: list[tuple[Atom, ...]] = [()] * n
    moved: list[list[int]] = [[]] * n
    for i, o in enumerate(order):
        layout[o], moved[o] = p.layout[i], ids[i]
    sizes = [a.size for dim in p.layout for a in dim if a.kind == "C"]
    chan = p.chan.map(lambda t: t.reshape(len(t), *sizes).permute(0, *[1 + j for dim in moved for j in dim]))
    yield 0, replace(p, layout=tuple(layout), chan=chan)


def _channels(p: Piece, d: int, op: Op, what: str) -> str:
    if any(a.kind in "HW" for a in p.layout[d]):
        raise Unsupported(f"{op.where} {what} along a spatial axis")
    return next((a.origin for a in p.layout[d] if a.origin), "")


def _cat(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    d = _signed(op.node._saved_dim, len(op.out_shape))
    origin = _channels(p, d, op, "concatenates")
    if None in op.shapes:
        raise Unsupported(f"{op.where} concatenates a tensor that needs no gradient")
    sizes = [shape[d] for shape in op.shapes if shape is not None]
    for edge, (size, offset) in enumerate(zip(sizes, [0, *itertools.accumulate(sizes)], strict=False)):
        if op.live[edge]:
            yield edge, _redim(p, d, (Atom("C", size, origin),), _part(offset, size))


def _split(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    shape = op.input_shape
    d = _signed(op.node._saved_dim, len(shape))
    origin = _channels(p, d, op, "splits")
    offset = sum(out[d] for out in op.outs[:nr])
    index = offset + torch.arange(op.outs[nr][d])
    yield 0, _redim(p, d, (Atom("C", shape[d], origin),), _embedded(shape[d], index))


def _slice(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    shape = op.input_shape
    d = _signed(op.node._saved_dim, len(shape))
    start = op.node._saved_start
    start = start - 2**64 if start >= 2**63 else start
    start = min(max(start + shape[d] if start < 0 else start, 0), shape[d])
    step, m = op.node._saved_step, op.out_shape[d]
    if any(a.kind in "HW" for a in p.layout[d]):
        yield 0, _window(p, d, _taps(m, 1, step, -start, 1), shape[d], (1, step, -start), op)
    else:
        origin = _channels(p, d, op, "slices")
        yield 0, _redim(p, d, (Atom("C", shape[d], origin),), _embedded(shape[d], start + step * torch.arange(m)))


def _pad(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    """``F.pad`` with a constant: along a spatial axis a shift by the padding before, along features
    an offset (CIFAR ResNets' option-A shortcut pads channels)."""
    shape = op.input_shape
    pads = [v - 2**64 if v >= 2**63 else v for v in op.node._saved_pad]  # last dim first: before, after
    for j in range(len(pads) // 2):
        d, before = len(shape) - 1 - j, pads[2 * j]
        if any(a.kind in "HW" for a in p.layout[d]):
            p = _window(p, d, _taps(op.out_shape[d], 1, 1, before, 1), shape[d], (1, 1, before), op)
        elif before or shape[d] != op.out_shape[d]:
            origin = _channels(p, d, op, "pads")
            p = _redim(p, d, (Atom("C", shape[d], origin),), _gathered(shape[d], torch.arange(shape[d]) + before))
    yield 0, p


def _select(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    """``x.select(d, i)`` or output ``nr`` of ``x.unbind(d)``: the input has dim ``d`` back, as features."""
    shape = op.input_shape
    d = _signed(op.node._saved_dim, len(shape))
    index = op.node._saved_index if op.kind == "SelectBackward" else nr
    index = index - 2**64 if index >= 2**63 else index
    p = replace(p, layout=p.layout[:d] + ((),) + p.layout[d:])
    yield 0, _redim(p, d, (Atom("C", shape[d]),), _embedded(shape[d], torch.tensor([index % shape[d]])))


def _matmul(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    n = len(op.out_shape)
    left = 1 if op.kind in ("AddmmBackward", "BaddbmmBackward") else 0
    if left and op.live[0] and op.shapes[0] is not None:  # the added term
        try:
            yield 0, _unbroadcast(p, op.out_shape, op.shapes[0], op)
        except Gate as gate:
            op.notes.append(str(gate))
    for edge, gone in ((left, n - 1), (left + 1, n - 2)):  # left @ right: left's last, right's second-last dim
        shape = op.shapes[edge]
        if op.live[edge] and shape is not None:
            yield edge, _fresh(p, gone, shape[gone], op.where)


def _attention(op: Op, nr: int, p: Piece) -> Iterator[tuple[int, Piece]]:
    n = len(op.out_shape)
    for edge, shape in enumerate(op.shapes):
        if not op.live[edge] or shape is None or len(shape) != n:
            continue
        if op.kind in ("SoftmaxBackward", "LogSoftmaxBackward"):
            mixed = [_signed(op.node._saved_dim, n)]
        else:  # attention: every query position reads every key and value
            mixed = [n - 1] if edge == 0 else [n - 2, n - 1]
        q = p
        for d in mixed:
            q = _fresh(q, d, shape[d], op.where)
        yield edge, q


ELEMENTWISE = (
    "Add Sub Rsub Mul Div Maximum Minimum Where Pow Relu Hardswish Hardsigmoid Hardtanh LeakyRelu Elu Celu Gelu Silu "
    "Mish Sigmoid Tanh Softplus LogSigmoid Threshold Clone ToCopy Neg Abs Exp Log Sqrt Rsqrt Clamp ClampMin "
    "ClampMax Erf Reciprocal NativeDropout PreluKernel Addcmul Addcdiv Lerp Alias"
).split()
RULES: dict[str, Rule] = {
    **{f"{name}Backward": _elementwise for name in ELEMENTWISE},
    "ConvolutionBackward": _conv,
    **{f"{name}Backward": _pool for name in ("MaxPool2DWithIndices", "AvgPool2D")},
    **{f"{name}Backward": _adaptive for name in ("AdaptiveAvgPool2D", "AdaptiveMaxPool2D")},
    **{f"{name}Backward": _reduce for name in "Mean Sum Amax Amin Max Min Logsumexp Std Var Norm".split()},
    **{f"{name}Backward": _norm for name in "NativeBatchNorm CudnnBatchNorm MiopenBatchNorm NativeLayerNorm".split()},
    "NativeGroupNormBackward": _norm,
    **{f"{n}Backward": _view for n in "View UnsafeView ReshapeAlias _ReshapeAlias Squeeze Unsqueeze Expand".split()},
    **{f"{name}Backward": _permute for name in ("Permute", "Transpose", "T")},
    "CatBackward": _cat,
    "SplitBackward": _split,
    "SplitWithSizesBackward": _split,
    "SliceBackward": _slice,
    "SelectBackward": _select,
    "ConstantPadNdBackward": _pad,
    "UnbindBackward": _select,
    **{f"{name}Backward": _matmul for name in ("Mm", "Addmm", "Bmm", "Baddbmm")},
    "SoftmaxBackward": _attention,
    "LogSoftmaxBackward": _attention,  # and every ScaledDotProduct*Backward (rule_for)
}


def rule_for(kind: str) -> Rule | None:
    """The rule for a node type (its name without the version digits); None for an unknown one."""
    return RULES.get(kind, _attention if kind.startswith("ScaledDotProduct") else None)
