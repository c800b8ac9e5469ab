"""The feature axis: a transformer's (B, T, D) layers have D units and T positions, a conv net's
(B, C, H, W) / (B, C, L) layers C units; ``units=`` overrides it and every result says which it used."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from vision_models import build

import pyengine
from conftest import hooks_on
from pyengine.data import Shapes, TensorDataset
from pyengine.errors import PyengineError
from pyengine.store import StoreReader

VIT_SIZE = 64  # 8 x 8 patches and the class token: 65 tokens of 32 features, MLP width 64
TOKENS, MLP = 65, 64
GELU0 = "encoder.layers.encoder_layer_0.mlp.1"
GELU1 = "encoder.layers.encoder_layer_1.mlp.1"


@functools.cache
def zoo(name: str, size: int = 32) -> nn.Module:
    return build(name, size)


@functools.cache
def shapes(n: int, size: int) -> Shapes:
    return Shapes(n, seed=5, size=size)


def outputs_of(model: nn.Module, reference: str, inputs: torch.Tensor) -> torch.Tensor:
    """The output of ``path`` (its only call) or ``path#k`` (call k, 1-based) for ``inputs``, read
    with a plain forward hook."""
    path, _, call = reference.partition("#")
    seen: list[torch.Tensor] = []
    module = dict(model.named_modules())[path]
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    assert call or len(seen) == 1
    return seen[int(call or 1) - 1]


def covariance_spectrum(samples: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.cov(samples.astype(np.float64), rowvar=False, bias=True))[::-1]


def vit_inputs(n: int) -> torch.Tensor:
    return shapes(n, VIT_SIZE).batch(range(n)).inputs


# --- gram-spectrum, relu-sync, activations: D units, tokens are samples ------------------------


def test_vit_gram_spectrum_defaults_to_the_gelus_with_their_features_as_units() -> None:
    model, data = zoo("vit", VIT_SIZE), shapes(48, VIT_SIZE)
    result = pyengine.run("gram-spectrum", model, data=data, progress=False)
    assert result.units == {GELU0: MLP, GELU1: MLP}  # not 65 tokens
    assert result.unit_axis == {GELU0: "last", GELU1: "last"}
    assert result.samples == {GELU0: 48 * TOKENS, GELU1: 48 * TOKENS}
    assert "units=dim 2 (from a linear)" in result.defaults
    for layer in (GELU0, GELU1):
        h = outputs_of(model, layer, vit_inputs(48)).numpy()
        expected = covariance_spectrum(h.reshape(-1, MLP))
        np.testing.assert_allclose(result.eigenvalues[layer].numpy(), expected, rtol=1e-7, atol=1e-10 * expected[0])
    assert hooks_on(model) == []


def test_units_option_flips_the_axis_and_the_result_says_so(tmp_path: Path) -> None:
    model, data = zoo("vit", VIT_SIZE), shapes(48, VIT_SIZE)
    path = tmp_path / "results.h5"
    result = pyengine.run(
        "gram-spectrum", model, data=data, layers=[GELU0], units="channels", save=path, progress=False
    )
    assert result.units == {GELU0: TOKENS} and result.unit_axis == {GELU0: "channels"}
    h = outputs_of(model, GELU0, vit_inputs(48)).numpy()
    expected = covariance_spectrum(h.transpose(0, 2, 1).reshape(-1, TOKENS))
    np.testing.assert_allclose(result.eigenvalues[GELU0].numpy(), expected, rtol=1e-7, atol=1e-10 * expected[0])
    with StoreReader(path) as reader:
        (run,) = [run for technique, run in reader.results() if technique == "gram-spectrum"]
        _, attrs = reader.result("gram-spectrum", run)
    assert attrs[f"unit_axis/{GELU0}"] == "channels"
    assert '"units": "channels"' in attrs["options"]


def test_vit_relu_sync_fires_on_positive_gelu_outputs_per_feature() -> None:
    model, data = zoo("vit", VIT_SIZE), shapes(40, VIT_SIZE)
    result = pyengine.run("relu-sync", model, data=data, layers=[GELU1], progress=False)
    assert result.unit_axis == {GELU1: "last"} and result.samples == {GELU1: 40 * TOKENS}
    fires = outputs_of(model, GELU1, vit_inputs(40)).reshape(-1, MLP).numpy() > 0
    np.testing.assert_allclose(result.firing_rate[GELU1].numpy(), fires.mean(0), atol=1e-6)
    agreement = (fires[:, :, None] == fires[:, None, :]).mean(0)
    np.testing.assert_allclose(result.agreement[GELU1].numpy(), agreement, atol=1e-6)


def test_vit_activations_report_per_feature_statistics() -> None:
    model = zoo("vit", VIT_SIZE)
    inputs = vit_inputs(4)
    result = pyengine.run("activations", model, inputs, layers=GELU0, progress=False)
    h = outputs_of(model, GELU0, inputs)
    assert result.unit_axis == "last" and result.maps.shape == (4, TOKENS, MLP)
    torch.testing.assert_close(result.channel_max, h.amax((0, 1)))
    torch.testing.assert_close(result.channel_zero_fraction, (h == 0).double().mean((0, 1)))
    flipped = pyengine.run("activations", model, inputs, layers=GELU0, units="channels", progress=False)
    assert flipped.unit_axis == "channels"
    torch.testing.assert_close(flipped.channel_max, h.amax((0, 2)))


# --- jacobian-gram and interaction-basis --------------------------------------------------------


def test_vit_jacobian_gram_equals_float64_autograd_summed_over_tokens() -> None:
    model, inputs = zoo("vit", VIT_SIZE), vit_inputs(8)
    result = pyengine.run("jacobian-gram", model, data=TensorDataset(inputs), layers=[GELU0], progress=False)
    assert result.units == {GELU0: MLP} and result.unit_axis == {GELU0: "last"} and result.sources == "exact"

    reference = copy.deepcopy(model).double()
    leaves: list[torch.Tensor] = []

    def as_leaf(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    dict(reference.named_modules())[GELU0].register_forward_hook(as_leaf)
    logits = reference(inputs.double())
    gram = torch.zeros(MLP, MLP, dtype=torch.float64)
    for c in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, c].sum(), leaves[0], retain_graph=True)
        gram += torch.einsum("btd,bte->de", g, g)
    gram /= inputs.shape[0]
    torch.testing.assert_close(result.gram[GELU0], gram, rtol=1e-3, atol=1e-6 * float(gram.abs().max()))


def test_vit_interaction_basis_uses_features_and_keeps_the_outputs() -> None:
    """On the residual stream (the blocks' outputs, which every path goes through): one basis of
    the 32 features shared by the 65 tokens. The GELUs inside the blocks, which the residual adds
    go around, are refused as defaults, naming the blocks to use."""
    model, inputs = copy.deepcopy(zoo("vit", VIT_SIZE)).double(), vit_inputs(24).double()
    with pytest.raises(PyengineError, match=r"2 are bypassed .*e\.g\. 'encoder\.layers\.encoder_layer_0'"):
        pyengine.run("interaction-basis", model, data=TensorDataset(inputs), batch_size=12, progress=False)
    blocks = ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")
    # cutoff 1e-14 drops only numerically null directions (the default 1e-8 also drops amplitudes < 1e-4)
    result = pyengine.run(
        "interaction-basis",
        model,
        data=TensorDataset(inputs),
        layers=blocks,
        batch_size=12,
        cutoff=1e-14,
        progress=False,
    )
    width = outputs_of(model, blocks[0], inputs[:1]).shape[-1]
    assert result.width == {blocks[0]: width, blocks[1]: width}
    assert result.unit_axis == {blocks[0]: "last", blocks[1]: "last"}
    assert result.edges[f"{blocks[0]}->{blocks[1]}"].shape == (
        result.basis_size[blocks[1]],
        result.basis_size[blocks[0]],
    )
    with torch.no_grad():
        scale = float(model(inputs).abs().max())
    assert max(result.output_change.values()) <= 1e-6 * scale, result.output_change
    for layer in blocks:
        c, c_inverse = result.basis[layer], result.inverse[layer]
        torch.testing.assert_close(c @ c_inverse, torch.eye(c.shape[0], dtype=c.dtype), rtol=0, atol=1e-8)
        # C whitens the features' Gram over rows x tokens: C G Cᵀ is diagonal
        h = outputs_of(model, layer, inputs).reshape(-1, width)
        whitened = c @ (h.T @ h / h.shape[0]) @ c.T
        torch.testing.assert_close(whitened, torch.diag(torch.diagonal(whitened)), rtol=0, atol=1e-8)


# --- probes: a row's feature vector is one value per feature ------------------------------------


@pytest.mark.parametrize(("reduce", "pooling"), [("auto", "mean"), ("first", "first")])
def test_vit_linear_probe_equals_sklearn_on_pooled_tokens(reduce: str, pooling: str) -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    model, data = zoo("vit", VIT_SIZE), shapes(160, VIT_SIZE)
    l2 = 1e-2
    result = pyengine.run(
        "probe-linear", model, data=data, layers=[GELU1], concepts=["texture=striped"], l2=l2, reduce=reduce,
        iterations=5000, progress=False,
    )  # fmt: skip
    key = f"{GELU1}|texture=striped"
    assert result.unit_axis == {GELU1: "last"} and result.pooling == {GELU1: pooling}
    assert result.weights[key].shape == (MLP,)
    h = outputs_of(model, GELU1, vit_inputs(160))
    features = (h.mean(1) if pooling == "mean" else h[:, 0]).double().numpy()
    y = (data.batch(range(160)).concepts["texture"] == 1).numpy()
    train, test = result.train_rows.numpy(), result.test_rows.numpy()
    mean, std = features[train].mean(0), features[train].std(0, ddof=1).clip(1e-6)
    z = (features - mean) / std
    # mean BCE + l2/2 |w|^2 is sklearn's C * sum BCE + 1/2 |w|^2 with C = 1 / (l2 * n)
    reference = linear_model.LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10000)
    reference.fit(z[train], y[train])
    assert result.test_accuracy[key] == pytest.approx(reference.score(z[test], y[test]), abs=1e-9)
    np.testing.assert_allclose(result.weights[key].numpy() * std, reference.coef_[0], rtol=2e-3, atol=2e-4)


def test_vit_neuron_and_mlp_probes_use_features_and_the_override_uses_tokens() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    model, data = zoo("vit", VIT_SIZE), shapes(160, VIT_SIZE)
    neurons = pyengine.run(
        "probe-neurons", model, data=data, layers=[GELU0], concepts=["texture=striped"], progress=False
    )
    key = f"{GELU0}|texture=striped"
    assert neurons.weight[key].shape == (MLP,) and neurons.unit_axis == {GELU0: "last"}
    h = outputs_of(model, GELU0, vit_inputs(160)).mean(1).numpy()
    y = (data.batch(range(160)).concepts["texture"] == 1).numpy()
    train, test = neurons.train_rows.numpy(), neurons.test_rows.numpy()
    for unit in (0, 17, 63):
        reference = linear_model.LogisticRegression(C=1.0, tol=1e-8, max_iter=1000)
        reference.fit(h[train, unit : unit + 1], y[train])
        expected = reference.score(h[test, unit : unit + 1], y[test])
        assert abs(float(neurons.test_accuracy[key][unit]) - expected) <= 0.005

    mlp = pyengine.run(
        "probe-mlp", model, data=data, layers=[GELU0], concepts=["texture=striped"], epochs=3, progress=False
    )
    assert mlp.unit_axis == {GELU0: "last"} and mlp.pooling == {GELU0: "mean"}
    tokens = pyengine.run(
        "probe-linear", model, data=data, layers=[GELU0], concepts=["texture=striped"], units="channels", progress=False
    )
    assert tokens.unit_axis == {GELU0: "channels"} and tokens.pooling == {GELU0: "max"}
    assert tokens.weights[key].shape == (TOKENS,)
    with pytest.raises(PyengineError, match="reduce='first' picks a token of a sequence"):
        pyengine.run("probe-linear", zoo("resnet50"), data=shapes(64, 32), layers=["layer4.0.relu#3"], reduce="first")


# --- max-patches: channels of a 2-D grid, never tokens -----------------------------------------


def test_max_patches_refuses_tokens_and_takes_the_patch_embedding_channels() -> None:
    model, data = zoo("vit", VIT_SIZE), shapes(24, VIT_SIZE)
    refusal = r"not an \(N, C, H, W\) map: its units see the whole input through .*self_attention.*conv_proj"
    with pytest.raises(PyengineError, match=refusal):
        pyengine.run("max-patches", model, data=data, layers=GELU0, k=2, progress=False)
    result = pyengine.run("max-patches", model, data=data, layers="conv_proj", k=2, progress=False)
    assert result.unit_axis == "channels" and result.values.shape == (32, 2) and result.field_size == "8x8"
    maps = outputs_of(model, "conv_proj", vit_inputs(24))
    torch.testing.assert_close(result.values[:, 0], maps.amax((0, 2, 3)))


# --- auto tells the layouts apart by their producer, not their shape ---------------------------


def test_auto_tells_a_conv1d_map_from_a_token_sequence_of_the_same_shape() -> None:
    x = torch.randn(200, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1), nn.ReLU())  # (B, C=6, L=6)
    tokens = nn.Sequential(nn.Linear(6, 6), nn.GELU())  # (B, T=6, D=6)
    for model, name, layout in ((conv, "channels", (0, 2, 1)), (tokens, "last", (0, 1, 2))):
        result = pyengine.run("gram-spectrum", model, data=TensorDataset(x), layers=["1"], progress=False)
        assert result.unit_axis == {"1": name}
        h = model(x).detach().numpy().transpose(layout).reshape(-1, 6)
        np.testing.assert_allclose(result.eigenvalues["1"].numpy(), covariance_spectrum(h), rtol=1e-7, atol=1e-12)


def test_a_value_whose_units_were_split_is_an_error_naming_the_option() -> None:
    model = nn.Sequential(nn.Linear(4, 24), nn.Unflatten(1, (4, 6)), nn.ReLU())  # 24 features cut into (4, 6)
    data = TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(PyengineError, match=r"cannot tell which dim of layer '2' \(values \(B, 4, 6\)\) holds"):
        pyengine.run("gram-spectrum", model, data=data, layers=["2"], progress=False)
    result = pyengine.run("gram-spectrum", model, data=data, layers=["2"], units="last", progress=False)
    assert result.units == {"2": 6}


def test_capture_records_the_unit_axis_for_store_only_runs(tmp_path: Path) -> None:
    model, data = zoo("vit", VIT_SIZE), shapes(32, VIT_SIZE)
    store = pyengine.capture(model, data, [GELU0, "conv_proj"], tmp_path / "a.h5", dtype="float32", progress=False)
    with StoreReader(store) as reader:
        assert reader.unit_dims() == {GELU0: 2, "conv_proj": 1}
    stored = pyengine.run("gram-spectrum", model, store=store, layers=[GELU0], progress=False)
    fresh = pyengine.run("gram-spectrum", model, data=data, layers=[GELU0], progress=False)
    assert stored.unit_axis == {GELU0: "last"} and stored.units == {GELU0: MLP}
    torch.testing.assert_close(stored.eigenvalues[GELU0], fresh.eigenvalues[GELU0], rtol=1e-9, atol=1e-12)


# --- CNNs: the nonlinearity outputs, with call numbers, channels as units ----------------------

DEGENERACY = ("gram-spectrum", "relu-sync", "jacobian-gram", "interaction-basis", "probe-linear")


def test_interaction_basis_defaults_to_any_nonlinearity_and_says_when_all_are_too_wide() -> None:
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    gelu = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).double()
    result = pyengine.run("interaction-basis", gelu, data=TensorDataset(x), progress=False)
    assert result.width == {"1": 6} and result.unit_axis == {"1": "units"}
    wide = nn.Sequential(nn.Linear(4, 5000), nn.SiLU(), nn.Linear(5000, 3)).double()
    with pytest.raises(PyengineError, match="default chain: 1 have more than 4096 units"):
        pyengine.run("interaction-basis", wide, data=TensorDataset(x), progress=False)
    with pytest.raises(PyengineError, match="no layers given and the model runs no nonlinearity module"):
        pyengine.run("interaction-basis", nn.Linear(4, 3).double(), data=TensorDataset(x), progress=False)


@pytest.mark.parametrize("name", ["resnet50", "convnext"])
def test_cnn_defaults_are_every_nonlinearity_call_and_the_techniques_run(name: str) -> None:
    model, data = zoo(name), shapes(32, 32)
    spectrum = pyengine.run("gram-spectrum", model, data=data, progress=False)
    layers = list(spectrum.units)
    if name == "resnet50":  # torchvision's one self.relu per block, called three times
        assert ["layer1.0.relu#1", "layer1.0.relu#2", "layer1.0.relu#3"] == layers[1:4] and layers[0] == "relu"
        assert set(spectrum.unit_axis.values()) == {"channels"}
    else:  # ConvNeXt's GELU runs on channels-last (B, H, W, 4C) maps
        assert layers[0] == "stages.0.blocks.0.mlp.act" and len(layers) == 5
        assert set(spectrum.unit_axis.values()) == {"last"} and spectrum.units[layers[0]] == 32
    layer = layers[1]
    reference = outputs_of(model, layer, shapes(32, 32).batch(range(32)).inputs)
    dim = 1 if name == "resnet50" else 3
    expected = covariance_spectrum(reference.movedim(dim, -1).reshape(-1, reference.shape[dim]).numpy())
    np.testing.assert_allclose(spectrum.eigenvalues[layer].numpy(), expected, rtol=1e-6, atol=1e-9 * expected[0])
    for technique in DEGENERACY[1:]:
        options: dict[str, Any] = {"stop": 16, "batch_size": 16}
        if technique == "probe-linear":
            options = {"concepts": ["texture=striped"]}
        expected = layers
        if technique == "interaction-basis":  # only the calls no residual add goes around: block outputs
            if name == "convnext":  # its GELUs are all inside residual blocks
                with pytest.raises(PyengineError, match="5 are bypassed by residual adds"):
                    pyengine.run(technique, model, data=data, progress=False, **options)
                continue
            expected = [layer for layer in layers if layer == "relu" or layer.endswith("#3")]
        result = pyengine.run(technique, model, data=data, progress=False, **options)
        axes = result.unit_axis
        assert list(axes) == expected, technique
        assert set(axes.values()) == set(spectrum.unit_axis.values()), technique
    assert hooks_on(model) == []
