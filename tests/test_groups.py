"""Accuracy per group of people: subject metadata joined into the manifest, Wilson intervals, verdicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ferpipe.data.datasets import DatasetOptions
from ferpipe.data.manifest import read_manifest
from ferpipe.data.subject_meta import join_subject_meta, read_subject_meta, with_subject_meta
from ferpipe.errors import UserError
from ferpipe.evaluate.groups import (
    BELOW,
    CONSISTENT,
    TOO_FEW,
    age_band,
    flagged_groups,
    group_accuracy,
    wilson_interval,
)
from ferpipe.preprocess.runner import ingest

LONDON_STYLE = "face_id,face_age,face_gender,face_eth\n001,24,female,white\n002,NA,male,black\n010,61,male,\n"


def test_metadata_keeps_ids_as_text_and_names_attributes_plainly():
    meta = read_subject_meta(LONDON_STYLE)
    assert list(meta.index) == ["001", "002", "010"]  # not 1, 2, 10
    assert list(meta.columns) == ["age", "gender", "ethnicity"]
    assert meta.loc["002", "age"] is None and meta.loc["010", "ethnicity"] is None
    assert meta.loc["001", "gender"] == "female"
    with pytest.raises(UserError, match="twice"):
        read_subject_meta("subject,gender\na,f\na,m\n")


def test_join_matches_exact_ids_then_numbers_and_leaves_strangers_unknown():
    manifest = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "subject": ["001", "2", "10", "999"]})
    joined = join_subject_meta(manifest, read_subject_meta(LONDON_STYLE))
    assert joined["meta_gender"].tolist() == ["female", "male", "male", None]
    assert joined.attrs["subject_meta"]["unmatched"] == ["999"]
    with pytest.raises(UserError, match="no subject of the dataset"):
        join_subject_meta(pd.DataFrame({"image_id": ["x"], "subject": ["abc"]}), read_subject_meta(LONDON_STYLE))
    rows = pd.DataFrame({"image_id": ["c", "a"], "label": ["happy", "sad"]})
    assert with_subject_meta(rows, joined)["meta_age"].tolist() == ["61", "24"]


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(50, 50)
    assert high == 1.0 and 0.92 < low < 0.93  # never the normal interval's [1, 1]


def test_age_bands():
    assert [age_band(v) for v in ("17", 18, "24.9", "25", "64", "65", None, "NA", "-3")] == [
        "under 18", "18-24", "18-24", "25-34", "55-64", "65+", "unknown", "unknown", "unknown"]


def predictions(groups: dict[str, tuple[int, int]], attribute: str = "meta_gender") -> pd.DataFrame:
    """Per-image rows: for each group, (images, correct); two images per subject."""
    rows = []
    for group, (images, correct) in groups.items():
        for i in range(images):
            rows.append({"image_id": f"{group}{i}", "subject": f"{group}{i // 2}", "label": "happy",
                         "ensemble": "happy" if i < correct else "neutral", attribute: group})
    return pd.DataFrame(rows)


def test_a_group_whose_interval_lies_below_overall_is_flagged_and_small_groups_get_no_number():
    rows = predictions({"a": (200, 196), "b": (40, 28), "c": (4, 0)})
    result = group_accuracy(rows)
    overall = result["overall"]["accuracy"]
    assert result["overall"]["images"] == 244 and overall == pytest.approx(224 / 244)
    a, b, c = result["attributes"]["gender"]
    assert (a["group"], a["verdict"], a["subjects"]) == ("a", CONSISTENT, 100)
    assert b["verdict"] == BELOW and b["high"] < overall and b["accuracy"] == pytest.approx(0.7)
    assert c["verdict"] == TOO_FEW and c["accuracy"] is None and c["low"] is None and c["images"] == 4
    assert flagged_groups(result) == [("gender", "b")]
    json.dumps(result)  # results.json takes it as it is


def test_a_slightly_worse_group_whose_interval_reaches_overall_is_not_flagged():
    result = group_accuracy(predictions({"a": (100, 95), "b": (20, 18)}))
    assert [g["verdict"] for g in result["attributes"]["gender"]] == [CONSISTENT, CONSISTENT]


def test_ages_are_grouped_in_bands_in_age_order():
    rows = predictions({"30": (12, 12), "19": (12, 6), "NA": (10, 10)}, attribute="meta_age")
    groups = group_accuracy(rows)["attributes"]["age"]
    assert [g["group"] for g in groups] == ["18-24", "25-34", "unknown"]


def test_london_subjects_csv_is_picked_up_beside_the_images_and_matches_every_subject(london, tmp_path):
    manifest = ingest("folder", str(london), str(tmp_path / "frames"), options=DatasetOptions(), names=("input",),
                      workers=1)
    assert manifest.attrs["subject_meta"]["unmatched"] == []
    stored = read_manifest(str(tmp_path / "frames"))
    assert {"meta_age", "meta_gender", "meta_ethnicity"} <= set(stored.columns)
    one = stored[stored["subject"] == "001"]
    assert len(one) == 2 and set(one["meta_gender"]) == {"female"} and set(one["meta_age"]) == {"24"}
    assert stored["meta_gender"].notna().all()
    assert stored["meta_age"].isna().sum() == 4  # two subjects gave no age: their two images each
    assert np.array_equal(stored["meta_gender"].value_counts().sort_index().values, [98, 106])


def test_an_explicit_subjects_meta_wins_and_matches_unpadded_ids(london, tmp_path):
    table = tmp_path / "people.csv"
    table.write_text("subject,sex\n" + "".join(f"{n},{'f' if n % 2 else 'm'}\n" for n in range(1, 103)))
    manifest = ingest("folder", str(london), str(tmp_path / "frames"), names=("input",), workers=1,
                      options=DatasetOptions(subject_meta=str(table)))
    assert "meta_age" not in manifest.columns  # the folder's own subjects.csv is not used then
    assert manifest.loc[manifest["subject"] == "003", "meta_gender"].tolist() == ["f", "f"]  # sex -> gender


def test_preprocess_stops_at_once_on_a_missing_metadata_file(london, tmp_path, capsys):
    from pipelines.cli import main

    code = main(["preprocess", "--dataset", "folder", "--data", str(london), "--out", str(tmp_path / "out"),
                 "--subjects-meta", str(tmp_path / "nope.csv")])
    assert code == 2 and "subject metadata CSV not found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.parquet").exists()
