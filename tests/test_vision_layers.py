"""Real vision architectures: layer references, faithful recording and defaults by shape.

On the zoo's torchvision/timm-style models (tests/vision_models.py): a module called several
times is read at the call named, the same call everywhere (capture, gram-spectrum, grad-cam =
Captum's LayerGradCam, which reads the last call); a value the model changes in place after
the module returned it (``out += identity``, DenseNet's in-place ``F.relu``) is recorded as
returned; default layers come from the model's graph, not from registration order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from vision_models import build, zoo_images

import pyengine
from pyengine.data import TensorDataset
from pyengine.errors import PyengineError
from pyengine.layers import first_block_output, last_spatial_cut, nonlinearity_outputs, traced_pass

try:
    import captum.attr as captum_attr
except ImportError:
    captum_attr = None
warnings.filterwarnings("ignore", module="captum")


def returned_by(model: nn.Module, module: nn.Module, x: torch.Tensor, call: int = -1) -> torch.Tensor:
    """What ``module`` returned at its ``call``-th call (0-based; -1 the last), copied at once."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return outputs[call]


@pytest.mark.parametrize(
    ("name", "size", "spatial", "first"),
    [
        ("resnet50", 64, "layer4", "relu"),  # layer4 is 2x2 at 64 px
        ("resnet50", 32, "layer3", "relu"),  # ... and 1x1 at 32 px: the last map with positions is layer3
        ("vgg16_bn", 32, "features.42", "features.2"),  # not the classifier's adaptive pool, which upsamples 1x1
        ("mobilenet_v3", 32, "features", "features.0"),
        ("densenet", 32, "features", "features.relu0"),
        ("convnext", 64, "stages", "stem"),
        ("vit", 32, "conv_proj", "conv_proj"),
        ("demo_cnn", 32, "features", "features.relu1"),
    ],
)
def test_defaults_come_from_the_graph(name: str, size: int, spatial: str, first: str) -> None:
    model, x = build(name, size), zoo_images(2, size)
    assert last_spatial_cut(model, x, "t") == spatial
    assert first_block_output(model, x, "t") == first


def test_traced_nodes_are_the_modules_own_even_when_the_value_changes_in_place() -> None:
    """``out = self.bn3(...); out += identity``: the call's node is the BatchNorm's, not the add's."""
    calls = {c.reference: c for c in traced_pass(build("resnet50"), zoo_images(1)).calls}
    bottleneck = [ref for ref in calls if ref.endswith(".bn3")]
    assert bottleneck and all(calls[ref].node.name().startswith("NativeBatchNorm") for ref in bottleneck)


def test_nonlinearity_defaults_name_every_call() -> None:
    model, x = build("resnet50"), zoo_images(2)
    found = nonlinearity_outputs(model, x)
    blocks = [name for name, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    assert found == ("relu", *(f"{block}.relu#{k}" for block in blocks for k in (1, 2, 3)))
    vit = nonlinearity_outputs(build("vit"), zoo_images(2))
    assert vit and all(name.endswith("mlp.1") for name in vit)  # the GELUs


def test_grad_cam_reads_the_named_call_like_captum() -> None:
    if captum_attr is None:
        pytest.skip("needs captum")
    model, x = build("resnet50", 64), zoo_images(4, 64)
    targets = torch.tensor([0, 3, 5, 9])
    for layer, module in [("layer4.0.relu#3", model.layer4[0].relu), (None, model.layer4)]:
        theirs = captum_attr.LayerGradCam(model, module).attribute(x, target=targets, relu_attributions=True).detach()
        options = {"layers": [layer]} if layer else {}
        ours = pyengine.run("grad-cam", model, x, target=targets, progress=False, **options)
        assert ours.layer == (layer or "layer4")
        torch.testing.assert_close(ours.layer_attributions, theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))
        assert float(theirs.abs().max()) > 1e-3
    with pytest.raises(PyengineError, match=r"'layer4.0.relu' ran 3 times in one forward pass; name the call"):
        pyengine.run("grad-cam", model, x, target=0, layers=["layer4.0.relu"], progress=False)


def test_grad_cam_refuses_token_layers() -> None:
    model, x = build("vit"), zoo_images(2)
    with pytest.raises(PyengineError, match=r"grad-cam: layer 'encoder.layers.encoder_layer_1' gives output of shape"):
        pyengine.run("grad-cam", model, x, target=0, layers=["encoder.layers.encoder_layer_1"], progress=False)


def test_guided_backprop_refuses_a_model_without_relu() -> None:
    with pytest.raises(PyengineError, match=r"VisionTransformer applies no ReLU.*use saliency"):
        pyengine.run("guided-backprop", build("vit"), zoo_images(2), target=0, progress=False)


def test_capture_stores_what_the_module_returned(tmp_path: Path) -> None:
    """bn3's output is then changed by ``out += identity`` and an in-place ReLU; DenseNet's
    norm5 output by ``F.relu(features, inplace=True)``; a shared ReLU is read per call."""
    cases = [
        ("resnet50", "layer1.0.bn3", lambda m: m.layer1[0].bn3, -1),
        ("resnet50", "layer2.0.relu#2", lambda m: m.layer2[0].relu, 1),
        ("densenet", "features.norm5", lambda m: m.features.norm5, -1),
        ("mobilenet_v3", "features.3.block.2.1", lambda m: m.features[3].block[2][1], -1),  # then result += input
    ]
    x = zoo_images(12)
    for k, (name, layer, module, call) in enumerate(cases):
        model = build(name)
        expected = returned_by(model, module(model), x, call)
        path = pyengine.capture(
            model, TensorDataset(x), [layer], tmp_path / f"{k}.h5", batch_size=4, dtype="float32", progress=False
        )
        with pyengine.StoreReader(path) as store:
            stored = torch.cat(list(store.iter_layer(layer)))
        torch.testing.assert_close(stored, expected, msg=f"{name} {layer}")
    with pytest.raises(PyengineError, match=r"module 'layer1.0.relu' ran 3 times"):
        pyengine.capture(build("resnet50"), TensorDataset(x), ["layer1.0.relu"], tmp_path / "b.h5", progress=False)


def test_gram_spectrum_of_a_value_changed_in_place_is_the_module_output() -> None:
    model, x = build("densenet"), zoo_images(48)
    result = pyengine.run("gram-spectrum", model, x, layers=["features.norm5"], batch_size=16, progress=False)
    values = returned_by(model, model.features.norm5, x).double()
    units = values.transpose(0, 1).reshape(values.shape[1], -1).T.numpy()  # positions as rows, channels as units
    expected = np.linalg.eigvalsh(np.cov(units, rowvar=False, bias=True))[::-1]
    np.testing.assert_allclose(result.eigenvalues["features.norm5"].numpy(), expected, rtol=1e-6, atol=1e-9)
    assert float((values < 0).double().mean()) > 0.2  # pre-ReLU values: the in-place ReLU did not reach them
