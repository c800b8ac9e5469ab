"""Independent references for the architecture matrix (``tests/test_architectures.py``).

Nothing here calls pyengine: layer values come from forward hooks that clone (the model goes on
with the clone, so in-place ops after the module leave the recorded value as the module returned
it, and gradients still flow), gradients from float64 autograd on a copy of the model, and ReLUs
are found by patching ``torch.nn.functional.relu``, which ``nn.ReLU`` and ``F.relu`` both call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_RELU = F.relu


def split_reference(reference: str) -> tuple[str, int]:
    """``"layer1.0.relu#2"`` -> (``"layer1.0.relu"``, 2); a plain path is its first call."""
    path, _, call = reference.partition("#")
    return path, int(call or 1)


@contextmanager
def cloned_outputs(model: nn.Module, references: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward pass fills the dict with each referenced module call's output."""
    modules = dict(model.named_modules())
    values: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = [model.register_forward_pre_hook(lambda module, args: calls.clear())]

    def make_hook(path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            calls[path] = calls.get(path, 0) + 1
            for reference in references:
                if split_reference(reference) == (path, calls[path]):
                    values[reference] = output
            return output.clone()

        return hook

    for path in dict.fromkeys(split_reference(r)[0] for r in references):
        handles.append(modules[path].register_forward_hook(make_hook(path)))
    try:
        yield values
    finally:
        for handle in handles:
            handle.remove()


def record_values(model: nn.Module, references: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The referenced values for inputs ``x`` (no gradients)."""
    with cloned_outputs(model, references) as values, torch.no_grad():
        model(x)
    return {name: values[name].detach() for name in references}


def float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


NONLINEARITIES = (nn.ReLU, nn.GELU, nn.Hardswish, nn.SiLU, nn.Tanh)  # the zoo's hidden-unit nonlinearities


def is_nonlinearity(module: nn.Module) -> bool:
    """torch's hidden-unit nonlinearities and every activation module of transformers (GELUActivation, ...)."""
    return isinstance(module, NONLINEARITIES) or type(module).__module__ == "transformers.activations"


def nonlinearity_calls(model: nn.Module, x: torch.Tensor | Mapping[str, torch.Tensor]) -> list[str]:
    """References to every call of a hidden-unit nonlinearity module, in the order they run, for
    the first row of ``x`` (a tensor, or keyword tensors: ``model(**x)``)."""
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda module, args, out: order.append(names[id(module)]))
        for m in model.modules()
        if is_nonlinearity(m)
    ]
    with torch.no_grad():
        model(**{key: value[:1] for key, value in x.items()}) if isinstance(x, Mapping) else model(x[:1])
    for handle in handles:
        handle.remove()
    seen: dict[str, int] = {}
    references = []
    for name in order:
        seen[name] = seen.get(name, 0) + 1
        references.append(name if order.count(name) == 1 else f"{name}#{seen[name]}")
    return references


# --- units: the zoo's 4-D values are conv maps (units on dim 1), its 3-D ones token sequences -------


def unit_dim(value: torch.Tensor) -> int:
    """Channels of (B, C, H, W) maps, the last dim of (B, T, D) token sequences, units of (B, units)."""
    return value.dim() - 1 if value.dim() == 3 else 1


def unit_rows(value: torch.Tensor) -> torch.Tensor:
    """(B * positions, units): every position of a row is a sample."""
    if value.dim() == 2:
        return value
    return value.movedim(unit_dim(value), -1).reshape(-1, value.shape[unit_dim(value)])


def pooled_units(value: torch.Tensor) -> torch.Tensor:
    """(B, units): a conv map's positions by max, a sequence's tokens by mean."""
    if value.dim() == 2:
        return value
    positions = value.movedim(unit_dim(value), -1).flatten(1, -2)
    return positions.amax(1) if value.dim() == 4 else positions.mean(1)


