import pandas as pd
import pytest

from ferpipe.data.folds import TRAIN_ONLY, assign_folds, check_subject_independence, fold_ids, split_fold


def manifest_of(subjects, statuses=None, splits=None):
    n = len(subjects)
    return pd.DataFrame({
        "image_id": [f"i{k}" for k in range(n)],
        "subject": subjects,
        "status": statuses or ["ok"] * n,
        "split": splits or [""] * n,
    })


def test_kfold_follows_the_ckplus_rule():
    subjects = [f"S{k:03d}" for k in range(25)] * 2
    m = manifest_of(subjects)
    m["fold"] = assign_folds(m, "kfold", 10)
    fold_of = dict(zip(m["subject"], m["fold"]))
    assert fold_of["S000"] == 0 and fold_of["S010"] == 0 and fold_of["S020"] == 0
    assert fold_of["S003"] == 3 and fold_of["S013"] == 3
    check_subject_independence(m)
    assert fold_ids(m) == list(range(10))


def test_loso_gives_one_fold_per_subject():
    m = manifest_of(["KA", "KA", "YM", "NA", "YM"])
    m["fold"] = assign_folds(m, "loso")
    assert m.groupby("fold")["subject"].nunique().eq(1).all() and m["fold"].nunique() == 3


def test_train_val_keeps_train_on_the_training_side():
    m = manifest_of(["a", "b", "c"], splits=["train", "val", "train"])
    m["fold"] = assign_folds(m, "train_val")
    assert m["fold"].tolist() == [TRAIN_ONLY, 0, TRAIN_ONLY]
    split = split_fold(m, 0, val_fraction=0.5)
    assert split.test["subject"].tolist() == ["b"]
    assert set(split.train["subject"]) | set(split.val["subject"]) == {"a", "c"}


def test_split_draws_validation_from_training_subjects_only_and_repeats():
    subjects = [f"s{k:02d}" for k in range(40) for _ in range(3)]
    m = manifest_of(subjects, statuses=["ok"] * 119 + ["no_face"])
    m["fold"] = assign_folds(m, "kfold", 10)
    a, b = split_fold(m, 3, 0.2, seed=7), split_fold(m, 3, 0.2, seed=7)
    assert a.val["image_id"].tolist() == b.val["image_id"].tolist()
    test_subjects = set(a.test["subject"])
    assert test_subjects and not test_subjects & set(a.val["subject"])
    assert not test_subjects & set(a.train["subject"])
    assert not set(a.train["subject"]) & set(a.val["subject"])
    assert len(set(a.val["subject"])) == round(36 * 0.2)
    assert "no_face" not in set(pd.concat([a.train, a.val, a.test])["status"])
    assert split_fold(m, 3, 0.2, seed=8).val["subject"].tolist() != a.val["subject"].tolist()


def test_leak_check_names_the_subject():
    m = manifest_of(["a", "a"])
    m["fold"] = [0, 1]
    with pytest.raises(AssertionError, match="a"):
        check_subject_independence(m)
