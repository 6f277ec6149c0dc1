"""Real photos: the London set (102 people, neutral and smiling), skipped when ../shared is absent."""

import numpy as np
import pytest
from test_landmarks import anatomy_problems

from ferpipe.data.folds import check_subject_independence, fold_ids, split_fold
from ferpipe.preprocess import runner as pp


@pytest.fixture(scope="module")
def london_manifest(london, tmp_path_factory):
    return pp.preprocess("folder", str(london), str(tmp_path_factory.mktemp("london")))


def test_every_photo_has_a_row_and_nearly_all_have_a_face(london_manifest):
    m = london_manifest
    assert len(m) == 204 and set(m["label"]) == {"neutral", "happy"}
    rate = (m["status"] == "ok").mean()
    print(f"SSD + landmarks success rate on London: {rate:.1%} ({(m['status'] == 'ok').sum()}/204)")
    assert rate >= 0.97
    assert m.loc[m["status"] == "ok", "face_confidence"].median() > 0.95


def test_landmarks_are_anatomically_sane_on_real_faces(london_manifest):
    ok = london_manifest[london_manifest["status"] == "ok"]
    bad = {row.image_id: p for row in ok.itertuples()
           if (p := anatomy_problems(np.asarray(row.landmarks).reshape(68, 2)))}
    assert not bad, bad


def test_smiles_are_wider_than_neutral_mouths(london_manifest):
    ok = london_manifest[london_manifest["status"] == "ok"]
    width = ok["landmarks"].map(lambda v: np.hypot(v[108] - v[96], v[109] - v[97]))  # points 54 and 48
    assert width[ok["label"] == "happy"].mean() > 1.05 * width[ok["label"] == "neutral"].mean()


def test_ten_folds_and_no_subject_on_two_sides(london_manifest):
    m = london_manifest
    check_subject_independence(m)
    assert fold_ids(m) == list(range(10))
    for fold in fold_ids(m):
        split = split_fold(m, fold, 0.15, seed=0)
        sides = [set(split.train["subject"]), set(split.val["subject"]), set(split.test["subject"])]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_points_agree_with_dlib_on_its_own_detector_boxes(london_manifest, london):
    """dlib's predictor knows HOG boxes; on the SSD crop it must land near where it lands from HOG."""
    import dlib

    from ferpipe.preprocess import imaging
    from ferpipe.preprocess.pretrained import dlib_68_model

    predictor, hog = dlib.shape_predictor(str(dlib_68_model())), dlib.get_frontal_face_detector()
    errors = []
    for row in london_manifest[london_manifest["status"] == "ok"].head(40).itertuples():
        frame = imaging.equalize_contrast(imaging.to_frame(imaging.decode_gray(open(row.source, "rb").read())))
        boxes = hog(np.ascontiguousarray(frame[..., 0]), 1)
        if len(boxes) != 1:
            continue
        reference = np.array([(p.x, p.y) for p in predictor(np.ascontiguousarray(frame[..., 0]), boxes[0]).parts()])
        x0, y0, x1, y1 = row.face_box
        ours = np.asarray(row.landmarks).reshape(68, 2) * [x1 - x0, y1 - y0] + [x0, y0]
        errors.append(np.linalg.norm(ours - reference, axis=1).mean() / (x1 - x0))
    assert len(errors) >= 30
    assert np.mean(errors) < 0.01, np.mean(errors)
