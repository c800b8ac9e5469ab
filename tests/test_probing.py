"""Probes: agreement with scikit-learn, planted concepts, XOR, control tasks, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyengine
from pyengine.data import TensorDataset
from pyengine.errors import PyengineError

IDENTITY = nn.Sequential(nn.Identity())  # probes the inputs themselves, as layer "0"


def planted_neurons(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons 0-4 encode the concept with growing strength; 5-19 are noise; 20 is a ReLU detector."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.35).long()
    h = torch.randn(n, 21, generator=g)
    h[:, :5] += y.unsqueeze(1) * torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0])
    h[:, 20] = torch.relu(h[:, 20] + 3.0 * y - 1.0)
    return h, y


def test_single_neuron_probes_agree_with_sklearn_neuron_by_neuron() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    h, y = planted_neurons()
    result = pyengine.run(
        "probe-neurons", IDENTITY, data=TensorDataset(h, concepts={"c": y}), layers=["0"], c=1.0, progress=False
    )
    train, test = result.train_rows.numpy(), result.test_rows.numpy()
    assert abs(y[train].float().mean() - y[test].float().mean()) < 0.01  # stratified
    ours = result.test_accuracy["0|c"].numpy()
    for unit in range(h.shape[1]):
        reference = linear_model.LogisticRegression(C=1.0, tol=1e-8, max_iter=1000)
        reference.fit(h[train, unit : unit + 1].numpy(), y[train].numpy())
        expected = reference.score(h[test, unit : unit + 1].numpy(), y[test].numpy())
        assert abs(ours[unit] - expected) <= 0.005, (unit, ours[unit], expected)
        assert float(result.weight["0|c"][unit]) == pytest.approx(reference.coef_[0, 0], rel=2e-2, abs=2e-3)
        auc = metrics.roc_auc_score(y[test].numpy(), h[test, unit].numpy() * np.sign(reference.coef_[0, 0]))
        assert float(result.auc["0|c"][unit]) == pytest.approx(auc, abs=1e-6)
    assert ours[4] > 0.9 and ours[20] > 0.9 and ours[5:20].max() < 0.7
    assert result.best_neuron["c"] in ("0:4", "0:20")
    assert "0:20 acc" in result.lines()[0] and "above" in result.lines()[0]
    threshold = float(result.threshold["0|c"][20])
    predicted = h[test, 20] > threshold
    assert float((predicted == y[test].bool()).float().mean()) == pytest.approx(float(ours[20]), abs=1e-6)


def test_linear_probe_recovers_a_planted_direction() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 30, generator=g)
    direction = torch.randn(30, generator=g)
    direction /= direction.norm()
    y = (x @ direction > 0).long()
    result = pyengine.run(
        "probe-linear", IDENTITY, data=TensorDataset(x, concepts={"c": y}), layers=["0"], l2=1e-4, progress=False
    )
    w = result.weights["0|c"]
    assert float(w @ direction / w.norm()) > 0.95
    assert result.test_accuracy["0|c"] > 0.95


def test_l1_makes_the_linear_probe_sparse() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 40, generator=g)
    y = (x[:, 3] - x[:, 7] > 0).long()
    result = pyengine.run(
        "probe-linear", IDENTITY, data=TensorDataset(x, concepts={"c": y}), layers=["0"], l1=0.02, progress=False
    )
    w = result.weights["0|c"]
    assert set(torch.argsort(w.abs(), descending=True)[:2].tolist()) == {3, 7}
    assert int((w.abs() > 1e-6).sum()) <= 6
    assert result.top_units["0|c"].split(" ")[0] in ("3", "7")


def test_mlp_solves_xor_that_no_linear_probe_can() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3000, 8, generator=g)
    y = ((h[:, 0] > 0) ^ (h[:, 1] > 0)).long()
    data = TensorDataset(h, concepts={"xor": y})
    linear = pyengine.run("probe-linear", IDENTITY, data=data, layers=["0"], progress=False)
    mlp = pyengine.run("probe-mlp", IDENTITY, data=data, layers=["0"], progress=False)
    assert linear.test_accuracy["0|xor"] < 0.6
    assert mlp.test_accuracy["0|xor"] > 0.95
    assert mlp.selectivity["0|xor"] > 0.35
    assert 0 < mlp.epochs_run["0|xor"] < 100 and not mlp.warning  # stopped early, on the validation loss


def test_mlp_probe_says_when_it_hit_the_epoch_limit() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3000, 8, generator=g)
    data = TensorDataset(h, concepts={"xor": ((h[:, 0] > 0) ^ (h[:, 1] > 0)).long()})
    mlp = pyengine.run("probe-mlp", IDENTITY, data=data, layers=["0"], epochs=2, progress=False)
    assert mlp.epochs_run == {"0|xor": 2}
    assert mlp.warning == "1 probe(s) still improved on validation at epochs=2 (0|xor); raise epochs"
    assert "WARNING: 1 probe(s)" in mlp.summary()


@pytest.mark.parametrize("technique", ["probe-neurons", "probe-linear"])
def test_selectivity_is_near_zero_for_a_random_representation(technique: str) -> None:
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4000, 16, generator=g)
    y = (torch.rand(4000, generator=g) < 0.5).long()
    result = pyengine.run(technique, IDENTITY, data=TensorDataset(h, concepts={"c": y}), layers=["0"], progress=False)
    selectivity = result.selectivity["0|c"]
    values = selectivity.abs().mean() if isinstance(selectivity, torch.Tensor) else abs(selectivity)
    assert float(values) < 0.05


def test_multiclass_softmax_and_categorical_concepts(small_cnn: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 3, (3000,), generator=g)
    centres = torch.randn(3, 6, generator=g) * 3
    x = centres[codes] + torch.randn(3000, 6, generator=g)
    data = TensorDataset(x, concepts={"kind": codes})
    result = pyengine.run("probe-linear", IDENTITY, data=data, layers=["0"], multiclass=["kind"], progress=False)
    assert result.test_accuracy["0|kind[0]"] > 0.9
    binary = pyengine.run("probe-neurons", IDENTITY, data=data, layers=["0"], concepts=["kind=1"], progress=False)
    assert list(binary.best_accuracy) == ["kind=1"]


def test_store_and_fresh_capture_agree(small_cnn: nn.Module, small_shapes: object, tmp_path: Path) -> None:
    store = pyengine.capture(
        small_cnn,
        small_shapes,
        ["features.relu2", "classifier.relu4"],
        tmp_path / "a.h5",
        dtype="float32",
        progress=False,
    )
    from_store = pyengine.run("probe-neurons", small_cnn, store=store, concepts=["texture"], progress=False)
    fresh = pyengine.run(
        "probe-neurons",
        small_cnn,
        data=small_shapes,
        concepts=["texture"],
        layers=["features.relu2", "classifier.relu4"],
        progress=False,
    )
    assert set(from_store.test_accuracy) == {
        f"{layer}|texture={t}"
        for layer in ("features.relu2", "classifier.relu4")
        for t in ("plain", "striped", "dotted")
    }
    for key, values in from_store.test_accuracy.items():
        torch.testing.assert_close(values, fresh.test_accuracy[key], atol=2 / 96, rtol=0)


def test_probe_options_are_checked() -> None:
    data = TensorDataset(torch.randn(50, 3), concepts={"c": torch.arange(50) % 2})
    with pytest.raises(pyengine.OptionsError, match=r"option split=\(0.5, 0.5, 0.5\) is invalid"):
        pyengine.run("probe-neurons", IDENTITY, data=data, layers=["0"], split=(0.5, 0.5, 0.5))
    with pytest.raises(PyengineError, match="unknown concept 'd'; available: c"):
        pyengine.run("probe-neurons", IDENTITY, data=data, layers=["0"], concepts=["d"], progress=False)
    with pytest.raises(PyengineError, match="labels\\['u'\\] has 10 rows but 50 inputs are probed"):
        pyengine.run("probe-neurons", IDENTITY, data=data, layers=["0"], labels={"u": torch.zeros(10)}, progress=False)
    with pytest.raises(pyengine.OptionsError, match="option reduce='median' is invalid"):
        pyengine.run("probe-linear", IDENTITY, data=data, reduce="median")


def test_the_best_neuron_is_ranked_by_auc_not_by_the_base_rate() -> None:
    """20 % positives: neuron 0 is noise and neuron 1 weakly signals the concept; both probes
    predict the majority class everywhere (accuracy = the base rate, a tie), but only neuron 1
    ranks positives above negatives."""
    generator = torch.Generator().manual_seed(0)
    y = (torch.rand(3000, generator=generator) < 0.2).long()
    noise = torch.randn(3000, generator=generator)
    weak = 0.5 * y.float() + torch.randn(3000, generator=generator)
    h = torch.stack([noise, weak], 1)
    result = pyengine.run(
        "probe-neurons", IDENTITY, data=TensorDataset(h, concepts={"c": y}), layers=["0"], progress=False
    )
    accuracy = result.test_accuracy["0|c"]
    base_rate = 1 - float(y[result.test_rows].float().mean())
    assert abs(float(accuracy[0]) - base_rate) < 0.01 and abs(float(accuracy[1]) - base_rate) < 0.02
    assert result.best_neuron["c"] == "0:1" and float(result.auc["0|c"][1]) > 0.6 > float(result.auc["0|c"][0])
