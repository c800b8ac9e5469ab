"""Which ops a forward pass runs on input-dependent tensors, and whether pathwise analysis can model them.

A torch function mode sees every call at the level the model's code makes it (``F.conv2d``,
``Tensor.add_``, ``F.batch_norm``, ``F.layer_norm``, ...); calls on tensors that do not depend on
the input (parameters, layer scales, class tokens) are not classified. An input-dependent call is

- a ReLU (``F.relu``, ``torch.relu``, ``Tensor.relu(_)``, in place or not): a layer of units;
- a max pool (``max_pool{1,2,3}d``, ``adaptive_max_pool{1,2,3}d``): a selection, fixed at x;
- affine in its input-dependent arguments: convolutions, linear maps, BatchNorm in eval mode,
  average pooling, dropout in eval mode, sums of tensors (residual adds, in place or not),
  concatenation, scaling by constants, reshaping and indexing;
- anything else (GELU, LayerNorm, attention, products of two input-dependent tensors, BatchNorm in
  training mode, ...): refused with one line naming the innermost module that runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from pyengine.errors import PyengineError

RELUS = frozenset({"relu", "relu_"})
MAX_POOLS = frozenset(
    {f"{kind}max_pool{d}d{suffix}" for kind in ("", "adaptive_") for d in (1, 2, 3) for suffix in ("", "_with_indices")}
)
# Affine in any number of input-dependent arguments (given the others).
JOINTLY_AFFINE = frozenset(
    """add add_ __add__ __iadd__ __radd__ sub sub_ __sub__ __isub__ __rsub__ rsub subtract neg neg_ __neg__
    negative __pos__ positive cat concat concatenate stack hstack vstack sum mean clone contiguous view view_as
    reshape reshape_as flatten unflatten permute transpose transpose_ t squeeze squeeze_ unsqueeze unsqueeze_
    expand expand_as __getitem__ __setitem__ split split_with_sizes chunk narrow select unbind movedim moveaxis
    swapaxes swapdims flip roll repeat tile to type type_as float double half bfloat16 cpu cuda pad
    avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d interpolate
    upsample pixel_shuffle pixel_unshuffle channel_shuffle copy_ zero_ requires_grad_ alias""".split()
)
# Linear in exactly one input-dependent argument (the others are constants).
AFFINE_IN_ONE = frozenset(
    """conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear batch_norm mul mul_
    __mul__ __rmul__ __imul__ multiply div div_ __truediv__ __itruediv__ true_divide divide matmul __matmul__
    __rmatmul__ mm bmm einsum tensordot""".split()
)
DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
DIVISIONS = frozenset({"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"})
NOT_PIECEWISE_LINEAR = frozenset(
    """gelu gelu_ silu silu_ hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid sigmoid_ tanh tanh_ softmax
    log_softmax softmin softplus softsign mish elu elu_ selu selu_ celu celu_ logsigmoid tanhshrink glu rrelu
    layer_norm group_norm instance_norm local_response_norm rms_norm normalize multi_head_attention_forward
    scaled_dot_product_attention exp log log1p sqrt rsqrt pow __pow__ __rpow__ square erf sin cos reciprocal
    __rtruediv__ norm var std""".split()
)
READS_VALUES = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"})
TENSOR_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real"})  # linear views; ``.data`` would detach


def op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a tensor attribute (``.shape``, ``.T``)
        return "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, names: tuple[str, ...], default: Any) -> Any:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else default


def is_inplace_relu(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return name == "relu_" or bool(_argument(args, kwargs, 1, ("inplace",), False))


def pool_with_indices(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A max pool call's output and indices (``F.*max_pool*d_with_indices`` with its arguments)."""
    index = 2 if name.startswith("adaptive") else 6
    args = (*args[:index], True, *args[index + 1 :]) if len(args) > index else args
    kwargs = {**kwargs, "return_indices": True} if len(args) <= index else kwargs
    func = getattr(F, name.removesuffix("_with_indices") + "_with_indices")
    pooled, indices = func(*args, **kwargs)
    return pooled, indices


