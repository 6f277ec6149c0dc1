"""Scoring: accuracy of each sub-network and of the ensemble, the figures the field reports beside it, Table I.

A fold's result is a plain dict (JSON-ready). Overall accuracy pools every
test image of every fold (correct / images); the mean of the fold accuracies
is reported beside it because leave-one-subject-out folds differ in size.
Confusion matrices are counts, rows = true class, columns = predicted, summed
over folds.

Accuracy alone hides a model that never predicts a rare class, so every
result also carries, from its confusion matrix, macro-F1, balanced accuracy
(the mean recall over classes) and each class's recall; a cross-validated
result adds the spread over folds (lowest, median, highest), which for a
leave-one-subject-out protocol is the spread over the people tested. Table
I's companion table (`metrics_table`) shows them.

A figure whose checkpoint the test fold chose (the authors' notebook's
protocol, `--selection test-fold`) is labelled `profiles.OPTIMISTIC` wherever
it is shown.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.model.ensemble import ensemble_predictions, member_predictions
from ferpipe.model.profiles import NETWORK_TYPES, OPTIMISTIC

ENSEMBLE = "ensemble"
# Figures whose spread over folds a cross-validated result reports.
SPREAD_FIGURES = ("accuracy", "macro_f1", "balanced_accuracy")
TABLE_COLUMNS = (*ENSEMBLE_PARTS, ENSEMBLE)
TABLE_ROWS = {"baseline": "Baseline", "ftl": "FTL", "el": "EL"}
# The paper's EL ensemble accuracy (%) per dataset (its Table I; DESIGN.md section 5), what a report sets ours beside.
PAPER_EL_ENSEMBLE_ACCURACY = {"ckplus": 97.31, "jaffe": 97.14, "sfew": 44.50}


def accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = np.asarray(true), np.asarray(predicted)
    return float(np.mean(true == predicted)) if len(true) else float("nan")


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def class_scores(matrix, classes: Sequence[str]) -> dict:
    """Macro-F1, balanced accuracy and each class's recall from a confusion matrix (rows true, columns predicted).

    Recall is undefined (None) for a class no test image has, and balanced
    accuracy is the mean recall over the classes that do occur. F1 per class
    is 2 TP / (true + predicted), averaged over the classes that occur as a
    label or as a prediction (scikit-learn's convention): a class the model
    never predicts scores 0, and so drags both figures down where accuracy
    may barely move.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    true, predicted, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    present, seen = true > 0, (true + predicted) > 0
    recall = np.divide(hits, true, out=np.full(len(matrix), np.nan), where=present)
    f1 = np.divide(2 * hits, true + predicted, out=np.full(len(matrix), np.nan), where=seen)
    return {
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "recall": {str(name): None if np.isnan(value) else float(value) for name, value in zip(classes, recall)},
    }


def _with_class_scores(result: dict, classes: Sequence[str]) -> dict:
    """`result` (with confusion matrices per name) plus macro_f1, balanced_accuracy and recall per name."""
    scores = {name: class_scores(matrix, classes) for name, matrix in result["confusion"].items()}
    for figure in ("macro_f1", "balanced_accuracy", "recall"):
        result[figure] = {name: s[figure] for name, s in scores.items()}
    return result


def evaluate_predictions(labels: np.ndarray, member_probabilities: np.ndarray, slots: Sequence[str] = ENSEMBLE_PARTS,
                         classes: Sequence[str] | None = None) -> dict:
    """One fold: per sub-network and ensemble accuracy, correct counts, confusion matrices, macro-F1, balanced
    accuracy and recall per class (keyed by `classes`, the class names; their indices when not given)."""
    labels = np.asarray(labels)
    count = member_probabilities.shape[-1]
    predictions = dict(zip(slots, member_predictions(member_probabilities)))
    predictions[ENSEMBLE] = ensemble_predictions(member_probabilities)
    result = {
        "images": int(len(labels)),
        "accuracy": {name: accuracy(labels, p) for name, p in predictions.items()},
        "correct": {name: int(np.sum(labels == p)) for name, p in predictions.items()},
        "confusion": {name: confusion_matrix(labels, p, count).tolist() for name, p in predictions.items()},
    }
    return _with_class_scores(result, classes if classes is not None else [str(i) for i in range(count)])


def fold_spread(folds: Sequence[dict], figure: str) -> dict:
    """Per name, the lowest, median and highest value of `figure` over the folds that tested anyone, and which
    folds the extremes were (a fold's "fold" entry, else its place in `folds`)."""
    spread = {}
    for name in folds[0][figure]:
        values = [(f[figure][name], f.get("fold", i)) for i, f in enumerate(folds)
                  if f["images"] and f[figure][name] is not None and not np.isnan(f[figure][name])]
        if not values:
            continue
        ordered = sorted(values, key=lambda pair: pair[0])
        spread[name] = {"lowest": float(ordered[0][0]), "median": float(np.median([v for v, _ in values])),
                        "highest": float(ordered[-1][0]), "lowest_fold": ordered[0][1],
                        "highest_fold": ordered[-1][1], "folds": len(values)}
    return spread


def combine_folds(folds: Sequence[dict], classes: Sequence[str]) -> dict:
    """Over folds: pooled accuracy, mean fold accuracy, summed confusion matrices, and from those the pooled
    macro-F1, balanced accuracy and recall per class; and the spread of each fold's figures (`SPREAD_FIGURES`)."""
    names = list(folds[0]["accuracy"])
    images = sum(f["images"] for f in folds)
    correct = {n: sum(f["correct"][n] for f in folds) for n in names}
    combined = {
        "images": images,
        "accuracy": {n: correct[n] / images if images else float("nan") for n in names},
        "mean_fold_accuracy": {n: float(np.nanmean([f["accuracy"][n] for f in folds])) for n in names},
        "correct": correct,
        "confusion": {n: np.sum([f["confusion"][n] for f in folds], axis=0).tolist() for n in names},
    }
    _with_class_scores(combined, classes)
    combined["spread"] = {figure: fold_spread(folds, figure) for figure in SPREAD_FIGURES}
    return combined


def confusion_csv(matrix: np.ndarray, classes: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, np.asarray(matrix)):
        writer.writerow([name, *map(int, row)])
    return out.getvalue()


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], title: str = "") -> bytes:
    """PNG bytes of an annotated confusion matrix (counts; colour = share of the true class)."""
    # The object API with the Agg canvas: no pyplot, no global backend switch, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = 1.6 + 0.7 * len(classes)
    figure = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_confusion(matrix: np.ndarray, classes: Sequence[str], stem: str | Path, title: str = "") -> tuple[Path, Path]:
    """Write STEM.png and STEM.csv; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, csv_path = stem.with_suffix(".png"), stem.with_suffix(".csv")
    png.write_bytes(plot_confusion(matrix, classes, title))
    csv_path.write_text(confusion_csv(matrix, classes))
    return png, csv_path


def results_table(accuracies: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Table I: rows = network types (paper order), columns = eyebrows ... jaw, ensemble; accuracy in %."""
    order = [n for n in NETWORK_TYPES if n in accuracies] + [n for n in accuracies if n not in NETWORK_TYPES]
    frame = pd.DataFrame(
        [[100.0 * accuracies[n].get(c, float("nan")) for c in TABLE_COLUMNS] for n in order],
        index=[TABLE_ROWS.get(n, n) for n in order],
        columns=list(TABLE_COLUMNS),
    )
    frame.index.name = "network"
    return frame


