"""The pipeline's per-fold steps after augmentation: train one member, predict with five, aggregate.

Each works on directories (what KFP hands a task as artifact paths), so a
task is one call; `ferpipe train-eval` calls the same steps in one process,
so a figure measured one way holds for the other. Training augments online as
the fold dataset's plan says (stage 5, fold_dataset.planned_profile).

When the plan says `test-fold` selection, each training task also watches
the fold's test subjects (training.train_member's `test`) and leaves what the
lowest test loss would have kept (`TEST_SELECTED_FILE`); prediction scores
those picks as the optimistic figure beside the strict one, and aggregation
labels it `OPTIMISTIC` wherever it goes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import keras
import numpy as np
import pandas as pd

from ferpipe.crossval.fold_dataset import load_fold_split, planned_profile, read_fold_info
from ferpipe.data.manifest import read_manifest
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.data.storage import Store, atomic_write, open_store
from ferpipe.data.subject_meta import with_subject_meta
from ferpipe.evaluate.gradcam import gradcam_figure
from ferpipe.evaluate.groups import group_accuracy
from ferpipe.evaluate.landmark_study import combine_studies, landmark_study
from ferpipe.evaluate.scoring import (
    ENSEMBLE,
    combine_folds,
    evaluate_predictions,
    run_metrics_table,
    run_table,
    save_confusion,
    write_table,
)
from ferpipe.model.ensemble import ensemble_predictions, predict_members
from ferpipe.model.examples import Examples, ExampleSet
from ferpipe.model.profiles import FINE_TUNE, OPTIMISTIC, TEST_FOLD, VALIDATION, get_profile
from ferpipe.model.stream import chunk_size
from ferpipe.model.training import (
    LANDMARK_FILE,
    MODEL_FILE,
    EpochHook,
    Progress,
    ensemble_members,
    load_landmark_weights,
    load_member,
    log_progress,
    member_by_slot,
    train_member,
)

MEMBER_FILE = "member.json"
FOLD_RESULT = "fold.json"
GRADCAM_FILE = "gradcam.png"
LANDMARK_STUDY_FILE = "landmark_study.png"
PREDICTIONS_FILE = "predictions.csv"
# The landmark study reads the fold's first test images up to this many (all of a small set's): its errors
# are means, which a few thousand faces pin down, and it keeps the images in memory.
STUDY_IMAGES = 2048
# A member's test-fold pick (test-fold selection only): the test images' ids and its probabilities for them.
TEST_SELECTED_FILE = "test_selected.npz"
# How the optimistic figure is made, for results.json and the reports.
OPTIMISTIC_HOW = ("from the same trainings as the strict figure: each member's last phase kept the epoch with the "
                  "lowest loss on the fold's test subjects, as the authors' notebook selects its checkpoints; "
                  "earlier phases handed on what validation chose")


def _prediction_rows(test: Examples, probabilities: np.ndarray, slots: Sequence[str]) -> pd.DataFrame:
    classes = np.array(test.classes)
    frame = pd.DataFrame({"image_id": test.image_ids, "subject": test.subjects, "label": classes[test.labels]})
    for slot, member in zip(slots, probabilities):
        frame[slot] = classes[member.argmax(axis=-1)]
    frame[ENSEMBLE] = classes[ensemble_predictions(probabilities)]
    summed = probabilities.sum(axis=0)
    for i, name in enumerate(classes):
        frame[f"sum_{name}"] = summed[:, i].round(5)
    return frame


def score_fold(models: Sequence, test: Examples | ExampleSet,
               slots: Sequence[str] = ENSEMBLE_PARTS) -> tuple[dict, pd.DataFrame]:
    """Predict a fold's test images with every member, a chunk of them in memory at a time; the fold's
    scores and per-image rows."""
    started = time.perf_counter()
    if len(test):
        probabilities = np.concatenate([predict_members(models, chunk.images) for chunk in test.chunks(chunk_size(32))],
                                       axis=1)
    else:  # every test image of the fold was rejected upstream
        probabilities = np.zeros((len(models), 0, len(test.classes)), np.float32)
    result = evaluate_predictions(test.labels, probabilities, slots, test.classes)
    result["predict_seconds"] = time.perf_counter() - started
    return result, _prediction_rows(test, probabilities, slots)


def write_reports(results: dict, out_dir) -> None:
    """Table I rows and their companion table, confusion matrices (summed over folds) and results.json for a
    finished run; the optimistic ensemble's confusion matrix too, under a name that says so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overall = results["overall"]
    write_table(run_table(results), out / "table")
    write_table(run_metrics_table(results), out / "metrics")
    for name, matrix in overall["confusion"].items():
        title = f"{results['network']} {name}: {100 * overall['accuracy'][name]:.2f}% of {overall['images']}"
        save_confusion(np.array(matrix), results["classes"], out / "confusion" / name, title)
    if results.get("optimistic"):
        optimistic = results["optimistic"]["overall"]
        title = (f"{results['network']} ensemble, {OPTIMISTIC}:\n"
                 f"{100 * optimistic['accuracy'][ENSEMBLE]:.2f}% of {optimistic['images']}")
        save_confusion(np.array(optimistic["confusion"][ENSEMBLE]), results["classes"],
                       out / "confusion" / f"{ENSEMBLE}-optimistic", title)
    write_json(out / "results.json", results)


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=1))


