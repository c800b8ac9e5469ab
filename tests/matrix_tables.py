"""The architecture matrix's tables: the zoo models, the layers each cell reads, and the cells
where a technique refuses a model (with the pattern its one-line message must contain)."""

from __future__ import annotations

from matrix_harness import Refusal

# --- the models and the layers each cell reads ---------------------------------------------------

MODELS = ("resnet50", "vgg16_bn", "mobilenet_v3", "densenet", "vit", "demo_cnn")
SIZE = 32
ROWS = 64  # dataset rows (labels, concepts texture and colour, boxes) for techniques that read data
EXPLAINED = 4  # rows explained by the per-input techniques
TOKEN_LAYER = "encoder.layers.encoder_layer_1"  # the ViT's (B, T, D) block output

# The default layers, as their documentation defines them (checked in the cells that use them).
SPATIAL = {  # the last (N, C, H, W) output with H*W > 1 that every path to the output goes through
    "resnet50": "layer3",  # layer4 is 1x1 at 32x32
    "vgg16_bn": "features.42",  # the last ReLU before the last pool: features is 1x1 at 32x32
    "mobilenet_v3": "features",
    "densenet": "features",
    "vit": "conv_proj",
    "demo_cnn": "features",
}
FIRST_BLOCK = {  # the first convolution's output after its normalisation and nonlinearity
    "resnet50": "relu",
    "vgg16_bn": "features.2",
    "mobilenet_v3": "features.0",
    "densenet": "features.relu0",
    "vit": "conv_proj",
    "demo_cnn": "features.relu1",
}
# Probes read every nonlinearity by default: tested so on demo_cnn (4 layers) and vit (2); elsewhere
# (11 to 17 layers, each fit compared with scikit-learn) two layers, a repeated ReLU call and 1x1 maps among them.
PROBE_LAYERS = {
    "resnet50": ("layer1.0.relu#2", "layer4.0.relu#3"),
    "vgg16_bn": ("features.5", "classifier.1"),
    "mobilenet_v3": ("features.1.block.1.activation", "features.6.2"),
    "densenet": ("features.denseblock1.denselayer2.relu1", "features.transition1.relu"),
}
# interaction-basis: two layers every path to the output goes through, every value of a layer a unit
# (units="flatten", the layout check_interaction_basis takes). Its default chain (every nonlinearity
# output, one basis shared by positions): see test_interaction_basis_default_layers.
INTERACTION_LAYERS = {
    "resnet50": ("layer3", "layer4"),
    "vgg16_bn": ("features.42", "classifier.4"),
    "mobilenet_v3": ("features.5", "features.6"),
    "densenet": ("features.transition1", "features.norm5"),
    "vit": ("encoder.layers.encoder_layer_0", TOKEN_LAYER),
    "demo_cnn": ("features.pool3", "classifier.relu4"),
}
CHAINS = ("vgg16_bn", "demo_cnn")  # plain chains of ReLU layers: hierarchical paths have a reference


NOT_PL = "is not piecewise linear"
REFUSALS: dict[tuple[str, str], Refusal] = {
    ("path-linear", "mobilenet_v3"): Refusal(r"features\.0\.2\b", f"Hardswish `features.0.2` {NOT_PL}"),
    ("path-linear", "vit"): Refusal(r"encoder_layer_0\.ln_1\b", f"LayerNorm `encoder_layer_0.ln_1` {NOT_PL}"),
    ("hierarchical-decomposition", "mobilenet_v3"): Refusal(r"features\.0\.2\b", f"Hardswish `features.0.2` {NOT_PL}"),
    ("hierarchical-decomposition", "vit"): Refusal(
        r"encoder_layer_0\.ln_1\b", f"LayerNorm `encoder_layer_0.ln_1` {NOT_PL}"
    ),
    ("guided-backprop", "vit"): Refusal(r"ReLU", "no ReLU to guide"),
    ("hierarchical-decomposition", "resnet50"): Refusal(
        r"needs a plain chain of ReLU layers", "residual adds: the top-down walk follows a plain chain"
    ),
    ("hierarchical-decomposition", "densenet"): Refusal(
        r"needs a plain chain of ReLU layers", "concatenation: the top-down walk follows a plain chain"
    ),
    ("hierarchical-decomposition", "vgg16_bn"): Refusal(
        r"adaptive_avg_pool2d", "at 32x32 the AdaptiveAvgPool2d(7) copies a 1x1 map: not a chain step"
    ),
}