def optimistic_label(row: str) -> str:
    """A table row's name for a figure the test fold selected."""
    return f"{row} ({OPTIMISTIC})"


def run_table(results: dict) -> pd.DataFrame:
    """A cross-validated run's rows of Table I: its network's, and with test-fold selection the optimistic one
    beside it, from the same trainings."""
    network = results["network"]
    table = results_table({network: results["overall"]["accuracy"]})
    optimistic = results.get("optimistic")
    if optimistic:
        marked = results_table({optimistic_label(TABLE_ROWS.get(network, network)): optimistic["overall"]["accuracy"]})
        table = pd.concat([table, marked])
    return table


METRIC_COLUMNS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}
SPREAD_COLUMNS = {"lowest": "lowest fold", "median": "median fold", "highest": "highest fold"}


def metrics_table(overall: Mapping, classes: Sequence[str], names: Sequence[str] | None = None,
                  label: Callable[[str], str] = str) -> pd.DataFrame:
    """Table I's companion, in %: for each sub-network and the ensemble (`names`, default all), accuracy,
    macro-F1 and balanced accuracy pooled over folds, the lowest, median and highest fold accuracy, and the
    recall of each class. `label` names a row from its member's name."""
    names = [n for n in (names or TABLE_COLUMNS) if n in overall["accuracy"]]
    spread = overall.get("spread", {}).get("accuracy", {})
    rows = []
    for name in names:
        row = [overall[key][name] for key in METRIC_COLUMNS]
        row += [spread.get(name, {}).get(key, float("nan")) for key in SPREAD_COLUMNS]
        row += [overall["recall"][name].get(c) for c in classes]
        rows.append([float("nan") if v is None else 100.0 * v for v in row])
    columns = [*METRIC_COLUMNS.values(), *SPREAD_COLUMNS.values(), *(f"recall {c}" for c in classes)]
    frame = pd.DataFrame(rows, index=[label(n) for n in names], columns=columns)
    frame.index.name = "member"
    return frame


