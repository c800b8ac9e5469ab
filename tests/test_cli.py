"""The ``pyengine`` command: happy paths, and one-line exit-2 errors that leave nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import BIN, assert_user_error, run_cli
from pyengine.models import DemoCNN

MODEL = '[model]\nname = "demo-cnn"\nargs = { width = 4, image_size = 16 }\n'
DATA = '[data]\nname = "shapes"\nargs = { n = 40, size = 16 }\ninputs = 4\n'
TECHNIQUE = '[[technique]]\nname = "gram-spectrum"\noptions = { cutoffs = [1e-3] }\n'


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_plugins_and_techniques_listings() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = {row["name"]: row for row in json.loads(result.stdout)}
    assert listing["pyengine.plugins.degeneracy"]["techniques"] == [
        "gram-spectrum",
        "jacobian-gram",
        "interaction-basis",
        "relu-sync",
        "llc",
    ]
    assert listing["pyengine.plugins.degeneracy"]["builtin"] is True
    assert "demo-cnn" in listing["pyengine.models"]["models"]
    text = run_cli("plugins")
    assert "pyengine.plugins.degeneracy (built-in) techniques: gram-spectrum" in text.stdout
    techniques = json.loads(run_cli("techniques", "--json").stdout)
    spectrum = next(t for t in techniques if t["name"] == "gram-spectrum")
    center = next(o for o in spectrum["options"] if o["name"] == "center")
    assert center["default"] is True and center["doc"].startswith("covariance")
    listed = run_cli("techniques").stdout
    assert "    center = True: covariance (centred) rather than second moment" in listed
    one = run_cli("techniques", "occlusion").stdout
    assert one.startswith("occlusion: ") and "gram-spectrum" not in one
    assert "    sweep = 'auto': 'auto': incremental" in one
    unknown = run_cli("techniques", "oclusion")
    assert unknown.returncode == 2 and "unknown technique 'oclusion'; expected one of" in unknown.stderr


def test_run_config_writes_results(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(DemoCNN(width=4, image_size=16).state_dict(), weights)
    config = write_config(
        tmp_path,
        'out = "res.h5"\n' + MODEL + 'weights = "w.pt"\n' + DATA + TECHNIQUE + TECHNIQUE.replace("1e-3", "1e-2"),
    )
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "gram-spectrum/run-001: layer features.relu1" in result.stdout
    with pyengine.StoreReader(tmp_path / "res.h5") as reader:
        assert reader.results() == [("gram-spectrum", "run-001"), ("gram-spectrum", "run-002")]
        _, attrs = reader.result("gram-spectrum", "run-002")
    assert json.loads(attrs["options"])["cutoffs"] == [0.01]


def test_capture_and_info(tmp_path: Path) -> None:
    out = tmp_path / "acts.h5"
    result = run_cli(
        "capture",
        "--model",
        "demo-cnn",
        "--model-arg",
        "width=4",
        "--model-arg",
        "image_size=16",
        "--data",
        "shapes",
        "--data-arg",
        "n=30",
        "--data-arg",
        "size=16",
        "--layers",
        "features.relu1,classifier.relu4",
        "--out",
        str(out),
        "--batch-size",
        "8",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert info["rows"] == 30 and set(info["layers"]) == {"features.relu1", "classifier.relu4"}
    assert info["meta"]["schema_version"] == 1
    text = run_cli("info", str(out)).stdout
    assert "/activations/features.relu1  (30, 4, 16, 16) float16 gzip" in text


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (None, "does not exist"),
        ("out = [", "invalid TOML"),
        (MODEL + DATA + '[[technique]]\nname = "nope"\n', "unknown technique 'nope'"),
        (
            MODEL + DATA + '[[technique]]\nname = "gram-spectrum"\noptions = { centre = true }\n',
            "unknown option 'centre'; valid options: start, stop, batch_size, layers, center",
        ),
        (
            MODEL + DATA + '[[technique]]\nname = "gram-spectrum"\noptions = { cutoffs = [2] }\n',
            "option cutoffs=(2.0,) is invalid: expected relative cut-offs in (0, 1)",
        ),
        (
            MODEL + DATA + '[[technique]]\nname = "gram-spectrum"\noptions = { layers = ["features.relu7"] }\n',
            "no layer 'features.relu7'",
        ),
        ('[model]\nname = "nope"\n' + DATA + TECHNIQUE, "unknown model 'nope'; registered: demo-cnn, demo-mlp"),
        ('[model]\nfactory = "os:nope"\n' + DATA + TECHNIQUE, "'os' has no attribute 'nope'"),
        (MODEL + 'weights = "missing.pt"\n' + DATA + TECHNIQUE, "weights file"),
        (MODEL + DATA + TECHNIQUE + "colour = 1\n", "unknown key 'colour'"),
        (MODEL + DATA, "no [[technique]] entries"),
        (MODEL + DATA.replace("inputs = 4", "inputs = -1") + TECHNIQUE, "data.inputs=-1 is invalid"),
        (
            MODEL + DATA.replace("inputs = 4", "inputs = 500") + TECHNIQUE,
            "data.inputs=500 is larger than the 40 rows of dataset 'shapes'",
        ),
        (MODEL + DATA + (TECHNIQUE + 'run = "a"\n') * 2, "result gram-spectrum/a exists; choose another run name"),
        (
            'device = "gpu7"\n' + MODEL + DATA + TECHNIQUE,
            "device='gpu7' is invalid: expected 'cpu', 'cuda' or 'cuda:N'",
        ),
    ],
)
def test_run_user_errors(tmp_path: Path, config: str | None, fragment: str) -> None:
    path = tmp_path / "missing.toml" if config is None else write_config(tmp_path, 'out = "res.h5"\n' + config)
    assert_user_error(run_cli("run", str(path)), fragment)
    assert not (tmp_path / "res.h5").exists() and not (tmp_path / "res.h5.partial").exists()


def test_weights_that_do_not_fit_and_unsafe_pickles(tmp_path: Path) -> None:
    torch.save(DemoCNN(width=8, image_size=16).state_dict(), tmp_path / "wide.pt")
    config = write_config(tmp_path, 'out = "res.h5"\n' + MODEL + 'weights = "wide.pt"\n' + DATA + TECHNIQUE)
    assert_user_error(
        run_cli("run", str(config)),
        "do not fit DemoCNN: features.conv1.weight is (8, 3, 3, 3) but the model expects (4, 3, 3, 3)",
    )
    torch.save({"payload": Path("x")}, tmp_path / "pickle.pt")  # not loadable with weights_only=True
    config = write_config(tmp_path, 'out = "res.h5"\n' + MODEL + 'weights = "pickle.pt"\n' + DATA + TECHNIQUE)
    assert_user_error(run_cli("run", str(config)), "cannot load weights")
    assert not (tmp_path / "res.h5").exists()


def test_results_file_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "res.h5", "w") as f:
        f["x"] = [1, 2]
    before = (tmp_path / "res.h5").read_bytes()
    assert_user_error(
        run_cli("run", str(write_config(tmp_path, 'out = "res.h5"\n' + MODEL + DATA + TECHNIQUE))),
        "not a pyengine store",
    )
    assert (tmp_path / "res.h5").read_bytes() == before


def test_capture_and_info_user_errors(tmp_path: Path) -> None:
    args = [
        "capture",
        "--model",
        "demo-cnn",
        "--model-arg",
        "image_size=16",
        "--data",
        "shapes",
        "--data-arg",
        "n=8",
        "--data-arg",
        "size=16",
        "--out",
        str(tmp_path / "a.h5"),
    ]
    assert_user_error(run_cli(*args, "--layers", "features.relu9"), "no layer 'features.relu9'")
    assert_user_error(
        run_cli(*args[:-2], "--out", str(tmp_path / "a.h5"), "--layers", "features.relu1", "--data-arg", "bogus"),
        "--data-arg 'bogus' is invalid: expected KEY=VALUE",
    )
    assert_user_error(
        run_cli(*args, "--layers", "features.relu1", "--model-arg", "depth=3"),
        "model arguments {'image_size': 16, 'depth': 3} rejected",
    )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "foreign.h5").write_bytes(b"not hdf5 at all")
    assert_user_error(run_cli("info", str(tmp_path / "foreign.h5")), "not a readable HDF5 file")
    assert_user_error(run_cli("info", str(tmp_path / "none.h5")), "no such file")
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_plugins_can_add_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from typing import Any

    from pyengine import cli, host

    class CommandPlugin:
        @pyengine.hookimpl
        def register_commands(self, cli: Any) -> None:
            parser = cli.add_parser("hello", help="say hello")
            parser.add_argument("name")
            parser.set_defaults(handler=lambda args: print(f"hello {args.name}") or 0)

    host.load_plugins()
    host.pm.register(CommandPlugin(), name="command-plugin")
    try:
        assert cli.main(["hello", "world"]) == 0
    finally:
        host.pm.unregister(name="command-plugin")
    assert capsys.readouterr().out == "hello world\n"


def test_a_broken_plugin_is_named_not_a_traceback(tmp_path: Path) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pyengine]\nbroken = broken_plugin_module\n")
    (tmp_path / "broken_plugin_module.py").write_text("raise ImportError('needs a library that is missing')\n")
    result = run_cli("plugins", env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(
        result, "plugin 'broken' (broken_plugin_module) failed to import: needs a library that is missing"
    )


def test_run_probes_from_a_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        'out = "res.h5"\n'
        + MODEL
        + DATA.replace("n = 40", "n = 120")
        + '[[technique]]\nname = "probe-neurons"\noptions = { concepts = ["texture=striped"] }\n'
        + '[[technique]]\nname = "probe-linear"\noptions = { concepts = ["colour"], l1 = 0.01 }\n',
    )
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "probe-neurons/run-001: texture=striped: " in result.stdout
    with pyengine.StoreReader(tmp_path / "res.h5") as reader:
        arrays, attrs = reader.result("probe-linear", "run-001")
    assert "weights/features.relu1|colour=red" in arrays
    assert json.loads(attrs["options"])["l1"] == 0.01


def test_ctrl_c_keeps_the_finished_results(tmp_path: Path) -> None:
    """SIGINT while the second technique runs: the first one's result is written, and said so."""
    slow = '[[technique]]\nname = "llc"\noptions = { draws = 100000, burn_in = 0 }\n'
    config = write_config(tmp_path, 'out = "res.h5"\n' + MODEL + DATA + TECHNIQUE + slow)
    with subprocess.Popen(
        [str(BIN / "pyengine"), "-q", "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("gram-spectrum/run-001:"), first
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted; the finished results are in" in stderr and "gram-spectrum/run-001" in stderr
    with pyengine.StoreReader(tmp_path / "res.h5") as reader:
        assert reader.results() == [("gram-spectrum", "run-001")]