def wants_indices(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    index = 2 if name.startswith("adaptive") else 6
    return name.endswith("_with_indices") or bool(_argument(args, kwargs, index, ("return_indices",), False))


def select(name: str, source: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A max pool's output at fixed ``indices`` (flat per plane, as max pooling returns them): linear in source."""
    spatial = int(name.split("max_pool")[1][0])
    return source.flatten(-spatial).gather(-1, indices.flatten(-spatial)).view(indices.shape)


def is_inplace(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


@dataclass
class Op:
    """One input-dependent call other than a ReLU: its name, arguments, the module running it and
    how many ReLU layers ran before it."""

    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: str
    after_layers: int
    input_shape: tuple[int, ...]  # the shape of its first input-dependent argument


@dataclass
class ReluCall:
    name: str  # module path (``#k`` appended later for a module run several times), or ``relu:<k>``
    module_path: str | None  # the nn.ReLU module running it, None for a functional call
    call: int  # index among all ReLU calls of the pass
    pre: torch.Tensor  # the input h (a copy)
    post: torch.Tensor  # the output a (a copy)
    node: Any  # the output's autograd node (dropped once the layers' parents are known)


@dataclass
class Trace:
    """An input-dependent view of one forward pass."""

    relus: list[ReluCall] = field(default_factory=list)
    selections: dict[int, torch.Tensor] = field(default_factory=dict)  # max pool call index -> indices
    ops: list[Op] = field(default_factory=list)
    relu_calls: int = 0
    pool_calls: int = 0


class Tracer(TorchFunctionMode):
    """Records the ReLU layers, max pool selections and affine ops of one pass; raises on anything else.

    ``scope`` is the stack of (module path, module) calls running, kept by the caller's hooks."""

    def __init__(self, technique: str, model: nn.Module, scope: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.technique, self.model, self.scope = technique, model, scope
        self.trace = Trace()
        self._dependent: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so ids stay unique
        self._functional = 0

    def mark(self, value: Any) -> None:
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                self._dependent[id(leaf)] = leaf

    def depends(self, leaf: Any) -> bool:
        return isinstance(leaf, torch.Tensor) and self._dependent.get(id(leaf)) is leaf

    def where(self) -> str:
        if not self.scope or self.scope[-1][0] == "":
            return f"the forward of {type(self.model).__name__}"
        path, module = self.scope[-1]
        return f"{path!r} ({type(module).__name__})"

    def refuse(self, name: str, why: str) -> PyengineError:
        return PyengineError(
            f"{self.technique}: {self.where()} runs {name}, {why}; pathwise analysis models ReLU networks "
            "(Linear/Conv, BatchNorm in eval mode, ReLU, max and average pooling, residual adds, concatenation)"
        )

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        dependent = [leaf for leaf in tree_leaves((args, kwargs)) if self.depends(leaf)]
        if not dependent:
            if op_name(func) in RELUS:
                self.trace.relu_calls += 1
            elif op_name(func) in MAX_POOLS:
                self.trace.pool_calls += 1
            return func(*args, **kwargs)
        name = op_name(func)
        if name in RELUS:
            return self._relu(func, name, args, kwargs)
        if name in MAX_POOLS:
            call, self.trace.pool_calls = self.trace.pool_calls, self.trace.pool_calls + 1
            pooled, indices = pool_with_indices(name, args, kwargs)
            self.trace.selections[call] = indices.detach()
            self._record(func, name, args, kwargs)
            result = (pooled, indices) if wants_indices(name, args, kwargs) else pooled
            self.mark(pooled)
            return result
        self._check(func, name, args, kwargs, dependent)
        result = func(*args, **kwargs)
        if not (name in JOINTLY_AFFINE or name in AFFINE_IN_ONE or name in DROPOUTS or name[1:] in TENSOR_ATTRIBUTES):
            if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
                raise self.refuse(name, "which pathwise analysis cannot model (not an affine op, ReLU or max pooling)")
            return result
        self._record(func, name, args, kwargs)
        self.mark(result)
        if is_inplace(name) and args:
            self.mark(args[0])
        return result

    def _check(
        self, func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any], dependent: list[Any]
    ) -> None:
        if name in NOT_PIECEWISE_LINEAR:
            raise self.refuse(name, "which is not piecewise linear")
        if name in {"detach", "detach_", ".data"}:
            raise self.refuse(name, "which cuts input-dependent values off the gradient")
        if name in READS_VALUES:
            raise self.refuse(name, "which reads input-dependent values into Python (the pass could branch on them)")
        if name in DROPOUTS and _argument(args, kwargs, 2, ("training", "train"), True):
            if float(_argument(args, kwargs, 1, ("p",), 0.5)) > 0:
                raise self.refuse(name, "in training mode (random masks); call model.eval()")
        if name == "batch_norm" and _argument(args, kwargs, 5, ("training",), False):
            raise self.refuse(
                name,
                "in training mode or without running statistics (batch statistics couple the inputs); "
                "call model.eval()",
            )
        if name in DIVISIONS and len(args) > 1 and self.depends(args[1]):
            raise self.refuse(name, "which divides by an input-dependent tensor (not piecewise linear)")
        if name in AFFINE_IN_ONE and len(dependent) > 1:
            raise self.refuse(name, f"which combines {len(dependent)} input-dependent tensors (not piecewise linear)")

    def _relu(self, func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        source = args[0]
        pre = source.detach().clone()
        result = func(*args, **kwargs)
        module = self.scope[-1] if self.scope and isinstance(self.scope[-1][1], nn.ReLU) else None
        if module is None:
            label, self._functional = f"relu:{self._functional}", self._functional + 1
        else:
            label = module[0]
        self.trace.relus.append(
            ReluCall(
                label,
                module[0] if module else None,
                self.trace.relu_calls,
                pre,
                result.detach().clone(),
                result.grad_fn,
            )
        )
        self.trace.relu_calls += 1
        self.mark(result)
        return result

    def _record(self, func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keeps the constant arguments only (input-dependent ones would hold on to the pass's graph)."""
        shape = next(tuple(v.shape) for v in tree_leaves((args, kwargs)) if self.depends(v))
        args, kwargs = tree_map(lambda v: None if self.depends(v) else v, (args, kwargs))
        self.trace.ops.append(Op(name, func, args, kwargs, self.where(), len(self.trace.relus), shape))


def name_layers(relus: list[ReluCall]) -> list[str]:
    """Layer names: a module's path, with ``#k`` (1-based) for a module run several times per pass."""
    counts: dict[str, int] = {}
    for relu in relus:
        counts[relu.name] = counts.get(relu.name, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for relu in relus:
        seen[relu.name] = seen.get(relu.name, 0) + 1
        several = relu.module_path is not None and counts[relu.name] > 1
        names.append(f"{relu.name}#{seen[relu.name]}" if several else relu.name)
    return names
