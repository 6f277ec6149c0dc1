"""Scores, confusion matrices, the figures beside accuracy, Table I and its companion, the cross-dataset rule."""

from __future__ import annotations

import numpy as np
import pytest

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.evaluate.scoring import (
    accuracy,
    class_scores,
    combine_folds,
    confusion_matrix,
    cross_dataset_labels,
    evaluate_cross_dataset,
    evaluate_predictions,
    markdown_table,
    metrics_table,
    results_table,
    run_metrics_table,
    run_table,
    save_confusion,
    write_table,
)
from ferpipe.model.profiles import OPTIMISTIC


def one_hot(indices, classes):
    return np.eye(classes)[indices]


def fold_probabilities(labels, member_picks, classes=3):
    """(5, images, classes) probabilities where member m picks member_picks[m] confidently."""
    return np.stack([0.1 + 0.7 * one_hot(p, classes) for p in member_picks])


def test_accuracy_and_confusion():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    m = confusion_matrix([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows true, columns predicted


def test_fold_and_overall_scores():
    labels = np.array([0, 1, 2, 2])
    picks = [[0, 1, 2, 2], [0, 1, 2, 0], [0, 0, 0, 0], [1, 1, 2, 2], [0, 1, 2, 2]]
    fold = evaluate_predictions(labels, fold_probabilities(labels, picks))
    assert list(fold["accuracy"]) == [*ENSEMBLE_PARTS, "ensemble"]
    assert fold["accuracy"]["eyebrows"] == 1.0 and fold["accuracy"]["nose"] == 0.25
    assert fold["accuracy"]["ensemble"] == 1.0
    small = evaluate_predictions(np.array([0]), fold_probabilities([0], [[1]] * 5))
    overall = combine_folds([fold, small], ["a", "b", "c"])
    assert overall["images"] == 5
    assert overall["accuracy"]["ensemble"] == pytest.approx(4 / 5)  # pooled over images
    assert overall["mean_fold_accuracy"]["ensemble"] == pytest.approx(0.5)  # mean of folds
    assert np.sum(overall["confusion"]["ensemble"]) == 5


def test_confusion_files(tmp_path):
    png, csv = save_confusion(np.array([[3, 1], [0, 4]]), ["happy", "neutral"], tmp_path / "c" / "ensemble", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert csv.read_text().splitlines() == ["true \\ predicted,happy,neutral", "happy,3,1", "neutral,0,4"]


def test_table_one_layout(tmp_path):
    table = results_table({
        "el": {**{p: 0.9 for p in ENSEMBLE_PARTS}, "ensemble": 0.97},
        "baseline": {**{p: 0.8 for p in ENSEMBLE_PARTS}, "ensemble": 0.85},
    })
    assert list(table.index) == ["Baseline", "EL"]  # the paper's row order
    assert list(table.columns) == ["eyebrows", "eyes", "nose", "mouth", "jaw", "ensemble"]
    assert table.loc["EL", "ensemble"] == pytest.approx(97.0)
    md = markdown_table(table)
    assert md.splitlines()[0] == "| network | eyebrows | eyes | nose | mouth | jaw | ensemble |"
    assert "| EL | 90.00 | 90.00 | 90.00 | 90.00 | 90.00 | 97.00 |" in md
    csv, md_path = write_table(table, tmp_path / "table")
    assert csv.exists() and md_path.read_text() == md


def test_cross_dataset_maps_by_name_and_drops_unknown_classes():
    train = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")  # SFEW: no contempt
    test = ["happy", "contempt", "Sad", "contempt", "angry"]
    keep, mapped = cross_dataset_labels(train, test)
    assert keep.tolist() == [True, False, True, False, True]
    assert mapped.tolist() == [3, 5, 0]
    probabilities = np.stack([one_hot([3, 0, 5, 1, 0], 7)] * 5)
    result = evaluate_cross_dataset(probabilities, test, train)
    assert result["images"] == 3 and result["accuracy"]["ensemble"] == 1.0
    assert result["dropped"] == {"contempt": 2}
    with pytest.raises(ValueError):
        evaluate_cross_dataset(probabilities[..., :6], test, train)


def test_a_class_the_model_never_predicts_shows_in_macro_f1_balanced_accuracy_and_recall():
    # 10 images: 4 angry, 4 happy, 2 sad; the model never answers sad.
    #            predicted: angry happy sad
    matrix = [[4, 0, 0],   # true angry
              [1, 3, 0],   # true happy
              [1, 1, 0]]   # true sad
    scores = class_scores(matrix, ["angry", "happy", "sad"])
    assert scores["recall"] == {"angry": 1.0, "happy": 0.75, "sad": 0.0}
    assert scores["balanced_accuracy"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    # F1 = 2 TP / (true + predicted): angry 8/10, happy 6/8, sad 0/2.
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.75 + 0.0) / 3)
    labels, picks = np.array([0] * 4 + [1] * 4 + [2] * 2), [0] * 4 + [0, 1, 1, 1] + [0, 1]
    fold = evaluate_predictions(labels, fold_probabilities(labels, [picks] * 5), classes=["angry", "happy", "sad"])
    assert fold["confusion"]["ensemble"] == matrix and fold["accuracy"]["ensemble"] == pytest.approx(0.7)
    assert fold["recall"]["ensemble"]["sad"] == 0.0 and fold["recall"]["jaw"] == scores["recall"]
    assert fold["macro_f1"]["ensemble"] == pytest.approx(scores["macro_f1"])
    assert fold["macro_f1"]["ensemble"] < fold["balanced_accuracy"]["ensemble"] < fold["accuracy"]["ensemble"]


def test_a_class_absent_from_a_fold_has_no_recall_and_counts_in_f1_only_if_predicted():
    scores = class_scores([[2, 1], [0, 0]], ["happy", "neutral"])
    assert scores["recall"] == {"happy": 2 / 3, "neutral": None}
    assert scores["balanced_accuracy"] == pytest.approx(2 / 3)  # over the classes that occur
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)  # neutral was predicted once, wrongly
    assert class_scores([[3, 0], [0, 0]], ["happy", "neutral"])["macro_f1"] == 1.0  # neither true nor predicted


def test_the_spread_over_folds_names_the_lowest_median_and_highest_fold():
    labels = np.array([0, 1, 0, 1])
    folds = []
    for fold, picks in ((3, [0, 1, 0, 1]), (5, [0, 0, 0, 0]), (8, [0, 1, 0, 0])):  # ensemble 100%, 50%, 75%
        folds.append({"fold": fold, **evaluate_predictions(labels, fold_probabilities(labels, [picks] * 5, 2),
                                                           classes=["a", "b"])})
    empty = {"fold": 9, **evaluate_predictions(np.array([], int), np.zeros((5, 0, 2)), classes=["a", "b"])}
    overall = combine_folds([*folds, empty], ["a", "b"])
    spread = overall["spread"]["accuracy"]["ensemble"]
    assert (spread["lowest"], spread["median"], spread["highest"]) == (0.5, 0.75, 1.0)
    assert (spread["lowest_fold"], spread["highest_fold"], spread["folds"]) == (5, 3, 3)  # the empty fold left out
    # Pooled figures come from the summed matrix, not from averaging the folds' figures.
    assert overall["confusion"]["ensemble"] == [[6, 0], [3, 3]]
    assert overall["recall"]["ensemble"] == {"a": 1.0, "b": 0.5}
    assert overall["macro_f1"]["ensemble"] == pytest.approx((12 / 15 + 6 / 9) / 2)
    assert overall["spread"]["balanced_accuracy"]["ensemble"]["lowest"] == 0.5


def test_the_companion_table_and_the_optimistic_row_of_table_one():
    labels = np.array([0, 1, 0, 1])
    fold = {"fold": 0, **evaluate_predictions(labels, fold_probabilities(labels, [[0, 1, 0, 0]] * 5, 2), classes="ab")}
    better = {"fold": 0, **evaluate_predictions(labels, fold_probabilities(labels, [[0, 1, 0, 1]] * 5, 2), classes="ab")}
    results = {"network": "el", "classes": ["a", "b"], "overall": combine_folds([fold], ["a", "b"])}
    table = metrics_table(results["overall"], ["a", "b"])
    assert list(table.index) == [*ENSEMBLE_PARTS, "ensemble"]
    assert list(table.columns) == ["accuracy", "macro-F1", "balanced accuracy", "lowest fold", "median fold",
                                   "highest fold", "recall a", "recall b"]
    assert table.loc["ensemble", "recall b"] == pytest.approx(50.0) and table.loc["ensemble", "accuracy"] == 75.0
    assert list(run_table(results).index) == ["EL"] and OPTIMISTIC not in markdown_table(run_metrics_table(results))
    results["optimistic"] = {"label": OPTIMISTIC, "overall": combine_folds([better], ["a", "b"])}
    rows = run_table(results)
    assert list(rows.index) == ["EL", f"EL ({OPTIMISTIC})"] and rows.iloc[1]["ensemble"] == 100.0
    companion = run_metrics_table(results)
    assert companion.index[-1] == f"ensemble ({OPTIMISTIC})" and companion.iloc[-1]["macro-F1"] == 100.0
    assert f"| EL ({OPTIMISTIC}) | " in markdown_table(rows)