def covariance_spectrum(rows: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the (1/n) covariance of float64 rows, descending."""
    values = rows.double().numpy()
    return np.linalg.eigvalsh(np.cov(values, rowvar=False, bias=True).reshape(values.shape[1], -1))[::-1].copy()


def jacobian_grams(model: nn.Module, references: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[JᵀJ] over units for J = ∂ output / ∂ layer (every output coordinate, every position), float64."""
    model64, x64 = float64(model), x.double()
    with cloned_outputs(model64, references) as values:
        output = model64(x64).flatten(1)
    grams = {name: torch.zeros(()) for name in references}
    for o in range(output.shape[1]):
        rows = torch.autograd.grad(output[:, o].sum(), [values[name] for name in references], retain_graph=True)
        for name, row in zip(references, rows):
            g = unit_rows(row)
            grams[name] = grams[name] + g.T @ g
    return {name: gram / x.shape[0] for name, gram in grams.items()}


# --- guided backpropagation through every ReLU, modules and functional calls alike ------------------


def _guided_relu(value: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """max(value, 0), whose incoming gradient is clipped to its positive part by a tensor hook;
    autograd's own mask (value > 0) does the rest."""
    out = value.clamp(min=0)
    if out.requires_grad:
        out.register_hook(lambda grad: grad.clamp(min=0))
    return out


def guided_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Guided backprop (Springenberg et al.) in float64: ∂ output[target] / ∂ x with every ReLU
    passing back only positive gradients where its output was positive."""
    model64 = float64(model)
    leaf = x.double().requires_grad_(True)
    with mock.patch.object(F, "relu", _guided_relu):
        output = model64(leaf)
    (grad,) = torch.autograd.grad(output.gather(1, targets[:, None]).sum(), leaf)
    return grad


# --- ReLU layers and masked gradients (pathwise) ----------------------------------------------------


@dataclass
class ReluPass:
    """One forward pass's ReLU calls in order: their names as layer references (``path``, ``path#k``
    for a module run several times, ``relu:<k>`` for the k-th call when functional) and outputs."""

    names: list[str] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)  # pre-activations
    outputs: list[torch.Tensor] = field(default_factory=list)
    output: torch.Tensor | None = None


def relu_pass(model: nn.Module, x: torch.Tensor, masks: dict[int, torch.Tensor] | None = None) -> ReluPass:
    """Run ``model(x)``; the k-th ReLU's output gets its gradient multiplied by ``masks[k]``."""
    running: list[str] = []  # the nn.ReLU modules whose forward is running
    modules: list[str] = []  # per ReLU call: the nn.ReLU module running it ("" for a functional call)
    counts: dict[str, int] = {}
    seen = ReluPass()

    def before(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            running.append(name)

        return hook

    def relu(value: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        out = _RELU(value)
        k = len(seen.outputs)
        if masks and k in masks and out.requires_grad:
            mask = masks[k]
            out.register_hook(lambda grad: grad * mask)
        seen.inputs.append(value)
        seen.outputs.append(out)
        modules.append(running.pop() if running else "")
        return out

    handles = [
        module.register_forward_pre_hook(before(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.ReLU)
    ]
    try:
        with mock.patch.object(F, "relu", relu):
            seen.output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    called: dict[str, int] = {}
    functional = 0
    for name in modules:
        if not name:
            seen.names.append(f"relu:{functional}")  # the k-th functional call
            functional += 1
            continue
        called[name] = called.get(name, 0) + 1
        seen.names.append(name if counts[name] == 1 else f"{name}#{called[name]}")
    return seen


def path_model(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, units: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, b, f) in float64 of the local linear model of a path for output ``targets`` (B,): W is the
    gradient with the backward signal masked, at each ReLU call k in ``units``, to the (B, n) flat
    unit indices given (-1: none); b = (masked ∂f/∂a at the lowest such call)·a − W·x. Without
    ``units``, the whole network: W = ∂f/∂x and b = f − W·x."""
    model64, x64 = float64(model), x.double()
    masks = {}
    if units:
        shapes = [a.shape for a in relu_pass(model64, x64).outputs]
        for k, chosen in units.items():
            flat = torch.zeros(len(x), shapes[k][1:].numel() + 1, dtype=torch.float64)
            flat.scatter_(1, torch.where(chosen < 0, flat.shape[1] - 1, chosen), 1.0)
            masks[k] = flat[:, :-1].reshape(shapes[k])
    leaf = x64.clone().requires_grad_(True)
    seen = relu_pass(model64, leaf, masks)
    assert seen.output is not None
    scores = seen.output.gather(1, targets[:, None].to(seen.output.device))[:, 0]
    lowest = min(masks) if masks else None
    wanted = [leaf] + ([seen.outputs[lowest]] if lowest is not None else [])
    grads = torch.autograd.grad(scores.sum(), wanted)
    weight = grads[0]
    weight_part = (weight * x64).flatten(1).sum(1)
    if lowest is None:
        return weight, scores.detach() - weight_part, scores.detach()
    carried = (grads[1] * masks[lowest] * seen.outputs[lowest].detach()).flatten(1).sum(1)
    return weight, carried - weight_part, scores.detach()


def greedy_paths(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical decomposition (Cheng et al., Algorithm 1, beam 1) of a chain of ReLU calls, by
    float64 autograd through whatever runs between them (BatchNorm, pooling, flattening): from the
    target down, at each ReLU call the unit j maximising (∂h_u / ∂a_j) · a_j among the units the
    chosen unit u of the call above (or the target output) depends on. Ties: the lower unit.
    Returns paths (B, T, 1, calls) and scores (B, T, 1) like the technique."""
    seen = relu_pass(float64(model), x.double())
    assert seen.output is not None
    layers, batch = len(seen.outputs), x.shape[0]
    paths = torch.full((batch, targets.shape[1], 1, layers), -1, dtype=torch.long)
    scores = torch.zeros(batch, targets.shape[1], 1, dtype=torch.float64)
    rows = torch.arange(batch)
    for t in range(targets.shape[1]):
        above = seen.output.flatten(1)[rows, targets[:, t]]
        for layer in reversed(range(layers)):
            a = seen.outputs[layer]
            (grad,) = torch.autograd.grad(above.sum(), a, retain_graph=True)
            importance = (grad * a).detach().flatten(1)
            importance[grad.flatten(1) == 0] = -torch.inf  # not connected to the unit above
            best = importance.argmax(1)
            paths[:, t, 0, layer] = best
            scores[:, t, 0] += importance[rows, best]
            if layer:
                above = seen.inputs[layer].flatten(1)[rows, best]
    return paths, scores


def locate_patch(patch: torch.Tensor, image: torch.Tensor) -> tuple[int, int, int, int]:
    """The image box (y0, y1, x0, x1) a max-patches crop shows, from its pixels (zero outside the
    unit's field: the image's edges, or the rest of the fields' hull after a concatenation)."""
    shown = patch.abs().sum(0) > 0
    rows, columns = shown.any(1).nonzero().flatten(), shown.any(0).nonzero().flatten()
    assert rows.numel() and columns.numel(), "the patch shows no input pixels"
    py0, py1, px0, px1 = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    region = patch[:, py0:py1, px0:px1]
    windows = image.unfold(1, py1 - py0, 1).unfold(2, px1 - px0, 1)
    found = (windows == region[:, None, None]).flatten(-2).all(-1).all(0).nonzero()
    assert len(found) == 1, f"the patch is not one crop of its input ({len(found)} matches)"
    y0, x0 = (int(v) for v in found[0])
    return y0, y0 + py1 - py0, x0, x0 + px1 - px0


# --- relu-sync: firing patterns of recorded values ------------------------------------------------


def check_firing(res: Any, layer: str, fires: torch.Tensor) -> None:
    """relu-sync's result for ``layer`` against ``fires`` (samples, units) in {0, 1}: agreement,
    firing rates, dead and always-on units, and the groups of live units with identical patterns."""
    n = fires.shape[0]
    assert res.samples[layer] == n and res.group[layer].shape == (fires.shape[1],)
    torch.testing.assert_close(
        res.agreement[layer].double(), (fires.T @ fires + (1 - fires).T @ (1 - fires)) / n, rtol=1e-6, atol=1e-6
    )
    rate = fires.mean(0)
    torch.testing.assert_close(res.firing_rate[layer].double(), rate, rtol=1e-6, atol=1e-6)
    assert res.dead[layer] == int((rate == 0).sum()) and res.always_on[layer] == int((rate == 1).sum())
    live = (rate > 0) & (rate < 1)
    patterns: dict[bytes, list[int]] = {}
    for unit in live.nonzero().flatten().tolist():
        patterns.setdefault(fires[:, unit].numpy().tobytes(), []).append(unit)
    groups = [units for units in patterns.values() if len(units) > 1]
    assert res.groups[layer] == len(groups)
    grouped = {unit for units in groups for unit in units}
    for unit in range(fires.shape[1]):
        assert (int(res.group[layer][unit]) >= 0) == (unit in grouped)
    assert len({tuple(int(res.group[layer][u]) for u in units) for units in groups}) == len(groups)
    for units in groups:
        assert len({int(res.group[layer][u]) for u in units}) == 1


def zeroed_unit_scores(
    model: nn.Module, reference: str, dim: int, unit: int, scores: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``scores()`` with unit ``unit`` (along ``dim``) of the layer's output set to 0 at the
    referenced call, by a plain forward hook (the unit-ablation reference)."""
    path, call = split_reference(reference)
    calls = [0]

    def count(_: nn.Module, args: Any) -> None:
        calls[0] = 0

    def zero(_: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        if calls[0] != call:
            return None
        index = torch.tensor([unit], device=output.device)
        return output.index_fill(dim, index, 0.0)

    handles = [model.register_forward_pre_hook(count), model.get_submodule(path).register_forward_hook(zero)]
    try:
        with torch.no_grad():
            return scores()
    finally:
        for handle in handles:
            handle.remove()


def check_ablation_drops(res: Any, model: nn.Module, scores: Callable[[], torch.Tensor], layers: int = 3) -> None:
    """unit-ablation's drops of a few layers (first, middle, last) against ``zeroed_unit_scores``:
    ``scores()`` gives the (N, K) scores the targets index."""
    with torch.no_grad():
        base = scores()
    assert torch.equal(res.targets, base.argmax(1))
    names = list(res.drops)
    picked = dict.fromkeys([names[0], names[len(names) // 2], names[-1]][:layers])
    for layer in picked:
        dim = {"channels": 1, "units": 1, "last": -1}[res.unit_axis[layer]]
        for column, unit in enumerate(res.units[layer].tolist()):
            ablated = zeroed_unit_scores(model, layer, dim, unit, scores)
            expected = (base - ablated).gather(1, res.targets[:, None])[:, 0]
            scale = max(float(base.abs().max()), 1e-6)
            assert float((res.drops[layer][:, column] - expected).abs().max()) <= 1e-5 * scale, (layer, unit)
