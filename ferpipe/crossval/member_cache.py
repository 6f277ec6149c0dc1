"""Trained members keyed by what they were trained on: a rerun on unchanged data trains nothing.

The key hashes what training reads of the fold dataset: its training and
validation rows (ids, content hashes, labels, splits, landmarks), the classes
and how it was augmented, plus the member (network, slot, seed), the profile
and a fingerprint of the training code (`ferpipe.version`). Not the test side:
a member never sees it, so two folds that train on the same rows (a dataset's
own split, and its final model) share one member. TensorFlow is imported only
on a miss, so a hit costs a file copy.

The same key names the member's checkpoint, `<cache_uri>/checkpoints/<key>/`
(`<work_uri>/...` without a cache): a retried training task resumes there on
any node, and nothing in it depends on the KFP run, so the training task takes
no run id and KFP's own cache can answer it (its key is every input value).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ferpipe.crossval.fold_dataset import read_fold_info
from ferpipe.data.manifest import read_manifest
from ferpipe.data.storage import Store, open_store
from ferpipe.version import code_fingerprint

if TYPE_CHECKING:  # importing training imports TensorFlow, which a cache hit must not pay for
    from ferpipe.model.training import EpochHook

# The code a trained member depends on: the model package (augmentation, networks, profiles, training),
# how a fold's data is written and read and how a training task runs, and the deep-learning releases.
TRAINING_CODE = (("ferpipe.model", "ferpipe.data.parts", "ferpipe.crossval.fold_dataset", "ferpipe.crossval.steps"),
                 (("keras",), ("tensorflow", "tensorflow-cpu"), ("numpy",)))
MEMBER_FILES = ("model.weights.h5", "member.json")
# Only members with a landmark phase have the first; only members that watched the test fold the second.
OPTIONAL_FILES = ("landmarks.weights.npz", "test_selected.npz")

log = logging.getLogger(__name__)


# What of a fold's info training depends on (its fold number, test images and test subjects it never reads).
TRAINING_INFO = ("classes", "seed", "profile", "augment", "train_images", "val_images")
CHECKPOINTS = "checkpoints"


def member_key(fold_dir: str, network: str, slot: str, profile: str, seed: int, dataset: str | None) -> str:
    manifest = read_manifest(fold_dir)
    trained_on = manifest[manifest["split"].isin(("train", "val"))]
    columns = ["image_id", "sha256", "label", "split", "status"]
    rows = trained_on[columns].astype(str).values.tolist()
    points = [None if v is None else [round(float(x), 5) for x in v] for v in trained_on["landmarks"]]
    fold_info = {k: v for k, v in read_fold_info(fold_dir).items() if k in TRAINING_INFO}
    recipe = [code_fingerprint(*TRAINING_CODE), rows, points, fold_info, network, slot, profile, seed, dataset]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def train_or_restore(fold_dir: str, network: str, slot: str, profile: str, out_dir: str, seed: int = 0,
                     dataset: str | None = None, cache_uri: str = "", checkpoint_uri: str = "",
                     on_epoch: EpochHook | None = None) -> tuple[dict, bool]:
    """(member summary, whether it came from the cache); trains and fills the cache on a miss.

    `checkpoint_uri`: a store under which training mirrors its checkpoint after every epoch, at
    `checkpoints/<member key>/`, to survive a lost pod ('' for none). `on_epoch` hears every epoch
    trained here (none on a hit: the summary carries the history).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = open_store(cache_uri).child("members") if cache_uri else None
    key = member_key(fold_dir, network, slot, profile, seed, dataset) if cache or checkpoint_uri else ""
    fold = read_fold_info(fold_dir)["fold"]
    if cache is not None and all(cache.exists(f"{key}/{name}") for name in MEMBER_FILES):
        for name in (*OPTIONAL_FILES, *MEMBER_FILES):
            if name in MEMBER_FILES or cache.exists(f"{key}/{name}"):
                (out / name).write_bytes(cache.read_bytes(f"{key}/{name}"))
        log.info(f"{network} {slot}: trained member restored from the cache ({key[:12]})")
        # Trained for another fold on the same rows (a dataset's own split and its final model): this fold's now.
        summary = {**json.loads((out / "member.json").read_text()), "fold": fold}
        (out / "member.json").write_text(json.dumps(summary, indent=1))
        return summary, True
    from ferpipe.crossval.steps import train_on_fold

    mirror = open_store(checkpoint_uri).child(f"{CHECKPOINTS}/{key}") if checkpoint_uri else None
    summary = train_on_fold(fold_dir, network, slot, profile, out_dir, seed, dataset, checkpoints=mirror,
                            on_epoch=on_epoch)
    if cache is not None:
        for name in (*OPTIONAL_FILES, *MEMBER_FILES):  # the summary last: its presence marks a complete entry
            if (out / name).is_file():
                cache.write_bytes(f"{key}/{name}", (out / name).read_bytes())
    return summary, False
