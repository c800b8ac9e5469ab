"""Shared fixtures: small models and data, and the hook-leak check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pyengine.data import Shapes
from pyengine.models import DemoCNN

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CUDA_REASON = "needs a CUDA GPU"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``cuda`` every test that ``requires_cuda`` (on the test or on its parameter): ``pytest -m cuda``."""
    for item in items:
        if any(mark.kwargs.get("reason") == CUDA_REASON for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def small_cnn() -> DemoCNN:
    torch.manual_seed(0)
    return DemoCNN(width=4, image_size=16).eval()


@pytest.fixture
def small_shapes() -> Shapes:
    return Shapes(96, seed=3, size=16)


def hooks_on(model: nn.Module) -> list[str]:
    """Every hook left on the model's modules or registered globally."""
    left = []
    for name, module in model.named_modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, attribute, None):
                left.append(f"{name or '<root>'}.{attribute}")
    from torch.nn.modules import module as module_globals

    for attribute in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        if getattr(module_globals, attribute, None):
            left.append(attribute)
    return left


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pyengine`` command."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(BIN / "pyengine"), "-q", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout
    )


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyengine: error:"), lines
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="session")
def cmake() -> str:
    found = shutil.which("cmake") or (str(BIN / "cmake") if (BIN / "cmake").exists() else None)
    if found is None:
        pytest.skip("cmake not found")
    return found


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoCNN:
    """The demo CNN trained exactly as ``pyengine demo`` trains it (cached per session)."""
    from pyengine.train import TrainConfig, train_cached

    config = TrainConfig()
    torch.manual_seed(config.seed)
    model = DemoCNN()
    cache = tmp_path_factory.mktemp("weights")
    old = os.environ.get("PYENGINE_CACHE")
    os.environ["PYENGINE_CACHE"] = str(cache)
    try:
        train_cached(model, Shapes(config.train_size, seed=0), Shapes(config.test_size, seed=1), config, progress=False)
    finally:
        if old is None:
            os.environ.pop("PYENGINE_CACHE")
        else:
            os.environ["PYENGINE_CACHE"] = old
    return model.eval()


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pyengine demo`` run once per session through the CLI; its output folder (``out/report/index.html`` the
    report). The weights cache it trained into is ``out.parent / "cache"``."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    result = run_cli("demo", "--out", str(out), env={"PYENGINE_CACHE": str(root / "cache")}, timeout=1200)
    assert result.returncode == 0, f"pyengine demo failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return out
