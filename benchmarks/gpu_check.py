"""gpu-check: build with CUDA, run the CUDA tests and every benchmark on the GPU, one summary table.

On a machine whose python3 sees a CUDA GPU through torch:
  1. build   PYENGINE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps .
             (CMAKE_CUDA_ARCHITECTURES from the GPU, or CUDA_ARCH=; nvcc from PATH, CUDACXX,
             CUDA_HOME or /usr/local/cuda), then checks that the installed pyengine has CUDA kernels
  2. tests   python3 -P -m pytest -m cuda (every test that needs CUDA; conftest.py marks them)
  3. bench   python3 -P benchmarks/<name>.py --device cuda, each under a timeout
and prints one table: step, status (pass / fail / skipped, with the reason), seconds, and each
benchmark's headline lines. Steps whose Python packages are missing (pytest, scikit-learn,
captum) are skipped and say so; nothing is downloaded. The whole run keeps to --budget seconds
(sized for one H200 in under 8 minutes). Exit status 1 when a step failed, else 0.

With no CUDA GPU it prints "no CUDA GPU: gpu-check skipped" and exits 0, building nothing.

    python3 benchmarks/gpu_check.py [--dry-run] [--budget 470] [--python python3]
    PYTHON=/path/to/python3 make gpu-check

--dry-run prints the plan (commands, environment, timeouts, what would be skipped) and runs
nothing but the probe of the interpreter. --rehearse-on-cpu runs the same plan on the CPU with
tiny sizes (PYENGINE_CUDA=AUTO, --device cpu), to try the driver itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, shutil, sys
info = {"executable": sys.executable, "python": ".".join(map(str, sys.version_info[:3])),
        "python_ok": sys.version_info >= (3, 11), "cmake_on_path": shutil.which("cmake")}
names = ["torch", "pip", "pybind11", "scikit_build_core", "cmake", "ninja", "h5py", "pluggy", "numpy",
         "pytest", "sklearn", "captum"]
info["modules"] = {name: importlib.util.find_spec(name) is not None for name in names}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
print(json.dumps(info))
"""

VERIFY = (
    "import json, pyengine, pyengine.ops as ops; "
    'print(json.dumps({"file": pyengine.__file__, "cuda": ops.HAS_CUDA, "info": ops.build_info()}, default=str))'
)

BUILD_NEEDS = ("pip", "pybind11", "scikit_build_core", "h5py", "pluggy", "numpy")


@dataclass
class Step:
    """One command of the plan and, once run, its outcome."""

    name: str
    command: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # Python modules the step imports
    headline: tuple[str, ...] = ()  # regexes: output lines shown in the table
    expect: tuple[str, ...] = ()  # substrings the output must contain (agreement checks)
    skip_reason: str = ""
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    script: str
    gpu_args: tuple[str, ...]  # sized for one H200 inside the budget
    tiny_args: tuple[str, ...]  # --rehearse-on-cpu
    timeout: float
    needs: tuple[str, ...] = ()
    headline: tuple[str, ...] = (r"ratio",)
    expect: tuple[str, ...] = ()


BENCHMARKS = [
    Benchmark(
        "gram.py",
        (),
        ("--rows", "20000", "--dim", "64", "--chunk", "2000", "--repeats", "1"),
        120,
        headline=(r"ratio", r"max relative difference"),
    ),
    Benchmark(
        "probing.py",
        (),
        ("--neurons", "16", "--samples", "2000"),
        150,
        needs=("sklearn",),
        headline=(r"ratio", r"test accuracy"),
    ),
    Benchmark(
        "degeneracy.py",
        (),
        ("--neurons", "256", "--inputs", "2000"),
        240,
        headline=(r"ratio", r"identical agreement", r"^interaction basis"),
        expect=("identical agreement counts: True", "synchronized pair found: True"),
    ),
    Benchmark(
        "attribution.py",
        ("--repeats", "2", "--cases", "vgg64,vgg224,resnet224"),  # demo: trains the demo CNN first
        ("--repeats", "1", "--cases", "vgg64"),
        240,
        needs=("captum",),
        headline=(r"\| (captum|plain|incremental|both) \|",),
    ),
    # the autograd reference syncs per candidate unit (float(...)): 64 inputs took 36 s on 2 CPU cores
    Benchmark("paths.py", ("--inputs", "16"), ("--inputs", "4"), 150, expect=("same paths: True",)),
    Benchmark("topk.py", (), ("--rows", "1000"), 150),
]


