"""Accuracy per group of people: does the ensemble serve everyone alike?

For every attribute the subject metadata carries (ferpipe.data.subject_meta:
gender, age, ethnicity, ...), the test images of all folds are pooled and the
ensemble's accuracy is given per group with its count and a 95% Wilson score
interval. Wilson, not the normal approximation: groups are small and
accuracies near 1, where the normal interval runs past 100% or collapses to
a point.

A group is *flagged* when its whole interval lies below the overall accuracy:
even its most favourable plausible accuracy is worse than the model's
average. Groups under `MIN_GROUP_IMAGES` test images are "too few to say",
with no number at all: 3 of 4 right is not evidence of anything, and a bare
75% next to 97% reads as if it were. Age becomes bands (years, the usual
survey cut points); a value that is missing or not a number is "unknown", a
group of its own.

The interval treats images as independent. Two images of one person are not
(they succeed or fail together more often than two strangers' would), so
with several images per subject the true uncertainty is wider than shown;
each group's subject count is reported beside its image count for that reason.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from ferpipe.data.subject_meta import META_PREFIX, meta_columns

Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
MIN_GROUP_IMAGES = 10
MAX_GROUPS = 12  # an attribute with more distinct values (free text, ids) is not a grouping
UNKNOWN = "unknown"
TOO_FEW = "too few to say"
BELOW = "below overall"
CONSISTENT = "consistent with overall"
AGE_BANDS = ((0, 18, "under 18"), (18, 25, "18-24"), (25, 35, "25-34"), (35, 45, "35-44"), (45, 55, "45-54"),
             (55, 65, "55-64"), (65, math.inf, "65+"))


def wilson_interval(correct: int, images: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/images (nan, nan when there are no images)."""
    if images <= 0:
        return float("nan"), float("nan")
    p = correct / images
    denominator = 1 + z * z / images
    centre = (p + z * z / (2 * images)) / denominator
    half = z * math.sqrt(p * (1 - p) / images + z * z / (4 * images * images)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def age_band(value) -> str:
    """An age in years (text or number) -> its band; missing or not a number -> unknown."""
    try:
        years = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(years) or years < 0:
        return UNKNOWN
    return next(label for low, high, label in AGE_BANDS if low <= years < high)


def is_age(attribute: str) -> bool:
    return re.search(r"(^|_)age(_years)?$", attribute) is not None


def _groups_of(attribute: str, values: pd.Series) -> pd.Series:
    if is_age(attribute):
        return values.map(age_band)
    return values.map(lambda v: UNKNOWN if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == ""
                      else str(v))


def _order(attribute: str, counts: pd.Series) -> list[str]:
    """Age bands in age order; other groups largest first; unknown last."""
    if is_age(attribute):
        known = [label for _, _, label in AGE_BANDS if label in counts.index]
    else:
        known = sorted((g for g in counts.index if g != UNKNOWN), key=lambda g: (-counts[g], g))
    return known + ([UNKNOWN] if UNKNOWN in counts.index else [])


def group_accuracy(rows: pd.DataFrame, prediction: str = "ensemble", min_images: int = MIN_GROUP_IMAGES) -> dict:
    """Per attribute and group: test images, subjects, accuracy and its 95% Wilson interval, and a verdict.

    `rows` are per-image predictions (`label`, `subject`, the `prediction`
    column) with the `meta_*` columns of ferpipe.data.subject_meta.
    """
    columns = meta_columns(rows)
    right = (rows["label"].astype(str) == rows[prediction].astype(str)) if len(rows) else pd.Series([], dtype=bool)
    overall = float(right.mean()) if len(rows) else float("nan")
    result = {
        "prediction": prediction, "confidence": 0.95, "interval": "wilson", "min_images": min_images,
        "overall": {"images": int(len(rows)), "correct": int(right.sum()), "accuracy": overall},
        "attributes": {}, "skipped": {},
    }
    for column in columns:
        attribute = column[len(META_PREFIX):]
        groups = _groups_of(attribute, rows[column])
        counts = groups.value_counts()
        if len(counts) > MAX_GROUPS:
            result["skipped"][attribute] = f"{len(counts)} distinct values: not a grouping"
            continue
        entries = []
        for group in _order(attribute, counts):
            mask = groups == group
            images, subjects = int(mask.sum()), int(rows.loc[mask, "subject"].nunique())
            entry = {"group": group, "images": images, "subjects": subjects}
            if images < min_images:
                entry.update(correct=None, accuracy=None, low=None, high=None, verdict=TOO_FEW)
            else:
                correct = int(right[mask].sum())
                low, high = wilson_interval(correct, images)
                entry.update(correct=correct, accuracy=correct / images, low=low, high=high,
                             verdict=BELOW if high < overall else CONSISTENT)
            entries.append(entry)
        result["attributes"][attribute] = entries
    return result


def flagged_groups(groups: dict) -> list[tuple[str, str]]:
    """(attribute, group) of every group whose interval lies wholly below the overall accuracy."""
    return [(attribute, entry["group"]) for attribute, entries in (groups or {}).get("attributes", {}).items()
            for entry in entries if entry["verdict"] == BELOW]
