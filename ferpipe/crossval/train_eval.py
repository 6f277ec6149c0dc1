"""Cross-validated training and evaluation of one network type: `ferpipe train-eval`.

For each fold: split by subject, train the five members, predict the test
subjects, score. RUN_DIR receives:

    results.json                 per fold and overall accuracy of each sub-network and the ensemble, macro-F1,
                                 balanced accuracy, recall per class, the spread over folds, wall times
    table.csv, table.md          the run's row of the paper's Table I (accuracy in %)
    metrics.csv, metrics.md      its companion: macro-F1, balanced accuracy, lowest/median/highest fold, recall
    confusion/<name>.png|.csv    confusion matrices summed over folds, per sub-network and the ensemble
    predictions/fold<k>.csv      every test image: true label, each member's and the ensemble's pick, subject metadata
    gradcam/fold<k>.png          where each member looks (Grad-CAM) on a few of the fold's test images
    landmark_study/fold<k>.png   landmarks predicted before and after fine-tuning (the paper's figure 10)
    report.html                  all of it in one self-contained page (ferpipe.crossval.html_report)
    folds/fold<k>/               the fold as stage 5 wrote it (data/, with augmentation.png), each member's
                                 training task output and checkpoint (<slot>/), the prediction step's (prediction/);
                                 a rerun with the same RUN_DIR resumes where it stopped

Every step is the pipeline's own (ferpipe.crossval.steps), so train-eval and
`ferpipe run` train, augment and predict through the same code;
`cross_dataset_eval` is the paper's Table III: train on one dataset, test on
all of another.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from ferpipe.console import progress_bar
from ferpipe.crossval.fold_dataset import write_fold_dataset
from ferpipe.crossval.html_report import manifest_fingerprint, write_report
from ferpipe.crossval.steps import aggregate_folds, predict_fold, train_on_fold, write_json
from ferpipe.data.folds import TRAIN_ONLY, check_trainable, fold_ids, split_fold
from ferpipe.data.manifest import OK, read_manifest
from ferpipe.data.storage import Store, open_store
from ferpipe.errors import UserError
from ferpipe.evaluate.scoring import (
    ENSEMBLE,
    evaluate_cross_dataset,
    results_table,
    save_confusion,
    write_table,
)
from ferpipe.model.ensemble import predict_members
from ferpipe.model.examples import Examples, ExampleSet, class_names, load_examples
from ferpipe.model.profiles import OPTIMISTIC, VALIDATION, Profile, get_profile
from ferpipe.model.stream import chunk_size
from ferpipe.model.training import Progress, ensemble_members, log_progress, train_member

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldData:
    fold: int
    train: Examples
    val: Examples
    test: Examples


def _dataset_store(uri: str | os.PathLike | Store) -> Store:
    """The dataset directory; a path to its manifest.parquet is accepted too."""
    if isinstance(uri, Store):
        return uri
    text = str(uri).rstrip("/")
    if text.endswith(".parquet"):
        text = text.rsplit("/", 1)[0] if "/" in text else "."
    return open_store(text)


def load_fold(dataset_uri, fold: int, profile: str | Profile, seed: int = 0, dataset: str | None = None) -> FoldData:
    """One fold's examples, read from the dataset directory (what a single KFP task needs)."""
    profile = get_profile(profile, dataset)
    store = _dataset_store(dataset_uri)
    manifest = read_manifest(store)
    split = split_fold(manifest, fold, profile.val_fraction, seed)
    classes = class_names(manifest)
    load = lambda rows: load_examples(store, rows, classes, profile.input_size)  # noqa: E731
    return FoldData(fold, load(split.train), load(split.val), load(split.test))


