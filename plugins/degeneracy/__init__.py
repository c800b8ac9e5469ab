"""Degeneracy: directions, units and parameters a network does not use.

Activation and Jacobian Gram spectra, the local interaction basis, synchronized ReLUs and
the local learning coefficient.
"""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.plugins.degeneracy.interaction import InteractionBasis
from pyengine.plugins.degeneracy.jacobians import JacobianGram
from pyengine.plugins.degeneracy.llc import LLC
from pyengine.plugins.degeneracy.spectra import GramSpectrum
from pyengine.plugins.degeneracy.synchrony import ReluSync


@hookimpl
def register_techniques(register: Any) -> None:
    for technique in (GramSpectrum, JacobianGram, InteractionBasis, ReluSync, LLC):
        register(technique)
