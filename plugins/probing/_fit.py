"""Vectorised probe fitting and evaluation (torch, any device).

- ``fit_single_neuron``: a one-weight logistic probe σ(w·h + b) for every column of H and
  several targets at once, by damped Newton steps on each column's 2x2 system over a
  binned compression of the column (L2 on w like scikit-learn's ``C``).
- ``fit_linear``: σ(W·h + b) for many binary concepts, or softmax for one multi-class
  concept, with L1 and L2, by FISTA (proximal gradient with momentum).
- ``fit_mlp``: a one-hidden-layer probe, Adam, early stopping on a validation split.
- splits, control labels (Hewitt & Liang), accuracy and AUC per column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyengine import ops


@dataclass(frozen=True)
class Split:
    train: torch.Tensor  # row indices
    val: torch.Tensor
    test: torch.Tensor


def stratified_split(labels: torch.Tensor, fractions: tuple[float, float, float], seed: int) -> Split:
    """Seeded split keeping each label's share in every part (labels: (N,) ints)."""
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for value in torch.unique(labels.cpu()):
        rows = torch.nonzero(labels.cpu() == value).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_train = round(fractions[0] * rows.numel())
        n_val = round(fractions[1] * rows.numel())
        for part, chunk in zip(parts, (rows[:n_train], rows[n_train : n_train + n_val], rows[n_train + n_val :])):
            part.append(chunk)
    train, val, test = (torch.cat(p).sort().values for p in parts)
    return Split(train, val, test)


def control_labels(labels: torch.Tensor, types: torch.Tensor, seed: int) -> torch.Tensor:
    """Hewitt & Liang control task: each input type gets one random label, drawn from the
    empirical label distribution, shared by every input of that type."""
    generator = torch.Generator().manual_seed(seed)
    unique_types, inverse = torch.unique(types.cpu(), return_inverse=True)
    values, counts = torch.unique(labels.cpu(), return_counts=True)
    drawn = torch.multinomial(counts.double(), unique_types.numel(), replacement=True, generator=generator)
    return values[drawn][inverse].to(labels.device)