class _TrainingBar:
    """A bar over a run's member trainings, its text the epoch training now (each epoch's line at DEBUG)."""

    def __init__(self, total: int, also: Progress | None):
        self.bar = progress_bar(total=total, unit="member", desc="training")
        self.also = also

    def epoch(self, line: str) -> None:
        log.debug(line)
        self.bar.set_postfix_str(line, refresh=True)
        if self.also is not None:
            self.also(line)

    def member_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def train_eval(
    manifest_uri, network: str, profile: str | Profile, out_dir, seed: int = 0, folds: Sequence[int] | None = None,
    dataset: str | None = None, progress: Progress | None = None, selection: str = VALIDATION,
    expression: str | None = None,
) -> dict:
    """Train and evaluate `network` (baseline, ftl, el) over the folds of a dataset directory; see the module notes.
    `selection` (profiles.SELECTIONS): `test-fold` adds the optimistic figure of the same trainings.
    `expression` (profiles.EXPRESSIONS) replaces the profile's expression phase when given.

    The pipeline's own steps, called in one process: stage 5 writes each fold (`write_fold_dataset`),
    each member trains as a training task would (`train_on_fold`), prediction and aggregation are the
    DAG's (`predict_fold`, `aggregate_folds`). One process keeps TensorFlow's traced steps from member to
    member, which is all it saves over `ferpipe run`; every figure it prints, the DAG gets too.
    """
    started = time.perf_counter()
    profile = get_profile(profile, dataset, expression)
    store = _dataset_store(manifest_uri)
    manifest = read_manifest(store)
    check_trainable(manifest, str(store.uri))
    chosen = list(folds) if folds is not None else fold_ids(manifest)
    unknown = sorted(set(chosen) - set(fold_ids(manifest)))
    if unknown:
        raise UserError(f"folds {unknown} have no test rows; the manifest's folds are {fold_ids(manifest)}")
    out = Path(out_dir)
    usable = manifest[manifest["status"] == OK]
    log.info(f"{network}: {len(usable)} images, classes {', '.join(class_names(manifest))}, folds {chosen}, "
             f"profile {profile.name} ({profile.expression}), selection {selection}")
    members = ensemble_members(network, seed)
    tasks, done = len(chosen) * len(members), 0
    bar = _TrainingBar(tasks, progress)
    predicted, seconds = [], {}
    with logging_redirect_tqdm():
        for fold in chosen:
            fold_started, here = time.perf_counter(), out / "folds" / f"fold{fold}"
            write_fold_dataset(store, fold, profile, str(here / "data"), seed, selection)
            for member in members:
                summary = train_on_fold(str(here / "data"), network, member.slot, profile, str(here / member.slot),
                                        seed, dataset, bar.epoch)
                done += 1
                bar.member_done()
                elapsed = time.perf_counter() - started
                log.info(f"[{done}/{tasks}] fold {fold} {member.name} trained in {summary['wall_seconds']:.1f}s "
                         f"(train {summary['train_images']}, val {summary['val_images']}); elapsed {elapsed:.0f}s, "
                         f"eta {elapsed / done * (tasks - done):.0f}s")
            result = predict_fold(str(here / "data"), network, [str(here / m.slot) for m in members], profile,
                                  str(here / "prediction"), seed, dataset)
            predicted.append(str(here / "prediction"))
            seconds[str(fold)] = {"wall_seconds": round(time.perf_counter() - fold_started, 3), "train_seconds": {
                slot: member["wall_seconds"] for slot, member in result["members"].items()}}
            shown = " ".join(f"{k} {100 * v:.1f}" for k, v in result["accuracy"].items())
            log.info(f"fold {fold}: {result['images']} test images, accuracy % {shown}")
    bar.close()
    results = aggregate_folds(predicted, out, network, profile.name, seed)
    for fold, fold_seconds in seconds.items():  # predict_fold's results carry them; aggregation drops members
        results["folds"][fold].update(fold_seconds)
    results.update(input_size=profile.input_size, dataset_uri=str(store.uri),
                   wall_seconds=round(time.perf_counter() - started, 3))
    write_json(out / "results.json", results)
    run = {"network": network, "profile": profile.name, "expression phase": profile.expression,
           "checkpoint selection": selection, "dataset": dataset or "", "seed": seed,
           "data (preprocessed)": store.uri, "data fingerprint (SHA-256 of the manifest's image hashes)":
           manifest_fingerprint(manifest), "run directory": str(out.absolute())}
    model = {"trained members": f"{out.absolute()}/folds/fold<K>/<slot>/model.weights.h5",
             "registered model": "none: train-eval registers no model (ferpipe run does)"}
    write_report(results, out, dataset=dataset or Path(str(store.uri)).name, run=run, dataset_dir=store, model=model)
    shown = " ".join(f"{k} {100 * v:.2f}" for k, v in results["overall"]["accuracy"].items())
    log.info(f"{network} overall accuracy % {shown}; {results['wall_seconds']:.0f}s; results in {out}")
    if results.get("optimistic"):
        ensemble = results["optimistic"]["overall"]["accuracy"][ENSEMBLE]
        log.info(f"{network} ensemble {100 * ensemble:.2f}% ({OPTIMISTIC}), from the same trainings")
    return results


