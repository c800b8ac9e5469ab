"""``interaction-basis``: the local interaction basis (Bushnaq et al. 2024), output first.

For each layer l of a chain, from the last to the first, with f the layer's activations:
1. whiten: G = E[f fᵀ] = U D Uᵀ, keep D > cutoff·max(D); R = D^(-1/2) Uᵀ, R⁺ = U D^(1/2);
2. the Jacobian Gram towards the next basis, in whitened coordinates:
   M = R⁺ᵀ E[Jᵀ C_nextᵀ C_next J] R⁺, with J = ∂f_next/∂f (the model output's basis is I);
3. rotate and scale: M = V Λ Vᵀ, keep Λ > cutoff·max(Λ); C = Λ^(1/2) Vᵀ R, C⁺ = R⁺ V Λ^(-1/2).
Directions dropped in 1 are never used, those dropped in 3 never reach the next layer:
f ↦ C⁺ C f leaves the outputs unchanged. Edges between adjacent bases are
E_ij = E[(∂f̂_next,j / ∂f̂_i · f̂_i)²], with f̂ = C f.

Units come from ``pyengine.units``: a conv map's channels or a transformer's features, one
basis shared by all positions (tokens), which count as samples of G; the Jacobian Gram and the
edges sum over the positions of both layers. Over the next layer's positions that sum is taken
with random ±1 signs, drawn per row and basis direction (E[s sᵀ] = I: unbiased, and a direction
no position uses is dropped exactly); a next layer without positions is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pyengine import ops
from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.inputs import ModelInputs
from pyengine.plugins.degeneracy._ranks import UNITS_OPTION_DOC, axis_note, check_units, note_units
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, layer_tuple, option
from pyengine.units import UnitAxes, as_unit_matrix

MAX_UNITS = 4096
DEFAULT_ROWS = 256  # rows read when stop is 0: the cost grows with rows x chain length x basis sizes


@dataclass(frozen=True)
class InteractionBasisOptions(RowOptions):
    batch_size: int = option(128, "rows per step")
    stop: int = option(0, f"end of the rows analysed (exclusive); 0: the first {DEFAULT_ROWS} (or all, if fewer)")
    layers: tuple[str, ...] = option(
        (),
        "the chain, in forward order, each on every path to the output; default: every "
        "nonlinearity output on every path with <= 4096 units",
    )
    cutoff: float = option(1e-8, "relative eigenvalue cut-off for the whitening and the rotation")
    units: str = option("auto", UNITS_OPTION_DOC + "; one basis for all positions")

    def validate(self) -> None:
        super().validate()
        self._set("layers", layer_tuple(self.layers))
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, (int, float)) or not 0 <= self.cutoff < 1:
            raise bad_option("cutoff", self.cutoff, "a relative eigenvalue cut-off in [0, 1)")
        check_units(self.units)


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
    unit_axis: dict[str, str]  # where each layer's units are: 'channels', 'last', 'units', 'flatten', 'dim k'
    top_edges: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [
            f"layer {layer}: basis {self.basis_size[layer]} of {self.width[layer]} units"
            f"{axis_note(self.unit_axis.get(layer, 'units'))}; output change "
            f"through the basis {self.output_change[layer]:.2e}"
            for layer in self.basis_size
        ]
        out += [
            f"edges {key}: top 1% hold {self.top1_share[key]:.1%}, top 10% hold {self.top10_share[key]:.1%} "
            f"of the interaction strength"
            for key in self.edges
        ]
        return out + list(self.top_edges)

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per layer: its width, the interaction basis's size and the output change through it."""
        rows: list[tuple[object, ...]] = [("layer", "units", "unit axis", "basis size", "output change")]
        for layer, size in self.basis_size.items():
            change = f"{self.output_change[layer]:.2e}"
            rows.append((layer, self.width[layer], self.unit_axis.get(layer, "units"), size, change))
        return tuple(rows)

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
        inputs: ModelInputs,
        replace: dict[str, tuple[torch.Tensor, int]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Outputs of the chain layers (in the graph) and of the model; ``replace`` maps a layer to
        a projection P and its unit dim, applied to the units at every position as f ↦ f P."""
        edit = {layer: (lambda f, p=p, d=d: _project(f, p, d)) for layer, (p, d) in (replace or {}).items()}
        with ctx.record(layers, grad=True, edit=edit) as seen:
            output = ctx.forward(inputs.with_main(inputs.main.clone()))
            values = {layer: seen[layer] for layer in layers}
        mask = inputs.mask
        if mask is not None and output.dim() == 3 and tuple(output.shape[:2]) == tuple(mask.shape):
            output = output * mask[..., None].to(output.device, output.dtype)  # a padded position is no output
        return values, output.flatten(1)

    def _default_layers(self, ctx: Context, probe: ModelInputs, units: str) -> tuple[str, ...]:
        found = ctx.default_layers(self.name, from_store=False)
        around = set(ctx.bypassed(self.name, found))
        axes = ctx.unit_axes(units, self.name, found)
        with torch.no_grad():
            seen, _ = self._forward(ctx, found, probe.take([0]))
        axes.prepare({name: tuple(value.shape) for name, value in seen.items()})
        wide = {name for name in found if as_unit_matrix(seen[name], axes.dims[name]).shape[1] > MAX_UNITS}
        kept = tuple(name for name in found if name not in around and name not in wide)
        if not kept:
            why = [f"{len(around)} are bypassed by residual adds, concatenations or gates"] if around else []
            why += [f"{len(wide)} have more than {MAX_UNITS} units (units={units!r})"] if wide else []
            raise PyengineError(
                f"interaction-basis: none of the {len(found)} nonlinearity outputs can be in the default chain: "
                f"{'; '.join(why)}; pass layers=[...], e.g. {self._cuts_hint(ctx)}"
            )
        shown = ", ".join(kept[:4]) + (f", ... ({len(kept)} in all)" if len(kept) > 4 else "")
        ctx.defaults_chosen["layers"] = (
            f"{shown} (every nonlinearity output on every path to the output, with <= {MAX_UNITS} units)"
        )
        return kept

    def _check_chain(self, ctx: Context, layers: tuple[str, ...]) -> None:
        """A basis keeps what reaches the output only if the output depends on the inputs through
        each chain layer alone: refuse layers a residual add or concatenation goes around."""
        if around := ctx.bypassed(self.name, layers):
            raise PyengineError(
                f"interaction-basis: the input reaches the output around {around[0]!r} (a residual add, "
                "concatenation or gate bypasses it), so its basis would drop directions the output uses; "
                f"expected layers every path goes through, e.g. {self._cuts_hint(ctx)}"
            )

    def _cuts_hint(self, ctx: Context) -> str:
        blocks = ctx.block_cuts(self.name)
        return ", ".join(repr(ref) for ref in blocks[:4]) + (", ..." if len(blocks) > 4 else "") or "block outputs"

    def run(self, ctx: Context, options: InteractionBasisOptions) -> InteractionBasisResult:
        read = ctx.rows(
            options.batch_size,
            start=options.start,
            stop=options.stop,
            at_most=DEFAULT_ROWS,
            technique=self.name,
            split=True,
        )
        batches = [rows.model_inputs() for rows in read]
        first_batch = read.offset // options.batch_size  # several processes: this part's first batch
        layers = options.layers or self._default_layers(ctx, batches[0], options.units)
        self._check_chain(ctx, layers)
        axes = ctx.unit_axes(options.units, self.name, layers)
        with torch.no_grad():
            seen, _ = self._forward(ctx, layers, batches[0].take([0]))
        axes.prepare({name: tuple(value.shape) for name, value in seen.items()})
        note_units(ctx, axes)
        for layer in layers:
            width = as_unit_matrix(seen[layer], axes.dims[layer]).shape[1]
            if width > MAX_UNITS:
                raise PyengineError(
                    f"interaction-basis: layer {layer!r} has {width} units (> {MAX_UNITS}) on its "
                    f"{axes.names()[layer]} axis; choose narrower layers or other units"
                )
        count = int(ctx.all_reduce(torch.tensor(sum(len(b) for b in batches))))
        seconds = {"gram": 0.0, "jacobian": 0.0, "eigh": 0.0}
        basis: dict[str, torch.Tensor] = {}
        inverse: dict[str, torch.Tensor] = {}
        chain = list(layers) + ["<output>"]
        with ctx.progress(len(layers) * len(batches), self.name) as bar:
            for position in range(len(layers) - 1, -1, -1):
                layer, following = chain[position], chain[position + 1]
                activation_gram = jacobian_gram = None
                samples = 0
                for number, inputs in enumerate(batches, first_batch):
                    generator = _signs(ctx.seed, position, number)
                    started = time.perf_counter()
                    with torch.enable_grad():
                        values, output = self._forward(ctx, layers, inputs)
                        f = as_unit_matrix(values[layer], axes.dims[layer], inputs.mask)
                        if activation_gram is None or jacobian_gram is None:
                            activation_gram = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
                            jacobian_gram = torch.zeros_like(activation_gram)
                        ops.gram_accumulate(activation_gram, f.detach())
                        samples += f.shape[0]
                        seconds["gram"] += time.perf_counter() - started
                        started = time.perf_counter()
                        target, target_dim = (
                            (output, 1) if following == "<output>" else (values[following], axes.dims[following])
                        )
                        width = as_unit_matrix(target[:1], target_dim).shape[1]
                        rows = basis[following] if following in basis else torch.eye(width, device=f.device)
                        for row in rows.to(target.dtype):
                            source = _direction(target, target_dim, row, generator, inputs.mask)
                            (grad,) = torch.autograd.grad(target, values[layer], grad_outputs=source, retain_graph=True)
                            grad_rows = as_unit_matrix(grad.detach(), axes.dims[layer], inputs.mask)
                            ops.gram_accumulate(jacobian_gram, grad_rows)
                        seconds["jacobian"] += time.perf_counter() - started
                    bar.update()
                started = time.perf_counter()
                if activation_gram is None or jacobian_gram is None:
                    raise PyengineError("interaction-basis: no rows to analyse")
                # several processes: the Grams and counts of their parts, added in rank order
                activation_gram, jacobian_gram = ctx.all_reduce(activation_gram), ctx.all_reduce(jacobian_gram)
                samples = int(ctx.all_reduce(torch.tensor(samples)))
                basis[layer], inverse[layer] = self._basis(
                    activation_gram / samples, jacobian_gram / count, options.cutoff
                )
                seconds["eigh"] += time.perf_counter() - started
        edges = self._edges(ctx, layers, axes, batches, basis, inverse, count, first_batch)
        change = {
            layer: self._output_change(ctx, layers, batches, layer, (inverse[layer] @ basis[layer], axes.dims[layer]))
            for layer in layers
        }
        sizes = Figure(
            "Basis size vs layer width",
            x_labels=tuple(layers),
            xlabel="layer",
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
            unit_axis=axes.names(),
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
        axes: UnitAxes,
        batches: list[ModelInputs],
        basis: dict[str, torch.Tensor],
        inverse: dict[str, torch.Tensor],
        count: int,
        first_batch: int,
    ) -> dict[str, torch.Tensor]:
        edges: dict[str, torch.Tensor] = {}
        for edge, (layer, following) in enumerate(zip(layers[:-1], layers[1:])):
            total = torch.zeros(basis[following].shape[0], basis[layer].shape[0], dtype=torch.float64)
            dim = axes.dims[layer]
            for number, inputs in enumerate(batches, first_batch):
                generator = _signs(ctx.seed, len(layers) + edge, number)
                with torch.enable_grad():
                    seen, _ = self._forward(ctx, layers, inputs)
                    f, g = seen[layer], seen[following]
                    mask = inputs.mask
                    coordinates = (
                        as_unit_matrix(f.detach(), dim, mask).double() @ basis[layer].T
                    )  # f̂ (B * positions, k)
                    for j, row in enumerate(basis[following].to(g.dtype)):
                        source = _direction(g, axes.dims[following], row, generator, mask)
                        (grad,) = torch.autograd.grad(g, f, grad_outputs=source, retain_graph=True)
                        sensitivity = as_unit_matrix(grad.detach(), dim, mask).double() @ inverse[layer]  # ∂f̂_next,j/∂f̂
                        total[j] += (sensitivity * coordinates).pow(2).sum(0).cpu()
            edges[f"{layer}->{following}"] = ctx.all_reduce(total) / count
        return edges

    def _output_change(
        self,
        ctx: Context,
        layers: tuple[str, ...],
        batches: list[ModelInputs],
        layer: str,
        projection: tuple[torch.Tensor, int],
    ) -> float:
        worst = 0.0
        matrix, dim = projection
        with torch.no_grad():
            for inputs in batches:
                _, original = self._forward(ctx, layers, inputs)
                _, projected = self._forward(ctx, layers, inputs, {layer: (matrix.T, dim)})
                worst = max(worst, float((original - projected).abs().max()))
        return max(ctx.all_gather(worst))


def _project(values: torch.Tensor, projection: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` with the units (at ``dim``; 0: every value of a row) of each position mapped by f ↦ f P."""
    if values.dim() <= 2 or dim == 0:
        return (values.flatten(1) @ projection.to(values.dtype)).view_as(values)
    moved = values.movedim(dim, -1)
    return (moved @ projection.to(values.dtype)).movedim(-1, dim)


def _signs(seed: int, phase: int, batch: int) -> torch.Generator:
    """The random signs of one batch in one phase (a layer's basis, an edge): drawn from the seed,
    the phase and the batch's number, so they do not depend on how processes split the batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + phase) * 1_000_003 + batch)


def _direction(
    target: torch.Tensor, dim: int, row: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A grad_output for ``target``: the basis ``row`` on the units of every position, each row's
    positions with random ±1 signs (their sum, in expectation; 0 on a sequence's padding, given
    its ``mask``); no signs without positions."""
    if target.dim() <= 2 or dim == 0:
        return row.reshape(1, -1).expand(target.shape[0], -1).reshape(target.shape)
    moved = target.movedim(dim, -1)
    signs = torch.randint(0, 2, moved.shape[:-1], generator=generator).to(target.device, target.dtype) * 2 - 1
    if mask is not None and target.dim() == 3 and dim == 2 and tuple(mask.shape) == tuple(signs.shape):
        signs = signs * mask.to(signs.device, signs.dtype)
    return (signs.unsqueeze(-1) * row).movedim(-1, dim)