def accuracy_per_column(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of (scores > 0) per column; scores (N, d), labels (N,) in {0, 1}."""
    return ((scores > 0) == labels.bool().unsqueeze(1)).float().mean(0)


def auc_per_column(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC of every column (ties get average ranks: the Mann-Whitney statistic)."""
    n = scores.shape[0]
    positive = labels.bool()
    n_pos = int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((scores.shape[1],), float("nan"), device=scores.device)
    values, order = scores.T.contiguous().sort(dim=1)
    # Ties: every position gets the mean of the first and last rank of its run of equal
    # values, found with running maxima (O(n) per column).
    position = torch.arange(n, device=scores.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.where(starts, position, 0).cummax(dim=1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # The last position of a run is the first one when the column is read backwards.
    last = n - 1 - torch.where(ends.flip(1), position, 0).cummax(dim=1).values.flip(1)
    average_rank = (first + last).double() / 2 + 1  # 1-based, averaged over ties
    positive_rank_sum = (average_rank * positive[order]).sum(1)
    return ((positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def binned_statistics(
    h: torch.Tensor, targets: torch.Tensor, bins: int = 256, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress every column of h (N, d), for targets (T, N) in {0, 1}, into 2·bins
    weighted points per column: counts, mean activations and labels, each (T, d, 2·bins).

    A point is the rows of one bin with one label. Bins are equal-width over the range of
    a row sample of the column; ``pyengine.ops.binned_statistics`` fills them in one pass.
    """
    n = h.shape[0]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=generator)[: min(n, 16 * bins)].to(h.device)
    sample = h[rows]
    counts, sums = ops.binned_statistics(h, targets, sample.amin(0), sample.amax(0), bins)
    t, d = counts.shape[:2]
    counts, sums = counts.view(t, d, 2 * bins), sums.view(t, d, 2 * bins)
    labels = torch.arange(2, dtype=torch.float64, device=h.device).repeat_interleave(bins).expand(t, d, 2 * bins)
    return counts, sums / counts.clamp(min=1), labels


def _binned_loss(
    counts: torch.Tensor, means: torch.Tensor, signs: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: float
) -> torch.Tensor:
    z = means * w.unsqueeze(-1) + b.unsqueeze(-1)
    return (counts * nn.functional.softplus(z * signs)).sum(-1) + 0.5 * w * w / c


def fit_single_neuron(
    h: torch.Tensor,
    targets: torch.Tensor,
    c: float = 1.0,
    bins: int = 256,
    iterations: int = 100,
    tolerance: float = 1e-10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every column j of h (N, d) and target row t of targets (T, N) in {0, 1}:
    minimise Σ_i logloss(σ(w h_ij + b), y_ti) + w² / (2c), as scikit-learn's L2 logistic
    regression with an intercept. Returns w, b of shape (T, d), float64.

    Newton's method with per-column backtracking runs on ``binned_statistics``: a bin
    stands for its rows by their count and label-conditional mean activation (exact for
    the gradient's linear terms, second-order accurate in the bin width otherwise, and
    exact when a column takes at most ``bins`` distinct values).
    """
    counts, means, labels = binned_statistics(h, targets, bins, seed)
    signs = 1 - 2 * labels  # label 0: softplus(z); label 1: softplus(-z)
    rate = ((counts * labels).sum(-1) / counts.sum(-1)).clamp(1e-6, 1 - 1e-6)
    w = torch.zeros_like(rate)
    b = torch.log(rate / (1 - rate))
    loss = _binned_loss(counts, means, signs, w, b, c)
    for _ in range(iterations):
        p = torch.sigmoid(means * w.unsqueeze(-1) + b.unsqueeze(-1))
        r = counts * (p - labels)
        s = counts * p * (1 - p)
        sm = s * means
        g_w = (r * means).sum(-1) + w / c
        g_b = r.sum(-1)
        h_ww = (sm * means).sum(-1) + 1 / c
        h_wb = sm.sum(-1)
        h_bb = s.sum(-1) + 1e-12
        det = h_ww * h_bb - h_wb * h_wb
        step_w = (h_bb * g_w - h_wb * g_b) / det
        step_b = (h_ww * g_b - h_wb * g_w) / det
        scale = torch.ones_like(w)
        trial = _binned_loss(counts, means, signs, w - step_w, b - step_b, c)
        slack = 1e-12 * loss.abs()  # rounding: a step that changes nothing is not worse
        for _ in range(30):  # backtracking, per column
            worse = trial > loss + slack
            if not bool(worse.any()):
                break
            scale = torch.where(worse, scale / 2, scale)
            trial = _binned_loss(counts, means, signs, w - scale * step_w, b - scale * step_b, c)
        w, b = w - scale * step_w, b - scale * step_b
        converged = bool(((loss - trial).abs() <= tolerance * (1 + loss.abs())).all())
        loss = torch.minimum(trial, loss)
        if converged:
            break
    return w, b


def _top_singular_value_squared(x: torch.Tensor, iterations: int = 30) -> float:
    v = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) / x.shape[1] ** 0.5
    value = 0.0
    for _ in range(iterations):
        u = x.T @ (x @ v)
        value = float(u.norm())
        v = u / max(value, 1e-30)
    return value


@dataclass(frozen=True)
class LinearFit:
    """A fitted linear probe and how the fit ended."""

    weight: torch.Tensor  # (K, d)
    bias: torch.Tensor  # (K,)
    iterations: int  # FISTA steps taken
    converged: bool  # stopped on the tolerance, not on the iteration limit
    gradient_norm: float  # norm of the proximal-gradient step at the result (0 at the optimum)


def fit_linear(
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    multiclass: bool,
    l1: float = 0.0,
    l2: float = 0.0,
    iterations: int = 500,
    tolerance: float = 1e-7,
) -> LinearFit:
    """A linear probe on standardised features x (N, d), by FISTA, stopped when a step changes the
    parameters by less than ``tolerance`` (relative) or after ``iterations`` steps.

    Binary multi-label: targets (N, K) in {0, 1}, loss = mean BCE. Multi-class: targets
    (N,) class indices, loss = mean cross-entropy (K = targets.max() + 1). Penalty:
    l1·|W|₁ + l2/2·|W|². Returns W (K, d), b (K,) and how the fit ended.
    """
    n, d = x.shape
    k = int(targets.max()) + 1 if multiclass else targets.shape[1]
    curvature = 0.5 if multiclass else 0.25
    step = 1.0 / (curvature * _top_singular_value_squared(x) / n + curvature + l2)
    params = torch.zeros(k, d + 1, dtype=x.dtype, device=x.device)  # [W | b]
    momentum = params.clone()
    t = 1.0
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)

    def gradient(p: torch.Tensor) -> torch.Tensor:
        logits = xb @ p.T
        if multiclass:
            residual = torch.softmax(logits, dim=1)
            residual[torch.arange(n), targets] -= 1
        else:
            residual = torch.sigmoid(logits) - targets
        g = residual.T @ xb / n
        g[:, :d] += l2 * p[:, :d]
        return g

    def proximal_step(p: torch.Tensor) -> torch.Tensor:
        updated = p - step * gradient(p)
        weights = updated[:, :d]
        updated[:, :d] = weights.sign() * (weights.abs() - step * l1).clamp(min=0)  # prox of L1 (not b)
        return updated

    taken, converged = 0, False
    while taken < iterations and not converged:
        taken += 1
        updated = proximal_step(momentum)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        change = float((updated - params).norm() / max(float(params.norm()), 1e-12))
        momentum = updated + ((t - 1) / t_next) * (updated - params)
        params, t = updated, t_next
        converged = change < tolerance
    mapping = float((params - proximal_step(params)).norm() / step)
    return LinearFit(params[:, :d], params[:, d], taken, converged, mapping)


def fit_mlp(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    hidden: int,
    epochs: int,
    patience: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> tuple[nn.Module, int, bool]:
    """A binary probe d -> hidden -> 1 with ReLU; keeps the weights of the best val loss.
    Returns it, the epochs run, and whether training stopped early (``patience`` epochs
    without a better validation loss) rather than at the ``epochs`` limit."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(x_train.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_state, waited, run, stopped = float("inf"), None, 0, 0, False
    for _ in range(epochs):
        run += 1
        model.train()
        order = torch.randperm(x_train.shape[0], generator=generator).to(x_train.device)
        for first in range(0, order.numel(), batch_size):
            rows = order[first : first + batch_size]
            loss = loss_fn(model(x_train[rows]).squeeze(1), y_train[rows].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model(x_val).squeeze(1), y_val.float())) if x_val.numel() else 0.0
        if val_loss < best - 1e-6:
            best, waited = val_loss, 0
            best_state = {key: value.clone() for key, value in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                stopped = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), run, stopped
