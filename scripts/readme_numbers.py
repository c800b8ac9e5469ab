"""The README's numbers, from a demo run's results: ``pyengine demo --out DIR`` writes DIR/results.h5.

    python -P scripts/readme_numbers.py faithfulness demo-out/results.h5            # print the table
    python -P scripts/readme_numbers.py faithfulness demo-out/results.h5 --write README.md

``--write`` replaces what stands between ``<!-- numbers: scripts/readme_numbers.py SECTION -->``
and the next ``<!-- /numbers -->`` in that file with the printed Markdown (the markers stay); a
file without the markers, or with the section twice, is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyengine import StoreReader
from pyengine.errors import PyengineError

SCRIPT = "scripts/readme_numbers.py"

# What each technique's defaults are, as the table's first column says (the results store the
# scores, not the attribution techniques' own defaults).
DESCRIPTIONS = {
    "occlusion": "occlusion (8×8 windows, stride 4, channel-mean baseline)",
    "grad-cam": "grad-cam (features.relu3)",
    "integrated-gradients": "integrated-gradients (50 Gauss–Legendre steps, baseline 0)",
    "saliency": "saliency",
    "guided-backprop": "guided-backprop",
    "smoothgrad": "smoothgrad (saliency, 25 samples, 15% noise)",
}


def stored_result(results: Path, technique: str, run: str | None) -> dict[str, Any]:
    """The attributes of ``technique``'s run (the last one stored when ``run`` is None)."""
    with StoreReader(results) as reader:
        runs = [name for kind, name in reader.results() if kind == technique]
        if not runs:
            raise PyengineError(f"{results} holds no {technique} result; expected one written by `pyengine demo`")
        chosen = run if run is not None else sorted(runs)[-1]
        if chosen not in runs:
            raise PyengineError(f"{results} has no {technique} run {chosen!r}; its runs: {', '.join(sorted(runs))}")
        return reader.result(technique, chosen)[1]


def per_technique(attrs: dict[str, Any], key: str) -> dict[str, float]:
    """``{technique: value}`` from the attributes ``key/technique``."""
    prefix = key + "/"
    return {name[len(prefix) :]: float(value) for name, value in attrs.items() if name.startswith(prefix)}


def faithfulness(results: Path, run: str | None = None) -> str:
    """The pointing-game / deletion / insertion table, techniques by pointing game (best first,
    in bold; ties all bold)."""
    attrs = stored_result(results, "faithfulness", run)
    pointing = per_technique(attrs, "pointing")
    deletion = per_technique(attrs, "deletion_auc")
    insertion = per_technique(attrs, "insertion_auc")
    names = sorted(set(pointing) | set(deletion), key=lambda name: (-pointing.get(name, -1.0), name))
    if not names:
        raise PyengineError(f"{results}: the faithfulness result scores no technique")

    best = f"{max(pointing.values()):.3f}" if pointing else ""
    shown = [
        {name: f"**{value:.3f}**" if f"{value:.3f}" == best else f"{value:.3f}" for name, value in pointing.items()},
        {name: f"{value:.3f}" for name, value in deletion.items()},
        {name: f"{value:.3f}" for name, value in insertion.items()},
    ]
    lines = [
        "| technique (defaults) | pointing game | deletion AUC (lower is better) | insertion AUC (higher is better) |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        row = [DESCRIPTIONS.get(name, name), *(column.get(name, "n/a") for column in shown)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


SECTIONS: dict[str, Callable[..., str]] = {"faithfulness": faithfulness}


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the lines between the section's markers replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- numbers: {re.escape(SCRIPT)} {re.escape(section)} -->\n)(.*?)(<!-- /numbers -->)", re.DOTALL
    )
    found = pattern.findall(text)
    if len(found) != 1:
        raise PyengineError(
            f"expected one '<!-- numbers: {SCRIPT} {section} -->' ... '<!-- /numbers -->' block, found {len(found)}"
        )
    return pattern.sub(lambda match: match[1] + body + "\n" + match[3], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("results", type=Path, help="results.h5 of `pyengine demo --out DIR`")
    parser.add_argument("--run", default=None, help="the run to read (default: the last stored)")
    parser.add_argument("--write", type=Path, default=None, help="replace the section's block in this file")
    args = parser.parse_args(argv)
    try:
        body = SECTIONS[args.section](args.results, args.run)
        if args.write is None:
            print(body)
            return 0
        text = args.write.read_text(encoding="utf-8")
        args.write.write_text(replace_section(text, args.section, body), encoding="utf-8")
    except (PyengineError, OSError) as error:
        print(f"readme_numbers: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
