"""The ``pyengine`` command. User errors print one line on stderr and exit 2.

Under ``torchrun --nproc-per-node N -m pyengine capture|run ...`` every process joins the process
group first (``pyengine.distributed``); rank 0 alone prints, shows progress and writes results.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pyengine import distributed, host
from pyengine.errors import PyengineError
from pyengine.progress import INTERRUPTED, interrupt_at_ticks

USAGE_ERROR = 2
DISTRIBUTED_COMMANDS = ("capture", "run")  # what torchrun may launch over several processes


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``k=v`` pairs; values are TOML literals when they parse (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PyengineError(f"{flag} {pair!r} is invalid: expected KEY=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from pyengine.demo import demo

    failures = demo(args.out, train=args.train, progress=not args.quiet)
    return 1 if failures else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pyengine.api import check_output_path, model_meta, run, stored_result
    from pyengine.config import build_dataset, build_model, load_config
    from pyengine.context import resolve_device
    from pyengine.store import StoreReader, reserve_run_name, write_results

    config = load_config(args.config)
    ranks = distributed.current()
    say = print if ranks.is_main else _silent
    # Everything is checked before anything runs or is written.
    if config.device is not None:
        resolve_device(config.device)
    model = build_model(config.model)
    data = build_dataset(config.data.name, config.data.args) if config.data else None
    parsed = [(spec, host.get_technique(spec.name).options(**spec.options)) for spec in config.techniques]
    if config.data and config.data.store is not None:
        StoreReader(config.data.store).close()
    check_output_path(config.out)

    def reserve() -> list[str]:
        names: list[str] = []
        for spec, _ in parsed:
            taken = {name for (other, _), name in zip(parsed, names) if other.name == spec.name}
            names.append(reserve_run_name(config.out, spec.name, spec.run, taken))
        return names

    run_names = ranks.on_main(reserve)
    given = config.data.inputs if config.data else 0
    if data is not None and given > len(data):
        raise PyengineError(f"data.inputs={given} is larger than the {len(data)} rows of dataset {data.name!r}")
    inputs = data.batch(range(given)).inputs if data is not None and given else None

    pending = []
    try:
        for (spec, options), run_name in zip(parsed, run_names):
            technique = host.get_technique(spec.name)
            # `inputs` go to techniques that explain single inputs; the others analyse the dataset.
            given_inputs = inputs if technique.explains_inputs or technique.needs_inputs else None
            result = run(
                spec.name,
                model,
                given_inputs,
                data=data,
                store=config.data.store if config.data else None,
                device=config.device,
                seed=config.seed,
                progress=not args.quiet,
                **spec.options,
            )
            pending.append(stored_result(spec.name, run_name, options, result))
            say(f"{spec.name}/{run_name}: {result.summary()}")
    except KeyboardInterrupt:
        INTERRUPTED.clear()  # handled here: writing the finished results must not be interrupted by it
        if not pending:
            say("pyengine: interrupted before any technique finished; nothing written", file=sys.stderr)
            return 130
        if ranks.is_main:
            write_results(config.out, pending, meta=model_meta(model))
        done = ", ".join(f"{p.technique}/{p.run}" for p in pending)
        say(f"pyengine: interrupted; the finished results are in {config.out}: {done}", file=sys.stderr)
        return 130
    ranks.on_main(lambda: write_results(config.out, pending, meta=model_meta(model)))
    say(f"wrote {config.out}")
    return 0


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` for the ranks other than 0 of a distributed run: they print nothing."""


