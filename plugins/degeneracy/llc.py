"""``llc``: the local learning coefficient λ̂ by SGLD around the trained weights.

Each chain starts at the trained weights w* and samples from
exp(−nβ·L(w) − γ/2·|w − w*|²) with stochastic-gradient Langevin steps
    w ← w − ε/2 · (nβ·∇L_B(w) + γ·(w − w*)) + N(0, ε),
and λ̂ = nβ · (mean sampled loss − L(w*)). Lower λ̂ = more degenerate. The loss is the
training loss (cross-entropy for integer labels, MSE otherwise) or the behavioral loss:
the divergence from the original model's outputs (KL for classifiers, MSE otherwise).
The model's weights are restored afterwards, whatever happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyengine.context import Context
from pyengine.errors import PyengineError
from pyengine.inputs import ModelInputs
from pyengine.technique import Figure, Result, RowOptions, Technique, bad_option, option

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output of some rows, their numbers)


@dataclass(frozen=True)
class LLCOptions(RowOptions):
    epsilon: float = option(1e-4, "SGLD step size")
    gamma: float = option(100.0, "localization strength")
    nbeta: float = option(0.0, "inverse temperature times n; 0: B / ln B for batch size B")
    chains: int = option(2, "independent SGLD chains")
    draws: int = option(150, "samples kept per chain")
    burn_in: int = option(50, "steps discarded per chain before the draws")
    loss: str = option(
        "train",
        "'train' (the training loss: cross-entropy or MSE with the labels; a causal LM's next-token "
        "cross-entropy), 'next-token' or 'behavioral' (divergence from the original outputs)",
    )

    def validate(self) -> None:
        super().validate()
        self.require_number("epsilon", "gamma", positive=True)
        self.require_number("nbeta")
        self.require_int("chains", "draws")
        self.require_int("burn_in", minimum=0)
        if self.batch_size < 2 and self.nbeta == 0:
            raise bad_option("batch_size", self.batch_size, "at least 2 when nbeta is left to default (B / ln B)")
        if self.loss not in ("train", "next-token", "behavioral"):
            raise bad_option("loss", self.loss, "'train', 'next-token' or 'behavioral'")


@dataclass(frozen=True, kw_only=True)
class LLCResult(Result):
    llc: float  # mean over chains
    llc_std: float  # standard deviation over chains
    llc_per_chain: torch.Tensor  # (chains,)
    traces: torch.Tensor  # (chains, draws): nβ · (L_t − L(w*))
    init_loss: float
    nbeta: float
    warning: str = ""

    def summary(self) -> str:
        text = (
            f"λ̂ = {self.llc:.4g} ± {self.llc_std:.2g} over {self.llc_per_chain.numel()} chains (nβ = {self.nbeta:.4g})"
        )
        return text + (f"; WARNING: {self.warning}" if self.warning else "")

    def table(self) -> tuple[tuple[object, ...], ...]:
        """Per chain: its estimate λ̂ (the mean of its trace) and the trace's spread."""
        rows: list[tuple[object, ...]] = [("chain", "λ̂", "trace std", "draws")]
        for chain, (value, trace) in enumerate(zip(self.llc_per_chain.tolist(), self.traces)):
            finite = trace[torch.isfinite(trace)]
            spread = float(finite.std()) if finite.numel() > 1 else float("nan")
            rows.append((chain, f"{value:.4g}", f"{spread:.3g}", int(finite.numel())))
        return tuple(rows)


