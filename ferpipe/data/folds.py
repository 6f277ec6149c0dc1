"""Subject-independent cross-validation: which rows are tested in which fold.

The manifest's `fold` column says in which fold a row sits on the *test*
side; -1 means it is never tested (SFEW's Train split). A subject's rows always
share one fold, so nobody is on both sides. The validation set that early
stopping watches is drawn from the training subjects, never the test fold.

Big datasets come with their own split (RAF-DB, AffectNet, FER-2013: the
`split` protocol): the test split is fold 0, the training split always trains
(-1) and the validation split is -3, `VALIDATION_ONLY`: never trained on, never
tested, and the validation set of every fold, so early stopping watches the
dataset's own validation images and nothing is drawn. k-fold cross-validation
of 50 members is the right protocol for 200 images and the wrong one for
400,000; there each member trains once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ferpipe.data.manifest import OK
from ferpipe.errors import UserError

TRAIN_ONLY = -1
VALIDATION_ONLY = -3  # the dataset's own validation split (-2 is the final model's fold, crossval.fold_dataset)
# How datasets name their splits, and the side each is on.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "publictest": "val", "test": "test", "testing": "test", "privatetest": "test"}


def assign_round_robin(subjects: pd.Series, n_folds: int) -> pd.Series:
    """Subjects sorted ascending, fold i takes subjects i, i+n, i+2n, ... (the CK+ protocol)."""
    ordered = sorted(subjects.unique())
    fold_of = {subject: i % n_folds for i, subject in enumerate(ordered)}
    return subjects.map(fold_of).astype("int32")


def assign_leave_one_subject_out(subjects: pd.Series) -> pd.Series:
    """One fold per subject (the JAFFE protocol)."""
    return assign_round_robin(subjects, max(1, subjects.nunique()))


def assign_train_val(splits: pd.Series) -> pd.Series:
    """SFEW: train on Train, report on Val, as one fold (0) with Train always training."""
    return pd.Series(np.where(splits.str.lower() == "val", 0, TRAIN_ONLY), index=splits.index, dtype="int32")


def assign_dataset_split(splits: pd.Series) -> pd.Series:
    """The dataset's own split: test -> fold 0, validation -> VALIDATION_ONLY, train (and anything else) -> TRAIN_ONLY.

    A row whose split the adapter could not name is a reject already (its status says why), so where it
    would sit does not matter; training is the side that never reports a figure.
    """
    sides = splits.fillna("").str.lower().map(SPLIT_NAMES)
    folds = np.select([sides == "test", sides == "val"], [0, VALIDATION_ONLY], TRAIN_ONLY)
    return pd.Series(folds, index=splits.index, dtype="int32")


def assign_folds(manifest: pd.DataFrame, protocol: str, n_folds: int = 10) -> pd.Series:
    if protocol == "split":
        return assign_dataset_split(manifest["split"])
    if protocol == "kfold":
        return assign_round_robin(manifest["subject"], n_folds)
    if protocol == "loso":
        return assign_leave_one_subject_out(manifest["subject"])
    if protocol == "train_val":
        return assign_train_val(manifest["split"].fillna(""))
    raise ValueError(f"unknown fold protocol {protocol!r}")


@dataclass(frozen=True)
class FoldSplit:
    fold: int
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def fold_ids(manifest: pd.DataFrame) -> list[int]:
    """The folds that have a test side, ascending."""
    folds = manifest["fold"].dropna().astype(int)
    return sorted(folds[folds >= 0].unique().tolist())


def has_validation_split(manifest: pd.DataFrame) -> bool:
    """Whether the dataset names its own validation images (the `split` protocol)."""
    return bool((manifest["fold"] == VALIDATION_ONLY).any())


def split_fold(manifest: pd.DataFrame, fold: int, val_fraction: float = 0.15, seed: int = 0) -> FoldSplit:
    """Train/validation/test rows (status ok only) for one fold, split by subject.

    Where the dataset names its validation split, that is the validation side and nothing is drawn.
    """
    usable = manifest[manifest["status"] == OK]
    test = usable[usable["fold"] == fold]
    if has_validation_split(manifest):
        val = usable[usable["fold"] == VALIDATION_ONLY]
        train = usable[(usable["fold"] != fold) & (usable["fold"] != VALIDATION_ONLY)]
        return FoldSplit(fold=fold, train=train, val=val, test=test)
    rest = usable[usable["fold"] != fold]
    subjects = np.array(sorted(rest["subject"].unique()))
    rng = np.random.default_rng([seed, fold])
    n_val = int(round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(subjects) > 1 else 0), len(subjects) - 1)
    val_subjects = set(rng.choice(subjects, size=n_val, replace=False).tolist()) if n_val else set()
    in_val = rest["subject"].isin(val_subjects)
    return FoldSplit(fold=fold, train=rest[~in_val], val=rest[in_val], test=test)


def check_trainable(manifest: pd.DataFrame, what: str = "the manifest") -> None:
    """A UserError unless the usable rows hold two classes and two subjects: one class scores 100% by
    construction, and one subject cannot be on both sides of a subject-independent split."""
    usable = manifest[manifest["status"] == OK]
    classes, subjects = sorted(usable["label"].dropna().unique()), usable["subject"].nunique()
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise UserError(f"{what} has {len(usable)} usable images with {found} as class; training needs at least "
                        "two classes")
    if subjects < 2:
        raise UserError(f"{what} has usable images of {subjects} subject(s); a subject-independent split needs at "
                        "least two (check --subject-pattern or --subjects-csv)")


def check_subject_independence(manifest: pd.DataFrame) -> None:
    """Raise if any subject sits in two folds; the promise every fold relies on."""
    folds_per_subject = manifest.groupby("subject")["fold"].nunique()
    leaking = folds_per_subject[folds_per_subject > 1]
    if len(leaking):
        raise AssertionError(f"subjects in more than one fold: {', '.join(map(str, leaking.index[:5]))}")


def fold_summary(manifest: pd.DataFrame, folds: list[int] | None = None) -> str:
    """A Markdown table: per fold, the test subjects and images per class (ok rows)."""
    usable = manifest[manifest["status"] == OK]
    classes = sorted(usable["label"].unique())
    lines = ["| fold | test subjects | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    for fold in folds if folds is not None else fold_ids(manifest):
        test = usable[usable["fold"] == fold]
        counts = test["label"].value_counts()
        lines.append(f"| {fold} | {test['subject'].nunique()} | "
                     + " | ".join(str(int(counts.get(c, 0))) for c in classes) + " |")
    always = usable[usable["fold"] == TRAIN_ONLY]
    if len(always):
        lines.append(f"\n{len(always)} images are always on the training side (fold {TRAIN_ONLY}).")
    validation = usable[usable["fold"] == VALIDATION_ONLY]
    if len(validation):
        lines.append(f"\n{len(validation)} images are the dataset's own validation split (fold {VALIDATION_ONLY}): "
                     "early stopping watches them in every fold.")
    return "\n".join(lines) + "\n"
