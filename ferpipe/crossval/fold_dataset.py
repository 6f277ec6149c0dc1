"""Stage 5 as the pipeline runs it: one fold's data, its training side augmented and materialised.

A fold dataset is a dataset directory whose manifest's `split` column says
`train` (the originals and k augmented copies of every training image, their
landmarks moved by the same transform), `val` (validation subjects, drawn from
the training side, untouched) or `test` (the fold's held-out subjects,
untouched). `fold.json` records the fold, the classes and how it was made, so
the training and prediction tasks need nothing else. The copies are drawn
from (seed, fold, row), so the same inputs give the same bytes.

The final model trains on a "fold" with nobody held out (`ALL_SUBJECTS`):
the same stage, task and training code as a cross-validation fold, with an
empty test side and the validation subjects drawn from everyone usable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pandas as pd

from ferpipe.data.folds import FoldSplit, split_fold
from ferpipe.data.manifest import OK, read_manifest, write_manifest
from ferpipe.data.storage import Store, open_store
from ferpipe.model.augment import AugmentSettings, augment_copies
from ferpipe.model.examples import Examples, class_names, load_examples
from ferpipe.model.profiles import Profile
from ferpipe.preprocess import imaging, landmarks

FOLD_FILE = "fold.json"
SPLITS = ("train", "val", "test")
# The final model's fold: no test side, every usable subject trains or validates. Negative like TRAIN_ONLY,
# so it can never be a fold a protocol assigns.
ALL_SUBJECTS = -2


def split_for(manifest: pd.DataFrame, fold: int, val_fraction: float, seed: int) -> tuple[FoldSplit, int]:
    """(the split, the non-negative number its random draws are seeded with).

    For ALL_SUBJECTS that number is one past the highest fold, an id no row carries: split_fold then
    tests nobody, and the validation draw and augmentation get a stream of their own (numpy seeds
    must be non-negative).
    """
    if fold != ALL_SUBJECTS:
        return split_fold(manifest, fold, val_fraction, seed), fold
    unused = int(manifest["fold"].max()) + 1 if len(manifest) else 0
    split = split_fold(manifest, unused, val_fraction, seed)
    assert split.test.empty, "a fold id no row carries must test nobody"
    return replace(split, fold=ALL_SUBJECTS), unused


def write_fold_dataset(prepared: str | Store, fold: int, profile: Profile, copies: int, out: str | Store,
                       seed: int = 0, settings: AugmentSettings | None = None) -> dict:
    """Split `fold` by subject, augment its training images `copies` times, write it all to `out`."""
    source = open_store(prepared)
    target = open_store(out)
    manifest = read_manifest(source)
    classes = class_names(manifest)
    split, stream = split_for(manifest, fold, profile.val_fraction, seed)
    settings = settings or profile.augment or AugmentSettings()

    rows = []
    train = load_examples(source, split.train, classes)
    made = augment_copies(train.images, train.points, copies, seed=seed * 1000 + stream, settings=settings)
    originals = split.train.reset_index(drop=True)
    for image, points, i, k in zip(made.images, made.points, made.source_index, made.copy_index):
        row = originals.iloc[int(i)].to_dict()
        row["image_id"] = f"{row['image_id']}~{int(k)}"
        row["image_path"] = f"images/{row['image_id']}.png"
        row["landmarks"] = landmarks.flatten(points)
        row["split"] = "train"
        target.write_bytes(row["image_path"], imaging.encode_png(image))
        rows.append(row)
    for name, part in (("val", split.val), ("test", split.test)):
        for row in part.to_dict("records"):
            target.write_bytes(row["image_path"], source.read_bytes(row["image_path"]))
            rows.append({**row, "split": name})

    info = {
        "fold": fold, "classes": list(classes), "seed": seed, "copies": copies, "profile": profile.name,
        "augment": asdict(settings), "train_images": len(split.train), "train_examples": len(made.images),
        "val_images": len(split.val), "test_images": len(split.test),
        "test_subjects": sorted(split.test["subject"].unique().tolist()),
    }
    target.write_bytes(FOLD_FILE, json.dumps(info, indent=1).encode())
    write_manifest(pd.DataFrame(rows), target)
    return info


def read_fold_info(where: str | Store) -> dict:
    store = open_store(where)
    return json.loads(store.read_bytes(FOLD_FILE))


def load_fold_split(where: str | Store, name: str, size: int | None = None) -> Examples:
    """The `train`, `val` or `test` examples of a fold dataset, resized to `size`."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    store = open_store(where)
    info = read_fold_info(store)
    manifest = read_manifest(store)
    rows = manifest[(manifest["split"] == name) & (manifest["status"] == OK)]
    return load_examples(store, rows, tuple(info["classes"]), size)


def copies_for(profile: Profile) -> int:
    """Augmented copies per training image the pipeline materialises for a profile."""
    return {"smoke": 1, "demo": 2}.get(profile.name, 4)


def check_no_leak(where: str | Store) -> None:
    """No subject on two sides of a fold dataset."""
    manifest = read_manifest(where)
    sides = {name: set(manifest.loc[manifest["split"] == name, "subject"]) for name in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sides[a] & sides[b]
        if shared:
            raise AssertionError(f"subjects on both the {a} and {b} side: {sorted(shared)[:5]}")
