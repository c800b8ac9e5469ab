"""Finding default layers: the conv layers of a model, and the ReLU module that follows one."""

from __future__ import annotations

from torch import nn

from pyengine.errors import PyengineError


def conv_layers(model: nn.Module, technique: str,
                kinds: tuple[type[nn.Module], ...] = (nn.Conv2d,)) -> list[str]:
    """Module paths of the model's conv layers, in order; an error if there are none."""
    convs = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    if not convs:
        wanted = "/".join(f"nn.{kind.__name__}" for kind in kinds)
        raise PyengineError(f"{technique}: the model has no {wanted} layer; pass layer=<module path>")
    return convs


def after_relu(model: nn.Module, name: str) -> str:
    """The nn.ReLU module registered right after ``name``, if there is one, else ``name``."""
    modules = list(model.named_modules())
    k = [n for n, _ in modules].index(name)
    return modules[k + 1][0] if k + 1 < len(modules) and isinstance(modules[k + 1][1], nn.ReLU) else name