def probe(python: str) -> dict[str, Any]:
    """What the interpreter has: version, torch, CUDA, the GPU, importable packages."""
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"cannot run {python}: {error}"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{python} failed the probe: {last}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def visible_gpus() -> list[str]:
    """GPUs nvidia-smi lists (empty without nvidia-smi or a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []


def find_nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.environ.get("CUDACXX"),
        os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def plan(python: str, info: dict[str, Any], rehearse: bool) -> list[Step]:
    """The steps, with their skip reasons decided from the probe."""
    modules: dict[str, bool] = info.get("modules", {})
    device = "cpu" if rehearse else "cuda"
    steps = []

    env = {"PYENGINE_CUDA": "AUTO" if rehearse else "ON"}
    capability = info.get("capability") or [9, 0]
    arch = os.environ.get("CUDA_ARCH") or f"{capability[0]}{capability[1]}"
    if not rehearse:
        env["CMAKE_ARGS"] = " ".join(
            filter(None, [os.environ.get("CMAKE_ARGS", ""), f"-DCMAKE_CUDA_ARCHITECTURES={arch}"])
        )
        nvcc = find_nvcc()
        if nvcc and shutil.which("nvcc") != nvcc:
            env["CUDACXX"] = nvcc
    build = Step(
        "build" if rehearse else f"build (CUDA, sm_{arch})",
        [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-build-isolation", "--no-deps", "."],
        300,
        env,
        needs=BUILD_NEEDS,
    )
    if not rehearse and find_nvcc() is None:
        build.skip_reason = "nvcc not found (PATH, CUDACXX, CUDA_HOME, /usr/local/cuda)"
    if modules and not (modules.get("cmake") or info.get("cmake_on_path")):
        build.skip_reason = build.skip_reason or "no cmake (module or on PATH)"
    steps.append(build)

    steps.append(Step("verify installed pyengine", [python, "-P", "-c", VERIFY], 60))
    steps.append(
        Step(
            "cuda tests (pytest -m cuda)",
            [python, "-P", "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"],
            240,
            needs=("pytest",),
        )
    )
    for bench in BENCHMARKS:
        args = bench.tiny_args if rehearse else bench.gpu_args
        steps.append(
            Step(
                f"bench {bench.script}",
                [python, "-P", f"benchmarks/{bench.script}", "--device", device, *args],
                bench.timeout,
                needs=bench.needs,
                headline=bench.headline,
                expect=bench.expect,
            )
        )
    for step in steps:
        missing = [name for name in step.needs if modules and not modules.get(name)]
        if missing and not step.skip_reason:
            step.skip_reason = f"{', '.join(missing)} not importable"
    if build.skip_reason:
        for step in steps[1:]:
            step.skip_reason = step.skip_reason or "needs the build (skipped)"
    return steps


def run_step(step: Step, deadline: float) -> None:
    """Run one step, echoing its output; kill its process group at the timeout."""
    limit = min(step.timeout, deadline - time.monotonic())
    if limit < 5:
        step.status = "skipped: out of the time budget"
        return
    print(f"\n=== {step.name}: {shlex.join(step.command)}  (timeout {limit:.0f} s)", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        step.command,
        cwd=REPO,
        env={**os.environ, **step.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    chunks: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            chunks.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode: int | None = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        returncode = None
    reader.join(timeout=10)
    step.seconds = time.monotonic() - started
    step.output = "".join(chunks)
    if returncode is None:
        step.status = f"fail: timed out after {limit:.0f} s"
    elif returncode != 0:
        last = next((line for line in reversed(step.output.splitlines()) if line.strip()), "")
        step.status = f"fail: exit {returncode}" + (f": {last.strip()[:70]}" if last else "")
    else:
        step.status = "pass"
    lines = step.output.splitlines()
    context = ""
    for line in lines:
        if line and not line[0].isspace():
            context = line
        if any(re.search(pattern, line.strip()) for pattern in step.headline):
            if line[:1].isspace() and context and context not in step.lines:
                step.lines.append(context)
            step.lines.append(line.rstrip())
    if step.status == "pass":
        missing = [text for text in step.expect if text not in step.output]
        if missing:
            step.status = f"fail: output lacks {missing[0]!r}"


def judge_tests(step: Step, rehearse: bool) -> None:
    """pytest's summary into the status; on a GPU, all-skipped is a failure."""
    summary = next(
        (
            line.strip("= ").strip()
            for line in reversed(step.output.splitlines())
            if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", line)
        ),
        "",
    )
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    step.lines = [f"  {summary}"] if summary else []
    failures = [line.strip() for line in step.output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    step.lines += [f"  {line}" for line in failures[:10]]
    skipped: dict[str, int] = {}
    for n, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", step.output, re.MULTILINE):
        skipped[reason] = skipped.get(reason, 0) + int(n)
    step.lines += [f"  skipped {n}: {reason}" for reason, n in skipped.items()]
    if step.status.startswith("pass"):
        if counts.get("passed", 0) == 0 and not rehearse:
            step.status = "fail: no CUDA test ran (all skipped or none selected)"
        else:
            step.status = f"pass: {counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped"
    elif "exit 5" in step.status:
        step.status = "fail: pytest -m cuda selected no tests"
    elif summary and "timed out" not in step.status:
        step.status = f"fail: {summary}"


def table(steps: list[Step], title: str) -> str:
    width = max(len(step.name) for step in steps) + 2
    rows = [title, f"{'step':{width}s}{'seconds':>8s}  status", "-" * (width + 60)]
    for step in steps:
        status = step.status if not step.skip_reason else f"skipped: {step.skip_reason}"
        seconds = f"{step.seconds:8.1f}" if step.seconds else f"{'-':>8s}"
        rows.append(f"{step.name:{width}s}{seconds}  {status}")
        rows += [f"{'':{width}s}          {line.rstrip()}" for line in step.lines]
    return "\n".join(rows)


def describe(info: dict[str, Any]) -> str:
    if "error" in info:
        return info["error"]
    parts = [f"Python {info.get('python')} ({info.get('executable')})"]
    if "torch" in info:
        parts.append(f"torch {info['torch']} (CUDA {info.get('torch_cuda') or 'none'})")
    else:
        parts.append(f"no torch ({info.get('torch_error', 'not importable')})")
    if info.get("gpu"):
        parts.append(f"{info['gpu']} sm_{''.join(map(str, info['capability']))}")
    missing = [name for name, ok in info.get("modules", {}).items() if not ok]
    parts.append(f"missing: {', '.join(missing) if missing else 'nothing'}")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--python",
        default=os.environ.get("PYTHON") or "python3",
        help="the interpreter with torch+CUDA (default: $PYTHON or python3 from PATH)",
    )
    parser.add_argument("--budget", type=float, default=470, help="seconds for the whole run (default 470)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="run the plan on the CPU, tiny sizes")
    args = parser.parse_args()
    started = time.monotonic()
    found = shutil.which(args.python)
    python = os.path.abspath(found) if found else args.python
    info = probe(python)
    print(f"gpu-check: {describe(info)}", flush=True)

    has_gpu = bool(info.get("cuda_available"))
    if not has_gpu and not (args.dry_run or args.rehearse_on_cpu):
        gpus = visible_gpus()
        if gpus:
            why = info.get("error") or info.get("torch_error") or f"torch {info.get('torch')} sees no CUDA device"
            print(
                f"gpu-check: nvidia-smi lists {gpus[0]}, but {python} cannot use it: {why}. "
                "Point PYTHON= at an interpreter with a CUDA build of torch."
            )
            return 1
        why = (
            info.get("error")
            or info.get("torch_error")
            or (f"torch {info['torch']} sees no CUDA device" if "torch" in info else "torch not importable")
        )
        print(f"no CUDA GPU: gpu-check skipped ({why})")
        return 0
    if not info.get("python_ok", True):
        print(f"gpu-check: pyengine needs Python >= 3.11, {python} is {info.get('python')}")
        return 1

    steps = plan(python, info, args.rehearse_on_cpu)
    if args.dry_run:
        if not has_gpu:
            print(
                "gpu-check --dry-run: no CUDA GPU here, so a real run would stop at the probe; "
                "the plan on a GPU machine (sm_90 unless CUDA_ARCH= or the GPU says otherwise):"
            )
        print(f"gpu-check --dry-run: budget {args.budget:.0f} s; from {REPO}")
        for number, step in enumerate(steps, 1):
            env = " ".join(f"{key}={value!r}" if " " in value else f"{key}={value}" for key, value in step.env.items())
            print(
                f"{number:2d}. {step.name}  [timeout {step.timeout:.0f} s"
                + (f"; needs {', '.join(step.needs)}" if step.needs else "")
                + "]"
            )
            print(f"      {env + ' ' if env else ''}{shlex.join(step.command)}")
            if step.skip_reason:
                print(f"      would skip here: {step.skip_reason}")
        print("    then: one table of step, seconds, status and the benchmarks' headline lines")
        return 0

    deadline = started + args.budget
    build_failed = ""
    for step in steps:
        if build_failed and not step.skip_reason:
            step.skip_reason = f"needs the build ({build_failed})"
        if step.skip_reason:
            if step.name.startswith("build"):
                build_failed = "build skipped"
            continue
        run_step(step, deadline)
        if step.name.startswith("build") and not step.status.startswith("pass"):
            build_failed = "build " + step.status
            if "externally-managed-environment" in step.output:
                step.status += " (set PIP_BREAK_SYSTEM_PACKAGES=1 or use a venv's python)"
        elif step.name.startswith("verify"):
            try:
                found = json.loads(step.output.strip().splitlines()[-1]) if step.status == "pass" else None
            except (ValueError, IndexError):
                step.status, found = "fail: no build information in the output", None
            if found is not None:
                step.lines = [f"  {found['file']}", f"  {found['info']}"]
                if not found["cuda"] and not args.rehearse_on_cpu:
                    step.status = "fail: the installed pyengine has no CUDA kernels (ops.HAS_CUDA is False)"
                if str(REPO / "pyengine") in found["file"]:
                    step.status = "fail: imported the source tree, not the installed package"
            if not step.status.startswith("pass"):
                build_failed = "verify " + step.status
        elif step.name.startswith("cuda tests"):
            judge_tests(step, args.rehearse_on_cpu)

    where = info.get("gpu") or "CPU rehearsal"
    title = (
        f"gpu-check summary: {where}, torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
        f"Python {info.get('python')}; {time.monotonic() - started:.0f} s in all"
    )
    print("\n" + table(steps, title))
    failed = [step for step in steps if step.status.startswith("fail") and not step.skip_reason]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
