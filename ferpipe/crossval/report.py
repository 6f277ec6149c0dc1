"""The aggregate step's publication: results on disk, in MLflow, and as reports for the KFP UI.

Two reports: report.md (a short Markdown summary, KFP's Markdown viewer) and
report.html (everything, self-contained: ferpipe.crossval.html_report). Both
name the MLflow run, so they are written once the run exists and then logged
into it, with the metrics a run comparison needs beside the Table I ones:
macro-F1, balanced accuracy, recall per class, the spread over folds,
accuracy per group of people and the landmark study's errors.

A run under test-fold selection carries a second, optimistic figure from the
same trainings. It is labelled `OPTIMISTIC` in every table and report, its
MLflow metrics sit under `optimistic/`, and the parent run's tags and name say
so, so nobody mistakes it for the strict figure.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ferpipe import __version__
from ferpipe.crossval.html_report import MISSES_FILE, write_report
from ferpipe.crossval.steps import aggregate_folds
from ferpipe.data.storage import open_store
from ferpipe.evaluate.scoring import (
    ENSEMBLE,
    SPREAD_FIGURES,
    markdown_table,
    run_metrics_table,
    run_table,
)
from ferpipe.model.profiles import FINE_TUNE, OPTIMISTIC, TEST_FOLD, VALIDATION

EXPERIMENT = "ferpipe"


@dataclass
class Outcome:
    accuracy: dict[str, float]
    classes: list[str]
    ensemble_confusion: list[list[int]]
    markdown: str
    results: dict
    mlflow_run_id: str = ""
    html_path: str = ""


def is_synthetic(data_uri: str) -> bool:
    """True for the demo set `ferpipe demo-data` makes (its params.json names the generator)."""
    try:
        params = json.loads(open_store(data_uri).read_bytes("params.json"))
    except Exception:  # no params.json, or not ours: real data
        return False
    return isinstance(params, dict) and params.get("generator") == "ferpipe.demo.synthetic"


OPTIMISTIC_TAG = "optimistic"  # the parent run's tag under test-fold selection; its value is the label itself


def pipeline_run_identity(dataset: str, network: str, profile: str, data_uri: str, seed: int, kfp_run_id: str,
                          kfp_run_name: str, selection: str = VALIDATION, expression: str = "",
                          now: float | None = None) -> tuple[str, dict, dict]:
    """(run name, tags, params) of the MLflow parent run: the start step creates it, the aggregation completes it.

    `expression` is '' for the profile's own. The name says what ran; a run without a KFP name, which is every
    run a recurring run starts (the backend creates them without a display name: pipelines/backend.py), also
    says when it started, so a schedule's nightly runs read apart in MLflow's list, and is tagged `scheduled`.
    """
    synthetic = is_synthetic(data_uri)
    tags = {"kfp_run_id": kfp_run_id, "kfp_run_name": kfp_run_name, "dataset": dataset, "network": network,
            "profile": profile, "data_uri": data_uri, "synthetic_data": synthetic, "ferpipe_version": __version__,
            "selection": selection}
    if selection == TEST_FOLD:
        tags[OPTIMISTIC_TAG] = OPTIMISTIC
    params = {"network": network, "profile": profile, "dataset": dataset, "seed": seed, "selection": selection}
    if expression:
        tags["expression"] = params["expression"] = expression
    name = f"{dataset}-{network}-{profile}" + (f"-{expression}" if expression else "")
    name += ("-synthetic" if synthetic else "") + ("-optimistic" if selection == TEST_FOLD else "")
    if not kfp_run_name:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() if now is None else now))
        name, tags["scheduled"] = f"{name} scheduled {started}", True
    return name, tags, params


def optimistic_note(results: dict) -> str:
    """One paragraph saying what the optimistic figure is; '' for a strict run."""
    optimistic = results.get("optimistic")
    if not optimistic:
        return ""
    return (f"Checkpoint selection `{results['selection']}`: rows marked \"{OPTIMISTIC}\" are {optimistic['how']}. "
            "They show what the paper's protocol reports, not how the method does on people it has not seen; "
            "the unmarked rows are the strict figures (validation subjects drawn from the training side). "
            "A run like this is never registered as a model.")


def _fold_rows(folds: dict, names: list[str], key: str = "accuracy") -> list[str]:
    """A fold table's rows (%, one decimal), then the lowest, median and highest fold."""
    lines = []
    for fold, result in folds.items():
        cells = " | ".join("" if result[key][n] is None else f"{100 * result[key][n]:.1f}" for n in names)
        lines.append(f"| {fold} | {result['images']} | {cells} |")
    return lines


def _spread_rows(spread: dict, names: list[str]) -> list[str]:
    return [f"| **{which} fold** | | " + " | ".join(f"{100 * spread[n][which]:.1f}" if n in spread else ""
                                                  for n in names) + " |"
            for which in ("lowest", "median", "highest")]


