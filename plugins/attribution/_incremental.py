"""Incremental occlusion (Krypton; Nakandala, Kumar, Papakonstantinou, SIGMOD 2019).

The unoccluded pass runs once and every node of the model's ``torch.fx`` graph keeps its
output. An occluding window changes only a box of each feature map: the box of a convolution
or pooling output is the set of positions whose field meets the box of its input; an elementwise
op (activations, eval BatchNorm, dropout) keeps it; a residual add or a channel concatenation
takes the union of its inputs' boxes. For a batch of windows each node computes only its box
(one size per node, so the windows are batched into one call), reading the cached unoccluded
map around it with the changed box pasted in. A node whose box would cover more than
``full_above`` of its map, and every node after the first op that is not one of these (global
pooling, flatten, linear, attention, anything unknown), runs in full on maps rebuilt from the
cache and the boxes. Exact: equal to the plain sweep up to float32 rounding.

Approximate (Krypton's projective-field thresholding): ``cap`` < 1 limits each box to that
fraction of its map's side, centred on the exact box; positions outside it keep their
unoccluded values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

CONST, INC, FULL = "const", "inc", "full"

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
POINTWISE_FUNCTIONS: tuple[Any, ...] = (
    F.relu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.relu6,
    F.leaky_relu,
    F.elu,
    torch.nn.functional.mish,
)
POINTWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous")
BINARY = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)
BINARY_METHODS = ("add", "sub", "mul")


@dataclass
class Box:
    """A node's changed region: one size per node, a top-left corner per window."""

    size: tuple[int, int]
    starts: torch.Tensor  # (windows, 2) long, map coordinates

    def area(self) -> int:
        return self.size[0] * self.size[1]


@dataclass
class Step:
    """How one graph node runs during the sweep."""

    mode: str  # CONST (no input dependence), INC (its box only) or FULL
    kind: str = ""  # for INC: conv, pool, pointwise, binary, cat
    box: Box | None = None
    reason: str = ""  # why a node depending on the input runs in full
    direct: frozenset[fx.Node] = frozenset()  # INC inputs whose box is this node's: used as they are
    flops_full: float = 0.0  # per window
    flops_done: float = 0.0  # per window, as run


@dataclass
class Plan:
    graph: fx.GraphModule
    steps: dict[fx.Node, Step]
    cached: dict[fx.Node, Any] = field(default_factory=dict)  # the unoccluded value of each node
    first_full: str = ""  # the first node run in full and why

    def cache_bytes(self) -> int:
        """Bytes of the unoccluded values kept for the sweep."""
        return sum(v.numel() * v.element_size() for v in self.cached.values() if isinstance(v, torch.Tensor))

    def bytes_per_window(self) -> int:
        """An upper bound of the bytes one (window, image) entry needs in a pass: every box, its
        crop, and every map run in full."""
        total = 0
        for node, step in self.steps.items():
            value = self.cached.get(node)
            if not isinstance(value, torch.Tensor) or step.mode == CONST:
                continue
            one = value[:1].numel() * value.element_size()
            if step.mode == INC and step.box is not None and value.dim() == 4:
                total += 3 * value.shape[1] * step.box.area() * value.element_size()
            else:
                total += 2 * one
        return total

    def flops(self) -> tuple[float, float]:
        """(plain sweep, incremental) multiply-adds per window."""
        full = sum(step.flops_full for step in self.steps.values())
        done = sum(step.flops_done for step in self.steps.values())
        return full, done


