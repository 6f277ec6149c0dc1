"""Grad-CAM: where in the crop a sub-network looked when it picked a class.

Selvaraju et al.'s recipe on the last convolutional block (`block4_relu2`,
before its pooling, so the map keeps the most resolution the extractor has):
each channel is weighted by the mean over space of d(class score)/d(activation),
the weighted sum is passed through ReLU, upsampled bilinearly to the crop and
scaled to [0, 1] per image. The map is coarse by construction: 3x3 cells at
24 px, 6x6 at 48, 10x10 at 160.

The class score is the logit, not the softmax probability: a confident
member's probability is saturated, its gradients vanish (exactly zero once it
rounds to 1 in float32) and the map goes blank. The logit is recomputed from
the head's last Dense layer, whose activation is the softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf

from ferpipe.model.augment import to_network_input
from ferpipe.model.examples import Examples
from ferpipe.model.networks import extractor_of, head_of

LAYER = "block4_relu2"
ALPHA = 0.45  # heatmap over crop: the face stays readable under the colours


def _logits(head: keras.Model, features: tf.Tensor) -> tf.Tensor:
    """The head's class scores before its softmax (its layers are a chain of Dense layers)."""
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    x = features
    for layer in dense[:-1]:
        x = layer(x)
    last = dense[-1]
    return tf.matmul(x, last.kernel) + last.bias


def _gradcam(model: keras.Model, images_uint8: np.ndarray, class_index: int | None = None, batch_size: int = 32
             ) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) in [0, 1] and the model's probabilities (N, classes)."""
    images = np.asarray(images_uint8)
    size = images.shape[1]
    if len(images) == 0:
        return np.zeros((0, size, size), np.float32), np.zeros((0, int(model.output_shape[-1])), np.float32)
    extractor = extractor_of(model)
    # The extractor's own graph, with the activation as a second output: one forward pass yields both.
    tapped = keras.Model(extractor.inputs, [extractor.get_layer(LAYER).output, extractor.output])
    # Batches bound the tape's memory: it holds every activation of the batch at full resolution.
    parts = [_batch(tapped, head_of(model), images[i : i + batch_size], class_index)
             for i in range(0, len(images), batch_size)]
    maps = np.concatenate([p[0] for p in parts])
    heatmaps = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
    peak = heatmaps.max(axis=(1, 2), keepdims=True)
    heatmaps = np.divide(heatmaps, peak, out=np.zeros_like(heatmaps), where=peak > 0)
    return np.clip(heatmaps, 0.0, 1.0).astype(np.float32), np.concatenate([p[1] for p in parts])


def _batch(tapped: keras.Model, head: keras.Model, images: np.ndarray, class_index: int | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Raw class-activation maps (N, h, w) at the layer's resolution and probabilities of one batch."""
    inputs = tf.convert_to_tensor(to_network_input(images))
    with tf.GradientTape() as tape:
        # training=False: BatchNorm uses (and does not update) its moving statistics, as in prediction.
        activation, features = tapped(inputs, training=False)
        logits = _logits(head, features)
        chosen = tf.argmax(logits, axis=-1) if class_index is None else tf.fill([len(images)], class_index)
        score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
    # With moving statistics the images do not interact, so the gradient of the summed score
    # holds each image's own gradient.
    gradients = tape.gradient(score, activation)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1))
    return maps.numpy(), tf.nn.softmax(logits).numpy()


def gradcam(model: keras.Model, images_uint8: np.ndarray, class_index: int | None = None, batch_size: int = 32
            ) -> np.ndarray:
    """(N, S, S) heatmaps in [0, 1] of a sub-network on uint8 crops; the class defaults to its pick."""
    return _gradcam(model, images_uint8, class_index, batch_size)[0]


def pick_examples(labels: np.ndarray, count: int) -> np.ndarray:
    """Rows spread over the classes: the first of each class, then the second of each, and so on."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rank[rows] = np.arange(len(rows))
    chosen = np.lexsort((labels, rank))[:count]  # by rank, then class
    return chosen[np.lexsort((chosen, labels[chosen]))]  # shown grouped by class


def gradcam_figure(models: Sequence[keras.Model], slots: Sequence[str], examples: Examples, out_path: str | Path,
                   max_images: int = 6) -> Path | None:
    """One PNG: a row per test image, its crop and then each member's heatmap with its pick; None if no images."""
    if len(examples) == 0 or max_images <= 0:
        return None
    # The object API with the Agg canvas, as evaluation.plot_confusion: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = examples.take(pick_examples(examples.labels, max_images))
    crops = shown.images[..., ::-1]  # cv2's BGR -> RGB for matplotlib
    per_member = [_gradcam(model, shown.images) for model in models]
    figure = Figure(figsize=(1.7 * (1 + len(models)), 1.8 * len(shown)))
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(shown), 1 + len(models), squeeze=False)
    for row, axes in enumerate(grid):
        axes[0].imshow(crops[row])
        axes[0].set_title(f"true: {shown.classes[shown.labels[row]]}", fontsize=8)
        for column, (slot, (heatmaps, probabilities)) in enumerate(zip(slots, per_member), start=1):
            picked = int(probabilities[row].argmax())
            axes[column].imshow(crops[row])
            axes[column].imshow(heatmaps[row], cmap="jet", alpha=ALPHA, vmin=0.0, vmax=1.0)
            axes[column].set_title(f"{slot}: {shown.classes[picked]} {probabilities[row, picked]:.2f}", fontsize=8)
        for ax in axes:
            ax.set_axis_off()
    figure.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return out
