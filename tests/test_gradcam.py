"""Grad-CAM on sub-networks whose decision is known: weights set by hand so only one image region counts."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

from ferpipe.evaluate.gradcam import gradcam, gradcam_figure, pick_examples
from ferpipe.model import networks
from ferpipe.model.augment import to_network_input
from ferpipe.model.examples import Examples

SIZE = 48


def region_network(size: int = SIZE) -> keras.Model:
    """A 2-class sub-network that passes input channel 0 and channel 1 through the extractor unchanged
    (centre taps 1, BatchNorm identity, ReLU drops the -1 background), but whose head scores class 1 by
    channel 0 alone: channel 1 is seen by the extractor and carried by the head, then ignored."""
    model = networks.build_subnetwork(networks.build_extractor(size), 2)
    for layer in networks.extractor_of(model).layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = np.zeros(layer.kernel.shape, np.float32)
            kernel[1, 1, 0, 0] = kernel[1, 1, 1, 1] = 1.0
            layer.kernel.assign(kernel)
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    for layer in networks.head_of(model).layers:
        if isinstance(layer, keras.layers.Dense):
            kernel = np.zeros(layer.kernel.shape, np.float32)
            if layer.name == "probabilities":
                kernel[0, 1], kernel[0, 0] = 8.0, -8.0
            else:
                kernel[0, 0] = kernel[1, 1] = 1.0
            layer.kernel.assign(kernel)
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    return model


def squares(size: int = SIZE) -> np.ndarray:
    """Row 0: the deciding square (channel 0) top-right and a distractor (channel 1) bottom-left.
    Row 1: the distractor alone. Row 2: blank."""
    images = np.zeros((3, size, size, 3), np.uint8)
    side = size // 6
    images[0, :side, size - side:, 0] = 255
    images[:2, size - side:, :side, 1] = 255
    return images


def quadrant_shares(heatmap: np.ndarray) -> np.ndarray:
    """Share of the heatmap's mass in [[top-left, top-right], [bottom-left, bottom-right]]."""
    half = heatmap.shape[0] // 2
    mass = np.array([[heatmap[:half, :half].sum(), heatmap[:half, half:].sum()],
                     [heatmap[half:, :half].sum(), heatmap[half:, half:].sum()]])
    return mass / heatmap.sum()


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return region_network()


def test_the_heatmap_lies_on_the_region_that_decides_the_class(model):
    images = squares()
    assert networks.infer(model, to_network_input(images[:1])).argmax() == 1
    heatmaps = gradcam(model, images)
    # The distractor is as bright in the activation as the deciding square; only the gradients tell them apart.
    shares = quadrant_shares(heatmaps[0])
    assert shares[0, 1] > 0.95 and shares[1, 0] < 0.01
    assert heatmaps[0].max() == pytest.approx(1.0)


def test_the_default_class_is_the_pick_and_a_class_against_the_region_gives_a_zero_map(model):
    images = squares()
    np.testing.assert_array_equal(gradcam(model, images[:1]), gradcam(model, images[:1], class_index=1))
    # Class 0's score falls as the square brightens: every weight is negative, ReLU leaves nothing.
    against = gradcam(model, images[:1], class_index=0)
    assert np.all(against == 0) and np.all(np.isfinite(against))
    # Nothing the head reads: an all-zero map, not NaN from scaling by a zero maximum.
    assert np.all(gradcam(model, images[1:]) == 0)


def test_gradcam_runs_in_inference_mode(model):
    before = [w.copy() for w in model.get_weights()]
    gradcam(model, squares())
    # training=True would have pulled BatchNorm's moving statistics towards these images' batch statistics.
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_an_image_s_map_does_not_depend_on_its_batch():
    model = networks.build_classifier(3, 24)
    images = np.random.default_rng(1).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(gradcam(model, images, batch_size=2), gradcam(model, images), atol=1e-5)
    np.testing.assert_allclose(gradcam(model, images[3:4]), gradcam(model, images)[3:4], atol=1e-5)


@pytest.mark.parametrize("size", [24, 48, 160])
def test_heatmaps_have_the_crop_size_and_lie_in_0_1(size):
    model = networks.build_classifier(3, size)
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    heatmaps = gradcam(model, images)
    assert heatmaps.shape == (2, size, size) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert all(h.max() in (0.0, pytest.approx(1.0)) for h in heatmaps)
    assert gradcam(model, images[:0]).shape == (0, size, size)


def test_pick_examples_spreads_the_rows_over_the_classes():
    labels = np.array([0, 0, 0, 0, 2, 2, 1])
    assert list(pick_examples(labels, 3)) == [0, 6, 4]
    assert list(pick_examples(labels, 5)) == [0, 1, 6, 4, 5]
    assert sorted(pick_examples(labels, 99)) == list(range(7))


def examples(count: int, size: int = SIZE) -> Examples:
    rng = np.random.default_rng(0)
    return Examples(
        images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
        points=np.zeros((count, 68, 2), np.float32),
        labels=np.arange(count) % 2,
        classes=("happy", "sad"),
        image_ids=tuple(f"i{i}" for i in range(count)),
        subjects=tuple("s" for _ in range(count)),
    )


def test_the_figure_has_a_row_per_image_and_a_column_per_member(model, tmp_path):
    other = networks.build_classifier(2, SIZE)
    out = gradcam_figure([model, other, model], ["eyes", "nose", "mouth"], examples(9), tmp_path / "g" / "fold1.png",
                         max_images=4)
    assert out == tmp_path / "g" / "fold1.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with Image.open(out) as picture:
        width, height = picture.size
    # 1.7 in per column (crop + 3 members) and 1.8 in per row (4 of the 9 images), at 100 dpi.
    assert (width, height) == (680, 720)


def test_no_test_images_means_no_figure(model, tmp_path):
    assert gradcam_figure([model], ["eyes"], examples(0), tmp_path / "fold1.png") is None
    assert not (tmp_path / "fold1.png").exists()
