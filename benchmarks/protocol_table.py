"""Print the protocol table of docs/measurements.md from finished runs: strict beside optimistic, and more.

    .venv/bin/python benchmarks/protocol_table.py runs/london-el runs/london-baseline ... [--split 5]

Each argument is a run's output: `ferpipe run --out` (its results/results.json) or `ferpipe train-eval --out`
(its results.json); `NAME=DIR` names a row. For every run, the ensemble's pooled accuracy, macro-F1 and
balanced accuracy, the lowest/median/highest fold accuracy, strict and (under `--selection test-fold`)
optimistic, and the gap between them. `--split K` adds the pooled accuracy of folds below K and of the rest:
a setting chosen on the first part is confirmed on the second (docs/measurements.md tunes that way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENSEMBLE = "ensemble"


def load(directory: Path) -> dict:
    for candidate in (directory / "results" / "results.json", directory / "results.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    sys.exit(f"no results.json under {directory}")


def pooled(folds: dict, keep) -> str:
    """correct/images and % of the ensemble over the folds `keep` accepts."""
    chosen = [f for k, f in folds.items() if keep(int(k))]
    images = sum(f["images"] for f in chosen)
    correct = sum(f["correct"][ENSEMBLE] for f in chosen)
    return f"{correct}/{images} ({100 * correct / images:.1f})" if images else "—"


def figures(overall: dict) -> list[str]:
    spread = overall["spread"]["accuracy"][ENSEMBLE]
    return [f"{100 * overall['accuracy'][ENSEMBLE]:.2f}", f"{100 * overall['macro_f1'][ENSEMBLE]:.2f}",
            f"{100 * overall['balanced_accuracy'][ENSEMBLE]:.2f}",
            f"{100 * spread['lowest']:.0f} / {100 * spread['median']:.0f} / {100 * spread['highest']:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run output folders, optionally NAME=DIR")
    parser.add_argument("--split", type=int, default=None, help="also pool folds < K and folds >= K")
    args = parser.parse_args()
    header = ["run", "network", "expression", "selection", "accuracy", "macro-F1", "balanced acc.",
              "folds low / median / high"]
    if args.split is not None:
        header += [f"folds 0-{args.split - 1}", f"folds {args.split}+"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|")
    for spec in args.runs:
        name, _, where = spec.rpartition("=")
        results = load(Path(where))
        name = name or Path(where).name
        rows = [("strict (validation subjects)", results["overall"], results["folds"])]
        if results.get("optimistic"):
            optimistic_folds = {k: f["optimistic"] for k, f in results["folds"].items()}
            rows.append((f"**{results['optimistic']['label']}**", results["optimistic"]["overall"], optimistic_folds))
        # The baseline has one phase (direct): no expression phase to choose.
        expression = "direct" if results["network"] == "baseline" else results.get("expression", "fine-tune")
        for selection, overall, folds in rows:
            cells = [name, results["network"].upper(), expression, selection,
                     *figures(overall)]
            if args.split is not None:
                cells += [pooled(folds, lambda k: k < args.split), pooled(folds, lambda k: k >= args.split)]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
