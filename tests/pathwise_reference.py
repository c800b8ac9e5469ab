"""Pure-autograd reference of hierarchical decomposition (Cheng et al., Algorithm 1, with a beam).

One backward pass per (input, target, beam entry, layer): the importance of unit j for target
unit t is (∂h_t / ∂a_j) · a_j; the candidates are the units connected to t (the support of the
same gradient with every weight set to one). Ties: the earlier path, then the lower unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def step_forward(pool: nn.Module | None, linear: nn.Module, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mid = pool(a) if pool is not None else a
    if isinstance(linear, nn.Linear):
        return F.linear(mid.flatten(1), weight)
    return F.conv2d(mid, weight, None, linear.stride, linear.padding, linear.dilation)


def reference_paths(
    steps: list[tuple[nn.Module | None, nn.Module]], activations: list[torch.Tensor], targets: torch.Tensor, beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """steps[l] = (pool, linear) after ReLU layer l; activations[l]: (B, *S_l). Returns like the op."""
    layers = len(activations)
    batch, per_input = targets.shape
    paths = torch.full((batch, per_input, beam, layers), -1, dtype=torch.long)
    scores = torch.full((batch, per_input, beam), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for k in range(per_input):
            entries = [(0.0, [], int(targets[b, k]))]
            for layer in reversed(range(layers)):
                pool, linear = steps[layer]
                a = activations[layer][b : b + 1].detach().double().requires_grad_(True)
                h = step_forward(pool, linear, a, linear.weight.detach().double()).flatten()
                reach = step_forward(pool, linear, a, torch.ones_like(linear.weight, dtype=torch.float64)).flatten()
                candidates = []
                for parent, (score, _units, unit) in enumerate(entries):
                    weight = torch.autograd.grad(h[unit], a, retain_graph=True)[0].flatten()
                    connected = torch.autograd.grad(reach[unit], a, retain_graph=True)[0].flatten() > 0
                    importance = weight * a.detach().flatten()
                    for j in connected.nonzero().flatten().tolist():
                        candidates.append((score + float(importance[j]), parent, j))
                candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
                entries = [(s, entries[p][1] + [j], j) for s, p, j in candidates[:beam]]
            for rank, (score, units, _) in enumerate(entries):
                scores[b, k, rank] = score
                paths[b, k, rank] = torch.tensor(units[::-1])
    return paths, scores