def markdown_report(results: dict, dataset: str, data_uri: str, synthetic: bool, mlflow_run_id: str = "") -> str:
    overall = results["overall"]
    names = list(overall["accuracy"])
    note = optimistic_note(results)
    lines = [
        f"# ferpipe: {results['network'].upper()} on {dataset}" + (" (SYNTHETIC demo data)" if synthetic else ""),
        "",
        f"Data `{data_uri}`, profile `{results['profile']}` (expression phase "
        f"{results.get('expression', FINE_TUNE)}), checkpoint selection {results.get('selection', VALIDATION)}, "
        f"seed {results['seed']}, {len(results['folds'])} folds, {overall['images']} test images, "
        f"classes: {', '.join(results['classes'])}.",
        *(["", note] if note else []),
        "",
        "## Accuracy (%), all folds pooled (the paper's Table I layout)",
        "",
        markdown_table(run_table(results)),
        "## Beside accuracy (%): macro-F1, balanced accuracy, the spread over folds, recall per class",
        "",
        markdown_table(run_metrics_table(results)),
        "## Per fold" + (" (each fold one subject: the spread over people)" if _folds_are_subjects(results) else ""),
        "",
        "| fold | test images | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
        *_fold_rows(results["folds"], names),
        *_spread_rows(overall["spread"]["accuracy"], names),
    ]
    if results.get("optimistic"):
        optimistic = {k: f["optimistic"] for k, f in results["folds"].items()}
        lines += ["", f"## Per fold, {OPTIMISTIC}", "", "| fold | test images | " + " | ".join(names) + " |",
                  "|---:|---:|" + "---:|" * len(names), *_fold_rows(optimistic, names),
                  *_spread_rows(results["optimistic"]["overall"]["spread"]["accuracy"], names)]
    classes = results["classes"]
    lines += ["", "## Ensemble confusion matrix (rows true, columns predicted), summed over folds", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for name, row in zip(classes, overall["confusion"][ENSEMBLE]):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    lines += _groups_markdown(results.get("groups")) + _study_markdown(results.get("landmark_study"))
    lines += ["", "The whole run, pictures included: report.html beside this file."]
    if mlflow_run_id:
        lines += ["", f"MLflow parent run: `{mlflow_run_id}`"]
    return "\n".join(lines) + "\n"


def _folds_are_subjects(results: dict) -> bool:
    """True when every fold tested one person (leave-one-subject-out): the fold spread is then per subject."""
    return all(len(f.get("test_subjects", ())) == 1 for f in results["folds"].values())


def _groups_markdown(groups: dict | None) -> list[str]:
    if not groups or not groups.get("attributes"):
        return []
    lines = ["", f"## Ensemble accuracy per group (95% Wilson interval; under {groups['min_images']} images: too few "
             "to say)", "", "| attribute | group | images | accuracy % | interval % | |", "|---|---|---:|---:|---:|---|"]
    for attribute, entries in groups["attributes"].items():
        for g in entries:
            if g["accuracy"] is None:
                lines.append(f"| {attribute} | {g['group']} | {g['images']} | {g['verdict']} | | |")
            else:
                flag = "**below overall**" if g["verdict"] == "below overall" else ""
                lines.append(f"| {attribute} | {g['group']} | {g['images']} | {100 * g['accuracy']:.1f} | "
                             f"{100 * g['low']:.1f}-{100 * g['high']:.1f} | {flag} |")
    return lines


def _study_markdown(study: dict | None) -> list[str]:
    if not study:
        return []
    lines = ["", "## Landmark study: mean absolute error, % of the crop (phase 1's head, before/after fine-tuning)",
             "", "| member | before | after | mean face |", "|---|---:|---:|---:|"]
    for slot, m in study["members"].items():
        lines.append(f"| {slot} | {100 * m['before']:.2f} | {100 * m['after']:.2f} | {100 * m['mean_face']:.2f} |")
    return lines


def _metric_name(text: str) -> str:
    """MLflow accepts letters, digits, _ - . space and / in metric names ("65+" is not)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def _figures(overall: dict, classes: list[str], prefix: str = "") -> dict[str, float]:
    """Macro-F1, balanced accuracy, recall per class and the fold spread of one overall result, as flat metrics."""
    metrics = {}
    for figure in ("macro_f1", "balanced_accuracy"):
        metrics.update({f"{prefix}{figure}/{name}": v for name, v in overall[figure].items()})
    for name, recall in overall["recall"].items():
        metrics.update({f"{prefix}recall/{name}/{_metric_name(c)}": recall.get(c) for c in classes})
    for figure in SPREAD_FIGURES:
        for name, spread in overall["spread"][figure].items():
            metrics.update({f"{prefix}fold_{figure}_{which}/{name}": spread[which]
                            for which in ("lowest", "median", "highest")})
    return metrics


def result_metrics(results: dict) -> dict[str, float]:
    """The figures beside accuracy as flat MLflow metrics; the optimistic ones, with their accuracies, under
    `optimistic/`."""
    metrics = _figures(results["overall"], results["classes"])
    optimistic = results.get("optimistic")
    if optimistic:
        metrics.update({f"optimistic/accuracy/{k}": v for k, v in optimistic["overall"]["accuracy"].items()})
        metrics.update(_figures(optimistic["overall"], results["classes"], "optimistic/"))
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def study_metrics(results: dict) -> dict[str, float]:
    """Accuracy per group and the landmark study's errors as flat MLflow metrics."""
    metrics = {}
    for attribute, entries in (results.get("groups") or {}).get("attributes", {}).items():
        for g in entries:
            name = _metric_name(f"{attribute}/{g['group']}")
            metrics[f"group_images/{name}"] = g["images"]
            if g["accuracy"] is not None:  # too few to say: no number, here either
                metrics[f"group_accuracy/{name}"] = g["accuracy"]
                metrics[f"group_accuracy_low95/{name}"] = g["low"]
    for slot, m in ((results.get("landmark_study") or {}).get("members") or {}).items():
        for key in ("before", "after", "mean_face"):
            metrics[f"landmark_error_{key}/{slot}"] = m[key]
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def mlflow_location(mlflow_uri: str) -> str:
    """The tracking URI without any user:password part, fit to print in a report."""
    return re.sub(r"//[^/@]*@", "//", mlflow_uri)


def registered_name(dataset: str, network: str) -> str:
    """The Model Registry name of a pipeline's final model (ferpipe.serving.registry registers it)."""
    return f"ferpipe-{dataset}-{network}"


def publish(prediction_dirs: Sequence[str], out_dir: str, *, network: str, profile: str, dataset: str,
            data_uri: str, seed: int, mlflow_uri: str, experiment: str = EXPERIMENT, kfp_run_id: str = "",
            kfp_run_name: str = "", fingerprint: str = "", dataset_dir: str = "", expression: str = "") -> Outcome:
    """Aggregate the folds, log to MLflow, write report.md and report.html (data quality from `dataset_dir`).
    `expression` is the DAG's parameter ('' for the profile's own), for the parent run's name and tags."""
    from ferpipe.model.complexity import complexity_report

    results = aggregate_folds(prediction_dirs, out_dir, network, profile, seed)
    synthetic = is_synthetic(data_uri)
    complexity = complexity_report(len(results["classes"]))
    (Path(out_dir) / "complexity.md").write_text(complexity)
    run_id = ""
    if mlflow_uri:
        from ferpipe.crossval.tracking import log_pipeline_run

        name, tags, params = pipeline_run_identity(dataset, network, profile, data_uri, seed, kfp_run_id,
                                                   kfp_run_name, results["selection"], expression)
        params.update(folds=len(results["folds"]), classes=",".join(results["classes"]))
        run_id = log_pipeline_run(mlflow_uri, experiment, name, results, prediction_dirs, out_dir, params, tags,
                                  complexity)
    markdown = markdown_report(results, dataset, data_uri, synthetic, run_id)
    (Path(out_dir) / "report.md").write_text(markdown)
    run = {"network": network, "profile": profile, "expression phase": results["expression"],
           "checkpoint selection": results["selection"], "dataset": dataset, "seed": seed, "data": data_uri,
           "data fingerprint (SHA-256 of the raw files)": fingerprint, "KFP run": kfp_run_id,
           "KFP run name": kfp_run_name, "MLflow run": run_id, "ferpipe": __version__}
    model = {}
    if run_id:
        where = f"{mlflow_location(mlflow_uri)}, experiment {experiment}"
        registered = (f"{registered_name(dataset, network)} in the MLflow Model Registry, a new version per run, "
                      "when the pipeline's final-model step runs (it trains on all subjects after this report; "
                      "alias 'champion' when no worse than the last)")
        if results["selection"] == TEST_FOLD:
            registered = f"none: a run under test-fold selection trains no final model and registers nothing ({OPTIMISTIC})"
        model = {"MLflow parent run": f"{run_id} ({where})",
                 "trained members": "the parent run's nested runs 'fold K SLOT', artifact 'model' (Keras weights)",
                 "registered model": registered}
    html_path = write_report(results, out_dir, dataset=dataset, run=run, dataset_dir=dataset_dir or None,
                             model=model, synthetic=synthetic)
    if run_id:  # the reports name the run, so they join the run's artifacts once the run exists
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(mlflow_uri)
        client.log_text(run_id, markdown, "report.md")
        client.log_artifact(run_id, str(html_path))
        if (Path(out_dir) / MISSES_FILE).is_file():  # drawn with the page, after the reports were logged
            client.log_artifact(run_id, str(Path(out_dir) / MISSES_FILE))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in {**result_metrics(results), **study_metrics(results)}.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
    overall = results["overall"]
    return Outcome(overall["accuracy"], results["classes"], overall["confusion"][ENSEMBLE], markdown, results, run_id,
                   str(html_path))
