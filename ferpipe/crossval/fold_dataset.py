"""Stage 5 as the pipeline runs it: one fold's data and its augmentation plan.

A fold dataset is a dataset directory whose manifest's `split` column says
`train` (the fold's training subjects), `val` (validation subjects, drawn from
the training side) or `test` (the fold's held-out subjects). It holds no
pixels: its rows point at the prepared dataset's packs by full URI, so a fold
of a million images is a manifest, not a copy. `fold.json` records the fold,
the classes and the training plan: the augmentation settings and seed every
training task augments with, the expression phase (fine-tune or head-only)
and how a member chooses its checkpoints (`selection`: validation, or
test-fold, which also lets training watch the test side for the optimistic
figure). Training augments online, a fresh
draw of every image in every epoch (`stream.BatchStream`, seeded by member,
phase, epoch and batch), as the paper's ImageDataGenerator did. Measured on
London it learned as well as training on copies written here (README), and it
writes none: stage 5 writes the plan and a picture of what training draws,
`augmentation.png`.

The final model trains on a "fold" with nobody held out (`ALL_SUBJECTS`):
the same stage, task and training code as a cross-validation fold, with an
empty test side and the validation subjects drawn from everyone usable. A
dataset with its own split (the `split` protocol) is the exception: there the
final model is the one the test split measured, trained on the training split
with early stopping on the validation split, and its test split stays held
out. Its fold dataset then has exactly fold 0's training and validation rows,
so its members are fold 0's, from the member cache: each member trains once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.folds import FoldSplit, fold_ids, has_validation_split, split_fold
from ferpipe.data.manifest import OK, read_manifest, write_manifest
from ferpipe.data.packs import full_location
from ferpipe.data.storage import Store, open_store
from ferpipe.model.augment import AugmentSettings, member_seed, stream_seed
from ferpipe.model.examples import Examples, ExampleSet, class_names
from ferpipe.model.profiles import FINE_TUNE, SELECTIONS, TEST_FOLD, VALIDATION, Profile
from ferpipe.model.stream import BatchStream
from ferpipe.preprocess import imaging
from ferpipe.preprocess.preview import draw_landmarks

FOLD_FILE = "fold.json"
PREVIEW_FILE = "augmentation.png"
SPLITS = ("train", "val", "test")
# The final model's fold: no test side, every usable subject trains or validates. Negative like TRAIN_ONLY,
# so it can never be a fold a protocol assigns.
ALL_SUBJECTS = -2


def split_for(manifest: pd.DataFrame, fold: int, val_fraction: float, seed: int) -> FoldSplit:
    """The fold's split; for ALL_SUBJECTS, nobody tested and the validation subjects drawn from everyone.

    ALL_SUBJECTS splits as the fold one past the highest, an id no row carries, so its validation draw
    has a stream of its own (numpy seeds must be non-negative). On a dataset with its own validation
    split it is the test fold's training and validation side, the test split held out (module notes).
    """
    if fold != ALL_SUBJECTS:
        return split_fold(manifest, fold, val_fraction, seed)
    if has_validation_split(manifest) and fold_ids(manifest):
        split = split_fold(manifest, fold_ids(manifest)[0], val_fraction, seed)
        return replace(split, fold=ALL_SUBJECTS, test=split.test.iloc[:0])
    unused = int(manifest["fold"].max()) + 1 if len(manifest) else 0
    split = split_fold(manifest, unused, val_fraction, seed)
    assert split.test.empty, "a fold id no row carries must test nobody"
    return replace(split, fold=ALL_SUBJECTS)


def write_fold_dataset(prepared: str | Store, fold: int, profile: Profile, out: str | Store, seed: int = 0,
                       selection: str = VALIDATION) -> dict:
    """Split `fold` by subject and write its three sides to `out`, with the training plan and its preview."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    if selection == TEST_FOLD and fold == ALL_SUBJECTS:
        raise ValueError("the final model tests nobody, so no test fold can choose its checkpoints; "
                         "test-fold selection is for measuring only")
    source = open_store(prepared)
    target = open_store(out)
    manifest = read_manifest(source)
    classes = class_names(manifest)
    split = split_for(manifest, fold, profile.val_fraction, seed)
    rows = []
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        for row in part.to_dict("records"):  # pixels stay in the prepared dataset's packs: referenced, not copied
            rows.append({**row, "split": name, "image_path": full_location(source, row["image_path"])})
    info = {
        "fold": fold, "classes": list(classes), "seed": seed, "profile": profile.name,
        "augment": asdict(profile.augment) if profile.augment is not None else None,
        "expression": profile.expression, "selection": selection,
        "train_images": len(split.train), "val_images": len(split.val), "test_images": len(split.test),
        "test_subjects": sorted(split.test["subject"].unique().tolist()),
    }
    target.write_bytes(FOLD_FILE, json.dumps(info, indent=1).encode())
    write_manifest(pd.DataFrame(rows), target)
    train = ExampleSet(source, split.train, classes, profile.input_size)
    target.write_bytes(PREVIEW_FILE, imaging.encode_png(augmentation_sheet(train, profile, seed)))
    return info


def planned_profile(profile: Profile, info: dict) -> Profile:
    """The profile a training task follows on a fold dataset: its augmentation and expression phase are the
    ones stage 5 planned."""
    return replace(profile, augment=AugmentSettings(**info["augment"]) if info["augment"] is not None else None,
                   expression=info.get("expression", FINE_TUNE))


def augmentation_sheet(train: Examples | ExampleSet, profile: Profile, seed: int, epochs: int = 4,
                       columns: int = 6) -> np.ndarray:
    """What training draws: the first images of the first batch of epochs 1..`epochs`, at the network's
    size, with their moved landmarks; the stream of the ensemble's first member in its first phase."""
    if not len(train):
        return np.zeros((32, 32, 3), np.uint8)
    stream = BatchStream(train, None, profile.batch_size, seed=stream_seed(member_seed(seed, 0), 0),
                         settings=profile.augment)
    scale = max(1, 128 // profile.input_size)
    lines = []
    for epoch in range(epochs):
        images, points, _ = stream.draw(epoch, 0)
        tiles = [draw_landmarks(image, moved, scale) for image, moved in zip(images[:columns], points[:columns])]
        tiles += [np.zeros_like(tiles[0])] * (columns - len(tiles))
        line = np.hstack(tiles)
        cv2.putText(line, f"epoch {epoch + 1}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        lines.append(line)
    return np.vstack(lines)


def read_fold_info(where: str | Store) -> dict:
    store = open_store(where)
    return json.loads(store.read_bytes(FOLD_FILE))


def load_fold_split(where: str | Store, name: str, size: int) -> ExampleSet:
    """The `train`, `val` or `test` side of a fold dataset at `size`: its rows, crops read when asked."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    store = open_store(where)
    info = read_fold_info(store)
    manifest = read_manifest(store)
    rows = manifest[(manifest["split"] == name) & (manifest["status"] == OK)]
    return ExampleSet(store, rows, tuple(info["classes"]), size)


def check_no_leak(where: str | Store) -> None:
    """No subject on two sides of a fold dataset."""
    manifest = read_manifest(where)
    sides = {name: set(manifest.loc[manifest["split"] == name, "subject"]) for name in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sides[a] & sides[b]
        if shared:
            raise AssertionError(f"subjects on both the {a} and {b} side: {sorted(shared)[:5]}")
