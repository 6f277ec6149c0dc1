"""Scoring: accuracy of each sub-network and of the ensemble, confusion matrices, Table I.

A fold's result is a plain dict (JSON-ready). Overall accuracy pools every
test image of every fold (correct / images); the mean of the fold accuracies
is reported beside it because leave-one-subject-out folds differ in size.
Confusion matrices are counts, rows = true class, columns = predicted, summed
over folds.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.model.ensemble import ensemble_predictions, member_predictions
from ferpipe.model.profiles import NETWORK_TYPES

ENSEMBLE = "ensemble"
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


def evaluate_predictions(labels: np.ndarray, member_probabilities: np.ndarray, slots: Sequence[str] = ENSEMBLE_PARTS) -> dict:
    """One fold: per sub-network and ensemble accuracy, correct counts and confusion matrices."""
    labels = np.asarray(labels)
    classes = member_probabilities.shape[-1]
    predictions = dict(zip(slots, member_predictions(member_probabilities)))
    predictions[ENSEMBLE] = ensemble_predictions(member_probabilities)
    return {
        "images": int(len(labels)),
        "accuracy": {name: accuracy(labels, p) for name, p in predictions.items()},
        "correct": {name: int(np.sum(labels == p)) for name, p in predictions.items()},
        "confusion": {name: confusion_matrix(labels, p, classes).tolist() for name, p in predictions.items()},
    }


def combine_folds(folds: Sequence[dict]) -> dict:
    """Pooled accuracy, mean fold accuracy and summed confusion matrices over folds."""
    names = list(folds[0]["accuracy"])
    images = sum(f["images"] for f in folds)
    correct = {n: sum(f["correct"][n] for f in folds) for n in names}
    return {
        "images": images,
        "accuracy": {n: correct[n] / images if images else float("nan") for n in names},
        "mean_fold_accuracy": {n: float(np.nanmean([f["accuracy"][n] for f in folds])) for n in names},
        "correct": correct,
        "confusion": {n: np.sum([f["confusion"][n] for f in folds], axis=0).tolist() for n in names},
    }


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
    result = evaluate_predictions(labels, np.asarray(member_probabilities)[:, keep], slots)
    dropped = pd.Series([str(l).lower() for l, k in zip(test_labels, keep) if not k], dtype=object)
    result["dropped"] = {str(k): int(v) for k, v in dropped.value_counts().sort_index().items()}
    result["classes"] = list(train_classes)
    return result