def run_store(work_uri: str, kfp_run_id: str) -> Store:
    """What one run's tasks share: <work_uri>/<KFP run id>/ (fold results, training checkpoints)."""
    if not kfp_run_id:
        raise ValueError("a KFP run id is needed to keep one run's files apart from another's")
    return open_store(work_uri).child(kfp_run_id)


def train_on_fold(fold_dir: str, network: str, slot: str, profile: str, out_dir: str, seed: int = 0,
                  dataset: str | None = None, progress: Progress = log_progress, checkpoints: Store | None = None,
                  on_epoch: EpochHook | None = None) -> dict:
    """One training task: member `slot` of `network` on a fold dataset; OUT gets the weights and member.json.

    With `checkpoints` (a store of this member's own, member_cache keys it), the member's checkpoint is
    mirrored there after every epoch, so a retried task resumes there. `on_epoch` hears every epoch as it
    ends (live MLflow).
    """
    info = read_fold_info(fold_dir)
    chosen = planned_profile(get_profile(profile, dataset), info)
    train = load_fold_split(fold_dir, "train", chosen.input_size)
    val = load_fold_split(fold_dir, "val", chosen.input_size)
    # The test subjects reach training only under the optimistic protocol, and then only to be watched.
    test = load_fold_split(fold_dir, "test", chosen.input_size) if fold_selection(info) == TEST_FOLD else None
    member = member_by_slot(network, slot, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trained = train_member(member, train, val if len(val) else None, chosen, out / "checkpoint", progress,
                           checkpoints, on_epoch, test if test is not None and len(test) else None)
    trained.model.save_weights(out / MODEL_FILE)
    if (out / "checkpoint" / LANDMARK_FILE).is_file():  # phase 1's landmark network, for the landmark study
        shutil.copyfile(out / "checkpoint" / LANDMARK_FILE, out / LANDMARK_FILE)
    summary = {
        "fold": info["fold"], "network": network, "slot": slot, "part": member.part, "seed": member.seed,
        "profile": chosen.name, "expression": chosen.expression, "selection": fold_selection(info),
        "input_size": chosen.input_size, "classes": info["classes"],
        "train_images": len(train), "val_images": len(val), "wall_seconds": round(time.perf_counter() - started, 3),
        "epochs": {phase: chosen.epochs(phase) for phase in chosen.phases(member.phases)},
        "history": trained.history,
    }
    if trained.test_selected is not None:
        picked = trained.test_selected
        np.savez(out / TEST_SELECTED_FILE, image_ids=np.array(test.image_ids, dtype=str),
                 probabilities=picked["probabilities"])
        summary["test_selected"] = {"phase": picked["phase"], "epoch": picked["epoch"],
                                    "test_loss": round(picked["test_loss"], 6), "label": OPTIMISTIC}
    (out / MEMBER_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def load_trained_members(member_dirs: Sequence[str], network: str, seed: int, classes: int, input_size: int,
                         what: str) -> tuple[list, list, dict]:
    """The five members of `network` from their training tasks' folders, in ensemble order: (members, their
    sub-networks, slot -> (folder, member.json)). `what` names the caller in the error for a missing one."""
    by_slot = {}
    for directory in member_dirs:
        summary = json.loads((Path(directory) / MEMBER_FILE).read_text())
        by_slot[summary["slot"]] = (Path(directory), summary)
    members = ensemble_members(network, seed)
    missing = [m.slot for m in members if m.slot not in by_slot]
    if missing:
        raise ValueError(f"{what}: no trained member for {', '.join(missing)}")
    models = [load_member(m, classes, input_size, by_slot[m.slot][0] / MODEL_FILE) for m in members]
    return members, models, by_slot


def fold_selection(info: dict) -> str:
    """How a fold dataset's members choose their checkpoints (stage 5 records it; older folds were strict)."""
    return info.get("selection", VALIDATION)


def score_test_selected(test: Examples | ExampleSet, members: Sequence, by_slot: dict, fold: int) -> dict:
    """The optimistic figure of a fold: each member's test-fold pick (`TEST_SELECTED_FILE`), scored like the
    strict one, and which epoch each member's pick was."""
    probabilities = []
    for member in members:
        path = by_slot[member.slot][0] / TEST_SELECTED_FILE
        if not len(test):
            probabilities.append(np.zeros((0, len(test.classes)), np.float32))
            continue
        if not path.is_file():
            raise ValueError(f"fold {fold}: member {member.slot} was trained without watching the test fold, so "
                             "test-fold selection has no figure for it (train it again under this plan)")
        with np.load(path) as kept:
            if list(kept["image_ids"]) != list(test.image_ids):
                raise ValueError(f"fold {fold}: member {member.slot}'s test-fold pick is for other test images")
            probabilities.append(kept["probabilities"])
    result = evaluate_predictions(test.labels, np.stack(probabilities), [m.slot for m in members], test.classes)
    result["epochs"] = {m.slot: by_slot[m.slot][1].get("test_selected") for m in members}
    return {"label": OPTIMISTIC, **result}


def predict_fold(fold_dir: str, network: str, member_dirs: Sequence[str], profile: str, out_dir: str,
                 seed: int = 0, dataset: str | None = None) -> dict:
    """The ensemble step: the five members predict the fold's held-out subjects; sum of softmaxes, argmax.
    Under test-fold selection the fold's result also carries the optimistic figure (`score_test_selected`)."""
    chosen = get_profile(profile, dataset)
    info = read_fold_info(fold_dir)
    members, models, by_slot = load_trained_members(member_dirs, network, seed, len(info["classes"]),
                                                    chosen.input_size, f"fold {info['fold']}")
    test = load_fold_split(fold_dir, "test", chosen.input_size)
    result, rows = score_fold(models, test, [m.slot for m in members])
    if fold_selection(info) == TEST_FOLD:
        result["optimistic"] = score_test_selected(test, members, by_slot, info["fold"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_subject_meta(rows, read_manifest(fold_dir)).to_csv(out / PREDICTIONS_FILE, index=False)
    gradcam_figure(models, [m.slot for m in members], test, out / GRADCAM_FILE)
    result["landmark_study"] = landmark_study(
        {m.slot: m.part for m in members},
        {m.slot: load_landmark_weights(by_slot[m.slot][0] / LANDMARK_FILE) for m in members},
        {m.slot: model for m, model in zip(members, models)}, test.take(np.arange(min(len(test), STUDY_IMAGES))),
        out / LANDMARK_STUDY_FILE)
    result = {"fold": info["fold"], "classes": info["classes"], "network": network, "profile": chosen.name,
              "selection": fold_selection(info), "expression": info.get("expression", FINE_TUNE),
              "train_images": info["train_images"], "test_subjects": info["test_subjects"], **result,
              "members": {m.slot: by_slot[m.slot][1] for m in members}}
    (out / FOLD_RESULT).write_text(json.dumps(result, indent=1))
    keras.backend.clear_session()
    return result


def shared_folds(work_uri: str, kfp_run_id: str) -> Store:
    """Where a run's prediction tasks leave their fold results for the aggregation step: one prefix per run."""
    return run_store(work_uri, kfp_run_id).child("folds")


def share_fold_result(prediction_dir: str, work_uri: str, kfp_run_id: str, fold: int) -> None:
    """Copy a prediction task's output under the run's prefix; `fold.json` last, so its presence means complete."""
    source = open_store(prediction_dir)
    target = shared_folds(work_uri, kfp_run_id).child(f"fold{fold}")
    keys = source.list()
    for key in sorted(keys, key=lambda k: k == FOLD_RESULT):
        target.write_bytes(key, source.read_bytes(key))


@contextlib.contextmanager
def gather_fold_results(work_uri: str, kfp_run_id: str, folds: Sequence[int]) -> Iterator[list[str]]:
    """Local folders holding each planned fold's result, as the prediction tasks shared them."""
    shared = shared_folds(work_uri, kfp_run_id)
    missing = [k for k in folds if not shared.exists(f"fold{k}/{FOLD_RESULT}")]
    if missing:
        raise ValueError(f"no result for folds {missing} under {shared.uri}: their prediction tasks did not finish")
    with tempfile.TemporaryDirectory(prefix="ferpipe-folds-") as scratch:
        directories = []
        for k in folds:
            store, local = shared.child(f"fold{k}"), Path(scratch) / f"fold{k}"
            for key in store.list():
                (local / key).parent.mkdir(parents=True, exist_ok=True)
                (local / key).write_bytes(store.read_bytes(key))
            directories.append(str(local))
        yield directories


def aggregate_folds(prediction_dirs: Sequence[str], out_dir: str, network: str, profile: str, seed: int = 0) -> dict:
    """Every fold's result -> results.json, Table I row, confusion matrices summed over folds; each fold's
    Grad-CAM and landmark-study pictures and per-image predictions beside them."""
    by_fold = sorted(((json.loads((Path(d) / FOLD_RESULT).read_text()), Path(d)) for d in prediction_dirs),
                     key=lambda pair: pair[0]["fold"])
    if not by_fold:
        raise ValueError("no fold results to aggregate")
    folds = [fold for fold, _ in by_fold]
    plans = {(f.get("selection", VALIDATION), f.get("expression", FINE_TUNE)) for f in folds}
    if len(plans) > 1:
        raise ValueError(f"the folds were trained under different plans (selection, expression): {sorted(plans)}")
    (selection, expression), = plans
    classes = folds[0]["classes"]
    results = {
        "network": network, "profile": profile, "seed": seed, "classes": classes,
        "selection": selection, "expression": expression,
        "folds": {str(f["fold"]): {k: v for k, v in f.items() if k != "members"} for f in folds},
        "overall": combine_folds(folds, classes),
        "groups": group_accuracy(pooled_predictions([d for _, d in by_fold])),
        "landmark_study": combine_studies([f.get("landmark_study") for f in folds]),
    }
    if selection == TEST_FOLD:
        results["optimistic"] = {"label": OPTIMISTIC, "how": OPTIMISTIC_HOW,
                                 "overall": combine_folds([f["optimistic"] for f in folds], classes)}
    write_reports(results, out_dir)
    # Each fold's pictures beside the tables, where people look first (locally OUT/results).
    for fold, directory in by_fold:
        for name, folder, suffix in ((GRADCAM_FILE, "gradcam", "png"), (LANDMARK_STUDY_FILE, "landmark_study", "png"),
                                     (PREDICTIONS_FILE, "predictions", "csv")):
            if (directory / name).is_file():
                (Path(out_dir) / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(directory / name, Path(out_dir) / folder / f"fold{fold['fold']}.{suffix}")
    return results


def pooled_predictions(prediction_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Every fold's per-image predictions in one frame (`read_predictions`), from the prediction steps' folders."""
    return read_predictions([Path(d) / PREDICTIONS_FILE for d in prediction_dirs
                             if (Path(d) / PREDICTIONS_FILE).is_file()])


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Per-image prediction CSVs in one frame; ids and metadata as text (subject 001 stays 001), empty as None."""
    frames = [pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]) for path in paths]
    frames = [f.astype(object).where(f.notna(), None) for f in frames]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["subject", "label", "ensemble"])