def run_metrics_table(results: dict) -> pd.DataFrame:
    """A run's companion table: every member and the ensemble, and the optimistic ensemble when there is one."""
    table = metrics_table(results["overall"], results["classes"])
    optimistic = results.get("optimistic")
    if optimistic:
        table = pd.concat([table, metrics_table(optimistic["overall"], results["classes"], [ENSEMBLE],
                                                optimistic_label)])
    return table


def markdown_table(table: pd.DataFrame, digits: int = 2) -> str:
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for name, row in table.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.{digits}f}" for v in row]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Write STEM.csv and STEM.md."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    table.round(4).to_csv(csv_path)
    md_path.write_text(markdown_table(table))
    return csv_path, md_path


def cross_dataset_labels(train_classes: Sequence[str], test_labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Test label names -> (kept mask, index into train_classes of the kept rows).

    Classes are matched by name; test images of a class the training set lacks
    (CK+'s contempt for an SFEW-trained model) are dropped, as in Table III.
    """
    index = {name: i for i, name in enumerate(train_classes)}
    names = [str(label).lower() for label in test_labels]
    keep = np.array([name in index for name in names], dtype=bool)
    return keep, np.array([index[n] for n, k in zip(names, keep) if k], dtype=np.int64)


def evaluate_cross_dataset(
    member_probabilities: np.ndarray,
    test_labels: Sequence[str],
    train_classes: Sequence[str],
    slots: Sequence[str] = ENSEMBLE_PARTS,
) -> dict:
    """Score members trained on one label set on another dataset's images (all of them, no folds)."""
    if member_probabilities.shape[-1] != len(train_classes):
        raise ValueError(f"{member_probabilities.shape[-1]} probabilities per image, {len(train_classes)} training classes")
    keep, labels = cross_dataset_labels(train_classes, test_labels)
    result = evaluate_predictions(labels, np.asarray(member_probabilities)[:, keep], slots, train_classes)
    dropped = pd.Series([str(l).lower() for l, k in zip(test_labels, keep) if not k], dtype=object)
    result["dropped"] = {str(k): int(v) for k, v in dropped.value_counts().sort_index().items()}
    result["classes"] = list(train_classes)
    return result