def cmd_capture(args: argparse.Namespace) -> int:
    from pyengine.capture import capture
    from pyengine.config import ModelSpec, build_dataset, build_model

    source = {"factory": args.model} if ":" in args.model else {"name": args.model}
    spec = ModelSpec(
        **source, args=_key_values(args.model_arg, "--model-arg"), weights=Path(args.weights) if args.weights else None
    )
    model = build_model(spec)
    data = build_dataset(args.data, _key_values(args.data_arg, "--data-arg"))
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    try:
        path = capture(
            model,
            data,
            layers,
            args.out,
            batch_size=args.batch_size,
            dtype=args.dtype,
            compression=args.compression,
            device=args.device,
            start=args.start,
            stop=args.stop,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"pyengine: interrupted; {args.out}.partial keeps the rows captured so far: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    if distributed.current().is_main:
        print(f"wrote {path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    listing = host.plugin_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for row in listing:
        kind = "built-in" if row["builtin"] else (row["package"] or "plugin")
        things = "; ".join(f"{key}: {', '.join(row[key])}" for key in ("techniques", "models", "datasets") if row[key])
        print(f"{row['name']} ({kind}) {things}")
    return 0


def cmd_techniques(args: argparse.Namespace) -> int:
    found = host.techniques()
    if args.name:
        if args.name not in found:
            raise PyengineError(f"unknown technique {args.name!r}; expected one of {', '.join(found)}")
        found = {args.name: found[args.name]}
    if not args.json:
        for name, technique in found.items():
            print(f"{name}: {technique.summary}")
            for item in technique.Options.describe():
                print(f"    {item.name} = {item.default!r}: {item.doc}")
        return 0
    rows: list[dict[str, Any]] = []
    for name, technique in found.items():
        options = [
            {"name": o.name, "default": json.loads(json.dumps(o.default, default=str)), "doc": o.doc}
            for o in technique.Options.describe()
        ]
        flags = [flag for flag in ("attribution", "explains_inputs") if getattr(technique, flag)]
        rows.append({"name": name, "summary": technique.summary, "flags": flags, "options": options})
    print(json.dumps(rows, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pyengine.store import StoreReader

    with StoreReader(args.file, running_ok=True) as reader:
        info = reader.describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    meta = info["meta"]
    if info["running_pid"] is not None:
        config = meta.get("config", {})
        total = int(config.get("stop", 0)) - int(config.get("start", 0))
        print(
            f"{info['path']}: capture in progress (pid {info['running_pid'] or '?'}): "
            f"{info['rows']} of {total} rows written so far"
        )
    print(
        f"{info['path']}: pyengine store schema {meta.get('schema_version')} (pyengine {meta.get('pyengine_version')})"
    )
    print(f"  model {meta.get('model_class', '?')}  params {str(meta.get('model_param_hash', '?'))[:12]}")
    if "dataset_name" in meta:
        print(f"  dataset {meta['dataset_name']} ({meta.get('dataset_size')} rows), {info['rows']} captured")
    for name, layer in info["layers"].items():
        stored = f"virtual over {len(layer['parts'])} parts" if layer.get("parts") else layer["compression"] or "raw"
        print(f"  /activations/{name}  {tuple(layer['shape'])} {layer['dtype']} {stored}")
    for name, categories in info["concepts"].items():
        print(f"  /concepts/{name}  {', '.join(categories)}")
    for result in info["results"]:
        print(f"  /results/{result}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyengine", description="Interpretability engine for PyTorch models.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("demo", help="demo-cnn on shapes: run every technique, write a report with unit pages")
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument(
        "--train", action="store_true", help="train demo-cnn here (cached) instead of loading the shipped weights"
    )
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("run", help="run techniques from a TOML config")
    p.add_argument("config", help="CONFIG.toml")
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("capture", help="store layer activations over a dataset in HDF5")
    p.add_argument("--model", required=True, help="registered model name or 'module:callable'")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--model-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--data", required=True, help="registered dataset name")
    p.add_argument("--data-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--layers", required=True, help="comma-separated module paths")
    p.add_argument("--out", required=True, help="output .h5")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"])
    p.add_argument("--device")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=cmd_capture)

    p = commands.add_parser("plugins", help="list loaded plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_plugins)

    p = commands.add_parser("techniques", help="list techniques and their options (defaults and docs)")
    p.add_argument("name", nargs="?", help="one technique only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_techniques)

    p = commands.add_parser("info", help="describe an HDF5 store")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)

    host.load_plugins()
    host.pm.hook.register_commands(cli=commands)
    return parser


def _rank_note() -> str:
    """`` (rank 1 of 2)`` in a message from a process of a distributed run other than rank 0."""
    ranks = distributed.current()
    return f" (rank {ranks.rank} of {ranks.world})" if ranks.active and not ranks.is_main else ""


def main(argv: Sequence[str] | None = None) -> int:
    previous = interrupt_at_ticks()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in DISTRIBUTED_COMMANDS:
            distributed.init_from_env()
        return int(args.handler(args) or 0)
    except PyengineError as error:
        print(f"pyengine: error{_rank_note()}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(f"pyengine: error: {error.strerror}: {error.filename}", file=sys.stderr)
        return USAGE_ERROR
    except torch.OutOfMemoryError as error:
        print(f"pyengine: error: out of memory: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyengine: interrupted", file=sys.stderr)
        return 130
    finally:
        INTERRUPTED.clear()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
