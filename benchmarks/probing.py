"""probe-neurons vs a loop of scikit-learn LogisticRegression fits, measured in one run.

A layer of NEURONS units over SAMPLES inputs with a binary concept planted in some units
at varying strength. pyengine fits every neuron's one-weight probe at once (batched
Newton); the anchor loops sklearn.linear_model.LogisticRegression over the neurons on the
same training rows. Two pyengine timings: the probes alone (the same work as the anchor),
and the whole technique (plus control-task probes, AUCs, thresholds). Prints the time
ratios and the accuracy agreement.

    python benchmarks/probing.py [--neurons 512] [--samples 20000] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset


def planted_layer(neurons: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(samples, generator=g) < 0.3).long()
    strength = torch.zeros(neurons)
    strength[: neurons // 4] = torch.linspace(0.1, 3.0, neurons // 4)
    h = torch.relu(torch.randn(samples, neurons, generator=g) + y.unsqueeze(1) * strength)
    return h, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=512)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    h, y = planted_layer(args.neurons, args.samples, seed=0)
    data = TensorDataset(h, concepts={"concept": y})
    model = nn.Sequential(nn.Identity())

    warm_x, warm_y = planted_layer(8, 200, seed=1)  # imports and plugin loading, off the clock
    pyengine.run(
        "probe-neurons",
        model,
        data=TensorDataset(warm_x, concepts={"concept": warm_y}),
        layers=["0"],
        device=args.device,
        progress=False,
    )
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    LogisticRegression().fit(warm_x[:, :1].numpy(), warm_y.numpy())

    start = time.perf_counter()
    result = pyengine.run("probe-neurons", model, data=data, layers=["0"], device=args.device, progress=False)
    ours_seconds = time.perf_counter() - start
    train, test = result.train_rows.numpy(), result.test_rows.numpy()

    start = time.perf_counter()
    reference = np.empty(args.neurons)
    x_train, x_test, y_train, y_test = h[train].numpy(), h[test].numpy(), y[train].numpy(), y[test].numpy()
    for unit in range(args.neurons):
        fitted = LogisticRegression(C=1.0).fit(x_train[:, unit : unit + 1], y_train)
        reference[unit] = fitted.score(x_test[:, unit : unit + 1], y_test)
    sklearn_seconds = time.perf_counter() - start

    # Equal work: the probes alone, fitted on the same rows and scored on the test rows.
    from pyengine.plugins.probing._fit import accuracy_per_column, fit_single_neuron

    h_train, h_test = h[result.train_rows].to(args.device), h[result.test_rows].to(args.device)
    y_train_rows, y_test_rows = y[result.train_rows].to(args.device), y[result.test_rows].to(args.device)
    sync()
    start = time.perf_counter()
    w, b = fit_single_neuron(h_train, y_train_rows.unsqueeze(0))
    probes_only = accuracy_per_column(h_test * w[0].float() + b[0].float(), y_test_rows).cpu().numpy()
    probes_seconds = time.perf_counter() - start

    ours = result.test_accuracy["0|concept"].numpy()
    gap = np.abs(ours - reference)
    print(
        f"probe-neurons: {args.neurons} neurons x {args.samples:,} samples ({len(train):,} train, "
        f"{len(test):,} test) on {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"  sklearn loop: fit + score per neuron          {sklearn_seconds:8.3f} s")
    print(
        f"  pyengine probes: fit + score, all neurons     {probes_seconds:8.3f} s   "
        f"ratio {probes_seconds / sklearn_seconds:.4f} (speed-up {sklearn_seconds / probes_seconds:.1f}x)"
    )
    print(
        f"  pyengine probe-neurons technique              {ours_seconds:8.3f} s   "
        f"ratio {ours_seconds / sklearn_seconds:.4f} (speed-up {sklearn_seconds / ours_seconds:.1f}x)"
    )
    print("    (the technique also fits a control-task probe per neuron and computes AUCs and thresholds)")
    print(
        f"  test accuracy: mean {ours.mean():.4f} vs sklearn {reference.mean():.4f}; max per-neuron gap "
        f"{100 * gap.max():.2f} pp (probes alone: {100 * np.abs(probes_only - reference).max():.2f} pp)"
    )


if __name__ == "__main__":
    main()
