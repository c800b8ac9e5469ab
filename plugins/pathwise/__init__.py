"""Pathwise explanation of ReLU networks: the local linear model, its paths, and the
top-down hierarchical decomposition (Cheng et al.)."""

from __future__ import annotations

from typing import Any

from pyengine.hookspecs import hookimpl
from pyengine.plugins.pathwise.paths import HierarchicalDecomposition, PathLinear


@hookimpl
def register_techniques(register: Any) -> None:
    register(PathLinear)
    register(HierarchicalDecomposition)
