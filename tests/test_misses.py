"""The picture of the test images the ensemble got wrong: which ones, in which order, from which crops."""

import cv2
import numpy as np
import pandas as pd
from science_fixtures import write_dataset

from ferpipe.data.manifest import read_manifest
from ferpipe.evaluate.misses import CAPTION, COLUMNS, TILE, misses_sheet, wrong_predictions
from ferpipe.preprocess.imaging import decode_png

CLASSES = ("happy", "neutral")


def predictions() -> pd.DataFrame:
    """Three misses (one of an image the dataset lacks) and a hit, as prediction CSVs read back: text."""
    rows = [("000_happy_0", "happy", "neutral", 1.5, 3.5), ("000_neutral_0", "neutral", "neutral", 0.5, 4.5),
            ("001_neutral_0", "neutral", "happy", 4.5, 0.5), ("gone_happy", "happy", "neutral", 2.0, 3.0)]
    return pd.DataFrame([{"image_id": i, "label": label, "ensemble": pick, "sum_happy": str(h), "sum_neutral": str(n)}
                         for i, label, pick, h, n in rows])


def test_the_misses_are_the_wrong_rows_most_confident_first():
    wrong = wrong_predictions(predictions(), CLASSES)
    assert wrong["image_id"].tolist() == ["001_neutral_0", "000_happy_0", "gone_happy"]
    assert np.allclose(wrong["share"], [0.9, 0.7, 0.6])


def test_the_sheet_shows_each_miss_from_its_crop_in_that_order(tmp_path):
    root = write_dataset(tmp_path, subjects=2, per_class=1)
    sheet = misses_sheet(predictions(), root, CLASSES)
    assert sheet.shape == (TILE + CAPTION, COLUMNS * TILE, 3)  # one row of tiles, padded to the columns
    manifest = read_manifest(root).set_index("image_id")
    for column, image_id in enumerate(["001_neutral_0", "000_happy_0"]):
        crop = decode_png((root / manifest.loc[image_id, "image_path"]).read_bytes())
        expected = cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(sheet[:TILE, column * TILE:(column + 1) * TILE], expected), image_id
    assert (sheet[:TILE, 2 * TILE:3 * TILE] == 200).all()  # an image the dataset lacks: a grey tile, still captioned
    assert (sheet[TILE:, 2 * TILE:3 * TILE] < 128).any()  # its caption
    assert (sheet[:, 3 * TILE:] == 255).all()  # padding


def test_no_picture_when_every_image_is_right(tmp_path):
    root = write_dataset(tmp_path, subjects=2, per_class=1)
    right = predictions().assign(ensemble=lambda frame: frame["label"])
    assert misses_sheet(right, root, CLASSES) is None


def test_the_sheet_stops_at_its_limit(tmp_path):
    root = write_dataset(tmp_path, subjects=2, per_class=1)
    first = misses_sheet(predictions(), root, CLASSES, limit=1)
    assert (first[:, TILE:] == 255).all() and not (first[:TILE, :TILE] == 255).all()  # one face, then padding
    many = pd.concat([predictions()] * 6, ignore_index=True)  # 18 misses: three rows of eight
    assert misses_sheet(many, root, CLASSES).shape == (3 * (TILE + CAPTION), COLUMNS * TILE, 3)