class NotIncremental(Exception):
    """The model cannot be swept incrementally (the plain sweep runs; the message says why)."""


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = fx.symbolic_trace(model)
    except Exception as error:  # any tracing failure means: use the plain sweep
        raise NotIncremental(f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__})") from None
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotIncremental(f"the traced model takes {len(placeholders)} inputs; incremental occlusion needs one")
    return graph


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps a copy of every node's value (in-place ops cannot change it)."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__(graph)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """``module`` is a ``kind`` that computes what ``kind`` does: a subclass that overrides
    ``forward`` (timm's Conv2dSame pads in it, StdConv2d standardises its weights) is not."""
    return isinstance(module, kind) and type(module).forward is kind.forward


def _window_op(
    module: nn.Module,
) -> tuple[str, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """(kind, kernel, stride, padding, dilation) of a conv or pool whose box can be computed, else None."""
    if _plain(module, nn.Conv2d) and isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
            return None
        padding = (0, 0) if isinstance(module.padding, str) else _pair(module.padding)
        return "conv", _pair(module.kernel_size), _pair(module.stride), padding, _pair(module.dilation)
    if _plain(module, nn.MaxPool2d) and isinstance(module, nn.MaxPool2d) and not module.return_indices:
        stride = module.stride if module.stride is not None else module.kernel_size
        return "pool", _pair(module.kernel_size), _pair(stride), _pair(module.padding), _pair(module.dilation)
    if (
        _plain(module, nn.AvgPool2d)
        and isinstance(module, nn.AvgPool2d)
        and not module.ceil_mode
        and module.divisor_override is None
    ):
        padding = _pair(module.padding)
        if padding != (0, 0) and not module.count_include_pad:
            return None
        stride = module.stride if module.stride is not None else module.kernel_size
        return "pool", _pair(module.kernel_size), _pair(stride), padding, (1, 1)
    return None


def _kind(graph: fx.GraphModule, node: fx.Node) -> str:
    """conv, pool, pointwise, binary, cat, or '' (runs in full)."""
    if node.op == "call_module":
        module = graph.get_submodule(str(node.target))
        op = _window_op(module)
        if op is not None:
            return op[0]
        if any(_plain(module, kind) for kind in POINTWISE_MODULES):
            return "pointwise"
        if _plain(module, nn.BatchNorm2d) and not module.training and getattr(module, "running_mean", None) is not None:
            return "pointwise"
        return ""
    if node.op == "call_function":
        if node.target in POINTWISE_FUNCTIONS:  # in place is harmless: boxes are fresh crops
            return "pointwise"
        if node.target in BINARY:
            return "binary"
        if node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return "cat" if dim in (1, -3) else ""
        return ""
    if node.op == "call_method":
        if node.target in POINTWISE_METHODS:
            return "pointwise"
        if node.target in BINARY_METHODS:
            return "binary"
    return ""


def _window_boxes(
    out_size: int, lo: torch.Tensor, hi: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, the output positions [lo', hi') whose field meets input rows [lo, hi)."""
    reach = dilation * (kernel - 1)
    first = torch.div(lo + padding - reach + stride - 1, stride, rounding_mode="floor").clamp(min=0)
    last = (torch.div(hi - 1 + padding, stride, rounding_mode="floor") + 1).clamp(max=out_size)
    return first, torch.maximum(last, first)


def _uniform(lo: torch.Tensor, hi: torch.Tensor, size_of_map: int, cap: float) -> tuple[int, torch.Tensor]:
    """One box size for every window (the largest; at most ``cap`` of the map, centred) and the
    starts, moved inside the map."""
    size = int((hi - lo).max()) if lo.numel() else 0
    if cap < 1.0:
        limit = max(1, math.ceil(cap * size_of_map))
        if size > limit:
            centre = torch.div(lo + hi, 2, rounding_mode="floor")
            lo, size = centre - limit // 2, limit
    size = max(1, min(size, size_of_map))
    return size, lo.clamp(min=0, max=size_of_map - size)


def _spatial(value: Any) -> tuple[int, int] | None:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return int(value.shape[2]), int(value.shape[3])
    return None


def _node_flops(graph: fx.GraphModule, node: fx.Node, value: Any, area: float) -> float:
    """Multiply-adds per window of a conv over ``area`` output positions; other ops: their elements."""
    if not isinstance(value, torch.Tensor):
        return 0.0
    channels = value.shape[1] if value.dim() > 1 else 1
    if node.op == "call_module":
        module = graph.get_submodule(str(node.target))
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            return float(area * channels * module.in_channels // module.groups * k)
        if isinstance(module, nn.Linear):
            return float(value[0].numel() * module.in_features)
    return float(area * channels)


def make_plan(
    graph: fx.GraphModule,
    example: torch.Tensor,
    windows: torch.Tensor,
    window_size: tuple[int, int],
    full_above: float,
    cap: float,
) -> Plan:
    """The sweep's plan for the images ``example`` (B, C, H, W), with their unoccluded values:
    every node's mode and box. ``windows``: (W, 2) top-left corners of the window boxes (one
    size, inside the input)."""
    recorder = _Recorder(graph)
    with torch.no_grad():
        recorder.run(example)
    values = recorder.values
    steps: dict[fx.Node, Step] = {}
    first_full = ""
    for node in graph.graph.nodes:
        value = values.get(node)
        spatial = _spatial(value)
        per_window_full = _node_flops(graph, node, value, spatial[0] * spatial[1] if spatial else 1.0)
        if node.op == "placeholder":
            steps[node] = Step(INC, "input", Box(window_size, windows))
            continue
        inputs = [a for a in node.all_input_nodes if steps[a].mode != CONST]
        if not inputs:
            steps[node] = Step(CONST)
            continue
        kind = _kind(graph, node) if spatial is not None and node.op != "output" else ""
        reason = ""
        if not kind:
            reason = f"{node.op} {node.target}" if node.op != "output" else "the output"
        elif any(steps[a].mode == FULL for a in inputs):
            reason = "after a node run in full"
        box: Box | None = None
        if not reason and spatial is not None:
            box = _box(graph, node, kind, steps, values, spatial, cap)
            if box is None:
                reason = "inputs of another shape"
            elif box.area() > full_above * spatial[0] * spatial[1]:
                reason = f"its changed box covers {box.area() / (spatial[0] * spatial[1]):.0%} of the map"
        if reason:
            steps[node] = Step(FULL, reason=reason, flops_full=per_window_full, flops_done=per_window_full)
            if not first_full and node.op != "output":
                first_full = f"{node.name} ({reason})"
        else:
            region = box if box is not None else Box((1, 1), windows)
            done = _node_flops(graph, node, value, region.area())
            same = frozenset(
                a
                for a in inputs
                if kind not in ("conv", "pool")
                and (other := steps[a].box) is not None
                and other.size == region.size
                and (other is region or torch.equal(other.starts, region.starts))
            )
            steps[node] = Step(INC, kind, region, flops_full=per_window_full, flops_done=done, direct=same)
    if all(step.mode != INC or step.kind == "input" for step in steps.values()):
        raise NotIncremental(f"the first op on the input runs in full: {first_full or 'none is supported'}")
    return Plan(graph, steps, values, first_full)


def _box(
    graph: fx.GraphModule,
    node: fx.Node,
    kind: str,
    steps: dict[fx.Node, Step],
    values: dict[fx.Node, Any],
    spatial: tuple[int, int],
    cap: float,
) -> Box | None:
    """The changed box of an INC node's output, or None when its inputs do not fit the rules."""
    changing = [a for a in node.all_input_nodes if steps[a].mode == INC]
    boxes: list[Box] = [box for box in (steps[a].box for a in changing) if box is not None]
    if not boxes or len(boxes) != len(changing):
        return None
    if kind in ("conv", "pool"):
        op = _window_op(graph.get_submodule(str(node.target)))
        if op is None or len(changing) != 1:
            return None
        _, kernel, stride, padding, dilation = op
        box = boxes[0]
        sizes, starts = [], []
        for axis in range(2):
            lo = box.starts[:, axis]
            first, last = _window_boxes(
                spatial[axis], lo, lo + box.size[axis], kernel[axis], stride[axis], padding[axis], dilation[axis]
            )
            size, start = _uniform(first, last, spatial[axis], cap)
            sizes.append(size)
            starts.append(start)
        return Box((sizes[0], sizes[1]), torch.stack(starts, 1))
    # pointwise, binary, cat: a changing input has the output's map (and, for binary ops, its
    # shape); a constant one that map size or broadcast over positions (a bias, a scalar)
    output = values[node]
    for arg in node.all_input_nodes:
        value = values.get(arg)
        if not isinstance(value, torch.Tensor) or value.dim() < 3:
            continue
        where = (int(value.shape[-2]), int(value.shape[-1]))
        if arg in changing:
            if value.dim() != 4 or where != spatial or kind == "binary" and value.shape[1:] != output.shape[1:]:
                return None
        elif where not in (spatial, (1, 1)):
            return None
    if len(boxes) == 1:
        return boxes[0]
    sizes, starts = [], []
    for axis in range(2):
        lo = torch.stack([b.starts[:, axis] for b in boxes]).amin(0)
        hi = torch.stack([b.starts[:, axis] + b.size[axis] for b in boxes]).amax(0)
        size, start = _uniform(lo, hi, spatial[axis], 1.0)
        sizes.append(size)
        starts.append(start)
    return Box((sizes[0], sizes[1]), torch.stack(starts, 1))


class Sweep:
    """Runs a plan for batches of (image, window) pairs."""

    def __init__(self, plan: Plan, images: int) -> None:
        self.plan = plan
        self.graph = plan.graph
        self.modules = dict(self.graph.named_modules())
        self._images = images  # of the cached pass
        self._windows = torch.zeros(0, dtype=torch.long)
        self._runs: list[tuple[int, int, torch.Tensor | None]] = []
        self._sources: dict[tuple[fx.Node, fx.Node], tuple[torch.Tensor, tuple[int, int, int, int]]] = {}

    def run(self, images: torch.Tensor, windows: torch.Tensor, first_region: torch.Tensor) -> Any:
        """The model's outputs for entries (image ``images[e]``, window ``windows[e]``), sorted by
        window, whose input box holds ``first_region[e]`` (C, h, w)."""
        ids, counts = torch.unique_consecutive(windows, return_counts=True)
        ends = counts.cumsum(0).tolist()
        self._windows = ids
        self._runs = []  # entries a..b: one window, these images (None: all, in order)
        every = torch.arange(self._images, device=images.device)
        first = 0
        for end in ends:
            these = images[first:end]
            whole = end - first == self._images and bool((these == every).all())
            self._runs.append((first, end, None if whole else these))
            first = end
        live: dict[fx.Node, Any] = {}
        remaining = {node: len(node.users) for node in self.graph.graph.nodes}
        result: Any = None
        for node in self.graph.graph.nodes:
            step = self.plan.steps[node]
            if step.mode == CONST:
                continue
            if node.op == "placeholder":
                live[node] = first_region
            elif step.mode == INC:
                live[node] = self._incremental(node, step, live, images)
            elif node.op == "output":
                result = self._full(node, live, images, output=True)
            else:
                live[node] = self._full(node, live, images)
            for arg in node.all_input_nodes:  # free what no later node reads
                remaining[arg] -= 1
                if remaining[arg] == 0:
                    live.pop(arg, None)
        return result

    def _mutates(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return bool(getattr(self.modules[str(node.target)], "inplace", False))
        if node.op == "call_method":
            return str(node.target).endswith("_")
        return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith("_")

    # --- boxes ---------------------------------------------------------------------------

    def _padded(
        self, arg: fx.Node, consumer: fx.Node, starts: torch.Tensor, size: tuple[int, int], pad: float
    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """``arg``'s cached map padded with ``pad`` as far as any window's crop for ``consumer``
        reaches (made once per sweep), and the (left, right, top, bottom) pads."""
        key = (arg, consumer)
        if key not in self._sources:
            cached: torch.Tensor = self.plan.cached[arg]
            height, width = cached.shape[2:]
            top, left = int(-starts[:, 0].min()), int(-starts[:, 1].min())
            bottom = int((starts[:, 0] + size[0]).max()) - height
            right = int((starts[:, 1] + size[1]).max()) - width
            pads = (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0))
            self._sources[key] = (F.pad(cached, pads, value=pad) if any(pads) else cached, pads)
        return self._sources[key]

    def _crop(
        self,
        arg: fx.Node,
        live: dict[fx.Node, Any],
        starts: torch.Tensor,
        size: tuple[int, int],
        pad: float,
        consumer: fx.Node,
    ) -> torch.Tensor:
        """(entries, C, h, w): ``arg``'s map from each window's corner ``starts[window]`` (may reach
        into the padding, filled with ``pad``), its changed box pasted in; channels last."""
        cached: torch.Tensor = self.plan.cached[arg]
        source, pads = self._padded(arg, consumer, starts, size, pad)
        corners = starts[self._windows]
        step = self.plan.steps[arg]
        inc = step.mode == INC and step.box is not None
        region: torch.Tensor | None = live[arg] if inc else None
        boxes = step.box.starts[self._windows].tolist() if inc and step.box is not None else []
        h, w = step.box.size if inc and step.box is not None else (0, 0)
        entries = self._runs[-1][1]
        out = torch.empty(
            (entries, cached.shape[1], *size),
            dtype=cached.dtype,
            device=cached.device,
            memory_format=torch.channels_last,
        )
        for k, ((first, last, images), (y, x)) in enumerate(zip(self._runs, corners.tolist())):
            block = source[:, :, y + pads[2] : y + pads[2] + size[0], x + pads[0] : x + pads[0] + size[1]]
            if cached.shape[0] == 1:  # a constant map shared by every image
                out[first:last] = block
            else:
                out[first:last] = block if images is None else block.index_select(0, images)
            if region is not None:
                dy, dx = boxes[k][0] - y, boxes[k][1] - x  # where the box sits in the crop
                y0, y1, x0, x1 = max(dy, 0), min(dy + h, size[0]), max(dx, 0), min(dx + w, size[1])
                if y0 < y1 and x0 < x1:
                    out[first:last, :, y0:y1, x0:x1] = region[first:last, :, y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        return out

    def _incremental(self, node: fx.Node, step: Step, live: dict[fx.Node, Any], images: torch.Tensor) -> torch.Tensor:
        box = step.box
        if box is None:
            raise NotIncremental(f"{node.name}: no box")
        starts = box.starts
        if step.kind in ("conv", "pool"):
            module = self.modules[str(node.target)]
            op = _window_op(module)
            if op is None:
                raise NotIncremental(f"{node.name}: not a window op")
            _, kernel, stride, padding, dilation = op
            need = tuple((box.size[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in range(2))
            origin = starts * torch.tensor(stride, device=starts.device) - torch.tensor(padding, device=starts.device)
            pad = float("-inf") if isinstance(module, nn.MaxPool2d) else 0.0
            crop = self._crop(node.args[0], live, origin, (need[0], need[1]), pad, node)  # type: ignore[arg-type]
            if isinstance(module, nn.Conv2d):
                return F.conv2d(crop, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
            if isinstance(module, nn.MaxPool2d):
                return F.max_pool2d(crop, module.kernel_size, module.stride, 0, module.dilation)
            return F.avg_pool2d(crop, module.kernel_size, module.stride, 0)
        size = box.size

        mutates = self._mutates(node)

        def value(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            if arg in step.direct:  # the same box: no crop; copied only if an in-place op would change it
                return live[arg].clone() if mutates and len(arg.users) > 1 else live[arg]
            cached = self.plan.cached[arg]
            if self.plan.steps[arg].mode == CONST and _spatial(cached) != _spatial(self.plan.cached[node]):
                return cached  # a bias, a scalar, a broadcast constant
            return self._crop(arg, live, starts, size, 0.0, node)

        args = fx.node.map_aggregate(node.args, value)
        kwargs = fx.node.map_aggregate(node.kwargs, value)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_method":
            this, *rest = args
            return getattr(this, str(node.target))(*rest, **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]

    def _full(self, node: fx.Node, live: dict[fx.Node, Any], images: torch.Tensor, output: bool = False) -> Any:
        """A node run on whole maps: changed boxes pasted into copies of the cached maps."""

        def value(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            step = self.plan.steps[arg]
            if step.mode == FULL:
                return live[arg]
            cached = self.plan.cached[arg]
            if step.mode == CONST:
                return cached
            if not isinstance(cached, torch.Tensor) or step.box is None:
                return live[arg]
            whole = cached[images] if cached.shape[0] > 1 else cached.expand(len(images), *cached.shape[1:]).clone()
            region: torch.Tensor = live[arg]
            h, w = step.box.size
            for (first, last, _), (y, x) in zip(self._runs, step.box.starts[self._windows].tolist()):
                whole[first:last, :, y : y + h, x : x + w] = region[first:last]
            return whole

        args = fx.node.map_aggregate(node.args, value)
        kwargs = fx.node.map_aggregate(node.kwargs, value)
        if output:
            return args[0]
        if self._mutates(node):  # an in-place op must not change a value another node reads
            args = fx.node.map_aggregate(args, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_method":
            this, *rest = args
            return getattr(this, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            return self.plan.cached[node]
        target: Callable[..., Any] = node.target  # type: ignore[assignment]
        return target(*args, **kwargs)
