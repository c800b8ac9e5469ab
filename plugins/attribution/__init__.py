"""Attribution: which parts of an input drive an output.

Occlusion, the gradient techniques (saliency, guided backprop, integrated gradients,
Grad-CAM, SmoothGrad over any registered attribution technique) and faithfulness scores
(pointing game, deletion/insertion) for every registered attribution technique.
"""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.plugins.attribution.faithfulness import Faithfulness
from pyengine.plugins.attribution.gradients import GradCam, GuidedBackprop, IntegratedGradients, Saliency, SmoothGrad
from pyengine.plugins.attribution.occlusion import Occlusion


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in (Occlusion, Saliency, GuidedBackprop, IntegratedGradients, GradCam, SmoothGrad, Faithfulness):
        register(technique)