def _loss_function(
    kind: str, labels: torch.Tensor | None, outputs: torch.Tensor, inputs: ModelInputs
) -> tuple[LossFunction, str]:
    """loss(output of some rows, their row numbers) for ``kind``; ``outputs`` are the original
    model's outputs of every row. A sequence model's per-token output (N, T, V) over token ids is
    read at the real tokens only (attention mask)."""
    ids = inputs.main
    per_token = outputs.dim() == 3 and ids.dim() == 2 and tuple(outputs.shape[:2]) == tuple(ids.shape)
    real = (inputs.mask != 0) if inputs.mask is not None else torch.ones(ids.shape[:2], dtype=torch.bool)
    real = real.to(outputs.device)
    classifier = outputs.dim() == 2 and outputs.shape[1] > 1
    if kind == "train" and per_token:
        kind = "next-token"  # a causal LM's training loss
    if kind == "next-token":
        if not per_token:
            raise PyengineError(
                f"llc: loss='next-token' needs a causal LM: token ids (N, T) in, per-token scores (N, T, V) out; "
                f"got {tuple(ids.shape)} in, {tuple(outputs.shape)} out"
            )

        def next_token(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            keep = real[rows]
            pairs = keep[:, 1:] & keep[:, :-1]
            return nn.functional.cross_entropy(
                out[:, :-1][pairs], ids[rows][:, 1:][pairs.to(ids.device)].to(out.device)
            )

        return next_token, "next-token cross-entropy"
    if kind == "behavioral":
        if classifier or per_token:

            def kl(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                ref = outputs[rows]
                if per_token:
                    out, ref = out[real[rows]], ref[real[rows]]
                return nn.functional.kl_div(
                    out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
                )

            return kl, "KL to the original outputs"
        return (lambda out, rows: (out - outputs[rows]).pow(2).mean()), "MSE to the original outputs"
    if labels is None:
        hint = " or 'next-token' (a causal LM)" if per_token else ""
        raise PyengineError(
            f"llc: the training loss needs labels; pass data=<dataset with labels> or loss='behavioral'{hint}"
        )
    if not labels.is_floating_point() and classifier:
        return (lambda out, rows: nn.functional.cross_entropy(out, labels[rows])), "cross-entropy"
    return (lambda out, rows: (out - labels[rows].reshape(out.shape).to(out.dtype)).pow(2).mean()), "MSE"


class LLC(Technique):
    name = "llc"
    summary = "local learning coefficient by SGLD around the trained weights (training or behavioral loss)"
    Options = LLCOptions
    needs_data = True

    def run(self, ctx: Context, options: LLCOptions) -> LLCResult:
        data = ctx.rows(options.batch_size, start=options.start, stop=options.stop, technique=self.name).all()
        inputs = data.model_inputs()
        labels = data.labels.to(ctx.device) if data.labels is not None and bool((data.labels >= 0).any()) else None
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if not params:
            raise PyengineError("llc: the model has no trainable parameters")
        n = len(inputs)
        with torch.no_grad():
            outputs = torch.cat([ctx.forward(inputs.take(rows)) for rows in torch.arange(n).split(options.batch_size)])
        loss_fn, loss_name = _loss_function(options.loss, labels, outputs, inputs)
        batch_size = min(options.batch_size, n)
        nbeta = options.nbeta or batch_size / math.log(batch_size)
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            init_loss = float(
                sum(
                    loss_fn(ctx.forward(inputs.take(rows)), rows) * len(rows)
                    for rows in torch.arange(n).split(batch_size)
                )
                / n
            )
        # Several processes each run their contiguous share of the chains (seeded by the chain's
        # number, so each chain is the same wherever it runs) and gather the traces in chain order.
        first, last = ctx.ranks.part(0, options.chains)
        traces = torch.full((last - first, options.draws), float("nan"), dtype=torch.float64)
        steps = options.burn_in + options.draws
        try:
            with ctx.progress((last - first) * steps, "llc") as bar:
                for chain in range(first, last):
                    generator = torch.Generator(device="cpu").manual_seed(ctx.seed * 100_003 + chain)
                    with torch.no_grad():
                        for p, w in zip(params, originals):
                            p.copy_(w)
                    for step in range(steps):
                        picked = torch.randperm(n, generator=generator)[:batch_size].to(ctx.device)
                        loss = loss_fn(ctx.forward(inputs.take(picked)), picked)
                        grads = torch.autograd.grad(loss, params)
                        with torch.no_grad():
                            for p, g, w in zip(params, grads, originals):
                                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                                p.add_(
                                    -(options.epsilon / 2) * (nbeta * g + options.gamma * (p - w))
                                    + math.sqrt(options.epsilon) * noise
                                )
                        value = float(loss.detach())
                        if step >= options.burn_in:
                            traces[chain - first, step - options.burn_in] = nbeta * (value - init_loss)
                        bar.update()
                        if not math.isfinite(value):
                            break
        finally:
            with torch.no_grad():
                for p, w in zip(params, originals):
                    p.copy_(w)
        traces = ctx.gather_rows(traces)
        per_chain = traces.mean(1)
        warning = self._warnings(traces, per_chain)
        finite = per_chain[torch.isfinite(per_chain)]
        llc = float(finite.mean()) if finite.numel() else float("nan")
        spread = float(finite.std()) if finite.numel() > 1 else 0.0
        figure = Figure(
            f"SGLD loss traces, nβ·(L − L(w*)) ({loss_name})",
            lines={f"chain {k}": traces[k].tolist() for k in range(options.chains)},
            xlabel="draw",
            ylabel="nβ·ΔL",
        )
        return LLCResult(
            llc=llc,
            llc_std=spread,
            llc_per_chain=per_chain,
            traces=traces,
            init_loss=init_loss,
            nbeta=float(nbeta),
            warning=warning,
            figures=(figure,),
        )

    @staticmethod
    def _warnings(traces: torch.Tensor, per_chain: torch.Tensor) -> str:
        problems = []
        diverged = [k for k in range(traces.shape[0]) if not bool(torch.isfinite(traces[k]).all())]
        if diverged:
            problems.append(f"chains {diverged} diverged (non-finite loss): lower epsilon or raise gamma")
        drifting = []
        for k in (k for k in range(traces.shape[0]) if k not in diverged and traces.shape[1] >= 20):
            # Batch means (10 batches) absorb autocorrelation; the halves differ significantly
            # and by more than 5% of the chain's estimate.
            batches = traces[k, : traces.shape[1] // 10 * 10].view(10, -1).mean(1)
            difference = float(batches[5:].mean() - batches[:5].mean())
            standard_error = float(batches.std()) * math.sqrt(2 / 5)
            if abs(difference) > max(3 * standard_error, 0.05 * abs(float(per_chain[k]))):
                drifting.append(k)
        if drifting:
            problems.append(
                f"chains {drifting} have not settled (the trace's halves differ significantly): "
                "raise burn_in or draws, or lower epsilon"
            )
        return "; ".join(problems)
