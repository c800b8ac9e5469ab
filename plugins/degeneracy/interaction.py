"""``interaction-basis``: the local interaction basis (Bushnaq et al. 2024), output first.

For each layer l of a chain, from the last to the first, with f the layer's activations:
1. whiten: G = E[f fᵀ] = U D Uᵀ, keep D > cutoff·max(D); R = D^(-1/2) Uᵀ, R⁺ = U D^(1/2);
2. the Jacobian Gram towards the next basis, in whitened coordinates:
   M = R⁺ᵀ E[Jᵀ C_nextᵀ C_next J] R⁺, with J = ∂f_next/∂f (the model output's basis is I);
3. rotate and scale: M = V Λ Vᵀ, keep Λ > cutoff·max(Λ); C = Λ^(1/2) Vᵀ R, C⁺ = R⁺ V Λ^(-1/2).
Directions dropped in 1 are never used, those dropped in 3 never reach the next layer:
f ↦ C⁺ C f leaves the outputs unchanged. Edges between adjacent bases are
E_ij = E[(∂f̂_next,j / ∂f̂_i · f̂_i)²], with f̂ = C f.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, layer_tuple, option

MAX_UNITS = 4096


@dataclass(frozen=True)
class InteractionBasisOptions(RowOptions):
    batch_size: int = option(128, "rows per step")
    layers: tuple[str, ...] = option((), "the chain, in forward order; default: ReLU modules with <= 4096 units")
    cutoff: float = option(1e-8, "relative eigenvalue cut-off for the whitening and the rotation")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, (int, float)) or not 0 <= self.cutoff < 1:
            raise bad_option("cutoff", self.cutoff, "a relative eigenvalue cut-off in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class InteractionBasisResult(Result):
    basis: dict[str, torch.Tensor]  # C per layer: (basis size, units)
    inverse: dict[str, torch.Tensor]  # C⁺ per layer: (units, basis size)
    edges: dict[str, torch.Tensor]  # "layer->next": (next basis size, basis size) interaction strengths
    basis_size: dict[str, int]
    width: dict[str, int]
    top1_share: dict[str, float]  # fraction of total edge weight in the top 1% of edges
    top10_share: dict[str, float]
    output_change: dict[str, float]  # max |Δ output| when f ↦ C⁺ C f at that layer
    seconds: dict[str, float]  # time in "gram" (forward + accumulation), "jacobian" (VJPs), "eigh"
    top_edges: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [
            f"layer {layer}: basis {self.basis_size[layer]} of {self.width[layer]} units; output change "
            f"through the basis {self.output_change[layer]:.2e}"
            for layer in self.basis_size
        ]
        out += [
            f"edges {key}: top 1% hold {self.top1_share[key]:.1%}, top 10% hold {self.top10_share[key]:.1%} "
            f"of the interaction strength"
            for key in self.edges
        ]
        return out + list(self.top_edges)

    def summary(self) -> str:
        return "; ".join(self.lines())


def layer_pair(key: str) -> tuple[str, str]:
    first, second = key.split("->")
    return first, second


def _largest(weights: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """(row, column) of the largest entries, largest first."""
    order = weights.flatten().argsort(descending=True)[:count]
    return [(int(k) // weights.shape[1], int(k) % weights.shape[1]) for k in order]


def _top_share(weights: torch.Tensor, fraction: float) -> float:
    flat = weights.flatten().sort(descending=True).values
    total = float(flat.sum())
    return float(flat[: max(1, round(fraction * flat.numel()))].sum()) / total if total > 0 else 0.0


class InteractionBasis(Technique):
    name = "interaction-basis"
    summary = "local interaction basis: layers re-expressed without degenerate directions, with sparse edges"
    Options = InteractionBasisOptions
    needs_data = True

    def _forward(
        self,
        ctx: Context,
        layers: tuple[str, ...],
        inputs: torch.Tensor,
        replace: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Outputs of the chain layers (in the graph) and of the model; ``replace`` maps a
        layer to a projection P applied as f ↦ f P (flattened)."""
        edit = {layer: (lambda f, p=p: (f.flatten(1) @ p).view_as(f)) for layer, p in (replace or {}).items()}
        with ctx.record(layers, grad=True, edit=edit) as seen:
            output = ctx.model(inputs)
            values = {layer: seen[layer] for layer in layers}
        return values, output.flatten(1)

    def _default_layers(self, ctx: Context, probe: torch.Tensor) -> tuple[str, ...]:
        relus = ctx.relu_layers()
        with torch.no_grad():
            seen, _ = self._forward(ctx, relus, probe[:1].clone())
        return tuple(name for name in relus if seen[name][0].numel() <= MAX_UNITS)

    def run(self, ctx: Context, options: InteractionBasisOptions) -> InteractionBasisResult:
        batches = [
            rows.require_inputs()
            for rows in ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name)
        ]
        layers = options.layers or self._default_layers(ctx, batches[0])
        if not layers:
            raise PyengineError("interaction-basis: no layers with at most 4096 units; pass layers=[...]")
        count = sum(b.shape[0] for b in batches)
        seconds = {"gram": 0.0, "jacobian": 0.0, "eigh": 0.0}
        basis: dict[str, torch.Tensor] = {}
        inverse: dict[str, torch.Tensor] = {}
        chain = list(layers) + ["<output>"]
        with ctx.progress(len(layers) * len(batches), self.name) as bar:
            for position in range(len(layers) - 1, -1, -1):
                layer, following = chain[position], chain[position + 1]
                activation_gram = jacobian_gram = None
                for inputs in batches:
                    started = time.perf_counter()
                    with torch.enable_grad():
                        seen, output = self._forward(ctx, layers, inputs.clone())
                        f = seen[layer].flatten(1)
                        target = output if following == "<output>" else seen[following].flatten(1)
                        if f.shape[1] > MAX_UNITS:
                            raise PyengineError(
                                f"interaction-basis: layer {layer!r} has {f.shape[1]} units "
                                f"(> {MAX_UNITS}); choose narrower layers"
                            )
                        if activation_gram is None or jacobian_gram is None:
                            activation_gram = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
                            jacobian_gram = torch.zeros_like(activation_gram)
                        ops.gram_accumulate(activation_gram, f.detach())
                        seconds["gram"] += time.perf_counter() - started
                        started = time.perf_counter()
                        rows = basis[following] if following in basis else torch.eye(target.shape[1], device=f.device)
                        for row in rows.to(target.dtype):
                            (grad,) = torch.autograd.grad(
                                target, seen[layer], grad_outputs=row.expand_as(target), retain_graph=True
                            )
                            ops.gram_accumulate(jacobian_gram, grad.detach().flatten(1))
                        seconds["jacobian"] += time.perf_counter() - started
                    bar.update()
                started = time.perf_counter()
                if activation_gram is None or jacobian_gram is None:
                    raise PyengineError("interaction-basis: no rows to analyse")
                basis[layer], inverse[layer] = self._basis(
                    activation_gram / count, jacobian_gram / count, options.cutoff
                )
                seconds["eigh"] += time.perf_counter() - started
        edges = self._edges(ctx, layers, batches, basis, inverse, count)
        change = {
            layer: self._output_change(ctx, layers, batches, layer, inverse[layer] @ basis[layer]) for layer in layers
        }
        sizes = Figure(
            "Basis size vs layer width",
            x=list(range(len(layers))),
            xlabel="layer: " + ", ".join(layers),
            ylabel="directions",
            lines={
                "layer width": [float(basis[k].shape[1]) for k in layers],
                "basis size": [float(basis[k].shape[0]) for k in layers],
            },
        )
        figures = (
            sizes,
            *(
                Figure(
                    f"Interaction strengths {key} (√ of the share of the largest edge)",
                    image=(w / w.max()).sqrt().float(),
                )
                for key, w in edges.items()
                if float(w.max()) > 0
            ),
        )
        top_edges = tuple(
            f"strongest edges {key}: "
            + ", ".join(
                f"{layer_pair(key)[0]}:{i} → {layer_pair(key)[1]}:{j} ({float(w[j, i]):.3g})" for j, i in _largest(w, 5)
            )
            for key, w in edges.items()
        )
        return InteractionBasisResult(
            basis={k: v.cpu() for k, v in basis.items()},
            inverse={k: v.cpu() for k, v in inverse.items()},
            edges=edges,
            basis_size={k: int(v.shape[0]) for k, v in basis.items()},
            width={k: int(v.shape[1]) for k, v in basis.items()},
            top1_share={k: _top_share(w, 0.01) for k, w in edges.items()},
            top10_share={k: _top_share(w, 0.10) for k, w in edges.items()},
            output_change=change,
            seconds=seconds,
            top_edges=top_edges,
            figures=figures,
        )

    @staticmethod
    def _basis(
        activation_gram: torch.Tensor, jacobian_gram: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d, u = ops.gram_eigh(activation_gram)
        keep = d > threshold * d[0].clamp(min=1e-300)
        d, u = d[keep], u[:, keep]
        whiten = d.rsqrt().unsqueeze(1) * u.T  # R
        unwhiten = u * d.sqrt()  # R⁺
        lam, v = ops.gram_eigh(unwhiten.T @ jacobian_gram @ unwhiten)
        keep = lam > threshold * lam[0].clamp(min=1e-300)
        lam, v = lam[keep], v[:, keep]
        return lam.sqrt().unsqueeze(1) * (v.T @ whiten), (unwhiten @ v) * lam.rsqrt()

    def _edges(
        self,
        ctx: Context,
        layers: tuple[str, ...],
        batches: list[torch.Tensor],
        basis: dict[str, torch.Tensor],
        inverse: dict[str, torch.Tensor],
        count: int,
    ) -> dict[str, torch.Tensor]:
        edges: dict[str, torch.Tensor] = {}
        for layer, following in zip(layers[:-1], layers[1:]):
            total = torch.zeros(basis[following].shape[0], basis[layer].shape[0], dtype=torch.float64)
            for inputs in batches:
                with torch.enable_grad():
                    seen, _ = self._forward(ctx, layers, inputs.clone())
                    f, g = seen[layer].flatten(1), seen[following].flatten(1)
                    coordinates = f.detach().double() @ basis[layer].T  # f̂ (B, k)
                    for j, row in enumerate(basis[following].to(g.dtype)):
                        (grad,) = torch.autograd.grad(g, seen[layer], grad_outputs=row.expand_as(g), retain_graph=True)
                        sensitivity = grad.detach().flatten(1).double() @ inverse[layer]  # ∂f̂_next,j/∂f̂ (B, k)
                        total[j] += (sensitivity * coordinates).pow(2).sum(0).cpu()
            edges[f"{layer}->{following}"] = total / count
        return edges

    def _output_change(
        self, ctx: Context, layers: tuple[str, ...], batches: list[torch.Tensor], layer: str, projection: torch.Tensor
    ) -> float:
        worst = 0.0
        with torch.no_grad():
            for inputs in batches:
                _, original = self._forward(ctx, layers, inputs.clone())
                _, projected = self._forward(ctx, layers, inputs.clone(), {layer: projection.T.to(inputs.dtype)})
                worst = max(worst, float((original - projected).abs().max()))
        return worst
