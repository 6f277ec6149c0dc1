"""The aggregate step's publication: results on disk, in MLflow, and as a report for the KFP UI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ferpipe import __version__
from ferpipe.crossval.steps import aggregate_folds
from ferpipe.data.storage import open_store
from ferpipe.evaluate.scoring import ENSEMBLE, markdown_table, results_table

EXPERIMENT = "ferpipe"


@dataclass
class Outcome:
    accuracy: dict[str, float]
    classes: list[str]
    ensemble_confusion: list[list[int]]
    markdown: str
    results: dict
    mlflow_run_id: str = ""


def is_synthetic(data_uri: str) -> bool:
    """True for the demo set `ferpipe demo-data` makes (its params.json names the generator)."""
    try:
        params = json.loads(open_store(data_uri).read_bytes("params.json"))
    except Exception:  # no params.json, or not ours: real data
        return False
    return isinstance(params, dict) and params.get("generator") == "ferpipe.demo.synthetic"


def pipeline_run_identity(dataset: str, network: str, profile: str, data_uri: str, seed: int, kfp_run_id: str,
                          kfp_run_name: str) -> tuple[str, dict, dict]:
    """(run name, tags, params) of the MLflow parent run: the start step creates it, the aggregation completes it."""
    synthetic = is_synthetic(data_uri)
    tags = {"kfp_run_id": kfp_run_id, "kfp_run_name": kfp_run_name, "dataset": dataset, "network": network,
            "profile": profile, "data_uri": data_uri, "synthetic_data": synthetic, "ferpipe_version": __version__}
    params = {"network": network, "profile": profile, "dataset": dataset, "seed": seed}
    return f"{dataset}-{network}-{profile}" + ("-synthetic" if synthetic else ""), tags, params


def markdown_report(results: dict, dataset: str, data_uri: str, synthetic: bool, mlflow_run_id: str = "") -> str:
    overall = results["overall"]
    lines = [
        f"# ferpipe: {results['network'].upper()} on {dataset}" + (" (SYNTHETIC demo data)" if synthetic else ""),
        "",
        f"Data `{data_uri}`, profile `{results['profile']}`, seed {results['seed']}, "
        f"{len(results['folds'])} folds, {overall['images']} test images, classes: {', '.join(results['classes'])}.",
        "",
        "## Accuracy (%), all folds pooled (the paper's Table I layout)",
        "",
        markdown_table(results_table({results["network"]: overall["accuracy"]})),
        "## Per fold",
        "",
        "| fold | test images | " + " | ".join(overall["accuracy"]) + " |",
        "|---:|---:|" + "---:|" * len(overall["accuracy"]),
    ]
    for fold, result in results["folds"].items():
        cells = " | ".join(f"{100 * v:.1f}" for v in result["accuracy"].values())
        lines.append(f"| {fold} | {result['images']} | {cells} |")
    classes = results["classes"]
    lines += ["", "## Ensemble confusion matrix (rows true, columns predicted), summed over folds", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for name, row in zip(classes, overall["confusion"][ENSEMBLE]):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    if mlflow_run_id:
        lines += ["", f"MLflow parent run: `{mlflow_run_id}`"]
    return "\n".join(lines) + "\n"


def publish(prediction_dirs: Sequence[str], out_dir: str, *, network: str, profile: str, dataset: str,
            data_uri: str, seed: int, mlflow_uri: str, experiment: str = EXPERIMENT, kfp_run_id: str = "",
            kfp_run_name: str = "") -> Outcome:
    from ferpipe.model.complexity import complexity_report

    results = aggregate_folds(prediction_dirs, out_dir, network, profile, seed)
    synthetic = is_synthetic(data_uri)
    complexity = complexity_report(len(results["classes"]))
    (Path(out_dir) / "complexity.md").write_text(complexity)
    run_id = ""
    if mlflow_uri:
        from ferpipe.crossval.tracking import log_pipeline_run

        name, tags, params = pipeline_run_identity(dataset, network, profile, data_uri, seed, kfp_run_id,
                                                   kfp_run_name)
        params.update(folds=len(results["folds"]), classes=",".join(results["classes"]))
        run_id = log_pipeline_run(mlflow_uri, experiment, name, results, prediction_dirs, out_dir, params, tags,
                                  complexity)
    markdown = markdown_report(results, dataset, data_uri, synthetic, run_id)
    (Path(out_dir) / "report.md").write_text(markdown)
    if run_id:  # the report names the run, so it joins the run's artifacts once the run exists
        from mlflow import MlflowClient

        MlflowClient(mlflow_uri).log_text(run_id, markdown, "report.md")
    overall = results["overall"]
    return Outcome(overall["accuracy"], results["classes"], overall["confusion"][ENSEMBLE], markdown, results, run_id)