def cross_dataset_eval(
    train_uri, test_uri, network: str, profile: str | Profile, out_dir, seed: int = 0,
    dataset: str | None = None, progress: Progress = log_progress,
) -> dict:
    """Table III: train the five members on one dataset, score them on every usable image of another.

    The training side is the rows marked always-train (SFEW's Train split)
    when there are any, else every usable row; early stopping's validation
    subjects come from it. Test classes the training set lacks are dropped
    (CK+'s contempt for SFEW-trained members); classes match by name.
    """
    started = time.perf_counter()
    profile = get_profile(profile, dataset)
    train_store, test_store = _dataset_store(train_uri), _dataset_store(test_uri)
    manifest = read_manifest(train_store)
    usable = manifest[manifest["status"] == OK]
    side = usable[usable["fold"] == TRAIN_ONLY] if (usable["fold"] == TRAIN_ONLY).any() else usable
    check_trainable(side, f"the training side of {train_store.uri}")
    classes = class_names(side)
    # A fold number no row has: nothing is tested, validation subjects are drawn from the rest.
    split = split_fold(side, fold=int(side["fold"].max()) + 1, val_fraction=profile.val_fraction, seed=seed)
    train = ExampleSet(train_store, split.train, classes, profile.input_size)
    val = ExampleSet(train_store, split.val, classes, profile.input_size)
    test_manifest = read_manifest(test_store)
    test_rows = test_manifest[test_manifest["status"] == OK]
    kept = test_rows[test_rows["label"].str.lower().isin(classes)]
    test = ExampleSet(test_store, kept, classes, profile.input_size)
    out = Path(out_dir)
    models = []
    for member in ensemble_members(network, seed):
        models.append(train_member(member, train, val, profile, out / "checkpoints" / member.slot, progress).model)
    probabilities = np.concatenate([predict_members(models, chunk.images) for chunk in test.chunks(chunk_size(32))], axis=1)
    result = evaluate_cross_dataset(probabilities, [classes[i] for i in test.labels], classes)
    dropped = test_rows.loc[~test_rows.index.isin(kept.index), "label"].str.lower().value_counts().sort_index()
    result.update(
        network=network, profile=profile.name, train_uri=str(train_store.uri), test_uri=str(test_store.uri),
        train_images=len(train), val_images=len(val), dropped={str(k): int(v) for k, v in dropped.items()},
        wall_seconds=round(time.perf_counter() - started, 3),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_table(results_table({network: result["accuracy"]}), out / "table")
    save_confusion(np.array(result["confusion"][ENSEMBLE]), classes, out / "confusion" / ENSEMBLE,
                   f"{network} ensemble, cross-dataset: {100 * result['accuracy'][ENSEMBLE]:.2f}%")
    write_json(out / "results.json", result)
    log.info(f"{network} cross-dataset accuracy % " + " ".join(f"{k} {100 * v:.2f}" for k, v in result["accuracy"].items()))
    return result
