"""The networks of the paper: one feature extractor, two heads.

A sub-network is the extractor followed by the classification head; during
transfer learning the same extractor first carries the landmark head. The
parameter counts in DESIGN.md section 5 are the check that this is the
paper's architecture: extractor 295,440 (BatchNorm's moving statistics
included, conv biases kept), sub-network 329,367 for 7 classes and 329,496
for 8. The counts do not depend on the dense layers' activations; we use ReLU
between the classification head's hidden layers (a stack of linear layers
would collapse into one) and keep the landmark head linear, as DESIGN says.
"""

from __future__ import annotations

import keras
import numpy as np

FILTERS = (16, 32, 64, 128)
FEATURES = 128
HIDDEN = 128
INPUT_SIZE = 160


def _initializer(kind: str, seed: int | None, layer: int):
    """A seeded initializer per layer; None draws from Keras' global generator.

    Seeds are explicit because `keras.utils.set_random_seed` also resets
    TensorFlow's global seed, which clears its kernel caches: every traced
    step then takes ~1 s more on its next call.
    """
    if seed is None:
        return kind
    classes = {"he_uniform": keras.initializers.HeUniform, "glorot_uniform": keras.initializers.GlorotUniform}
    return classes[kind](seed=(seed * 1009 + layer) % 2**31)


def build_extractor(
    input_size: int = INPUT_SIZE, name: str = "extractor", bn_momentum: float = 0.99, seed: int | None = None
) -> keras.Model:
    """Images (input_size, input_size, 3) in [-1, 1] -> 128-D features.

    `bn_momentum` 0.99 is Keras' default (the authors' notebook); short runs
    need a shorter memory, or the moving statistics that validation and the
    frozen-extractor phase use are still mostly their initial values.
    """
    images = keras.Input((input_size, input_size, 3), name="image")
    x = images
    for block, filters in enumerate(FILTERS, start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", kernel_initializer=_initializer("he_uniform", seed, 2 * block + conv),
                name=f"block{block}_conv{conv}",
            )(x)
            x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"block{block}_pool")(x)
    features = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(images, features, name=name)


def build_landmark_head(outputs: int, name: str = "landmark_head", seed: int | None = None) -> keras.Model:
    """128-D features -> `outputs` coordinates (x, y per point), linear."""
    features = keras.Input((FEATURES,), name="features")
    x = keras.layers.Dense(HIDDEN, kernel_initializer=_initializer("glorot_uniform", seed, 1), name="dense1")(features)
    points = keras.layers.Dense(outputs, kernel_initializer=_initializer("glorot_uniform", seed, 2), name="points")(x)
    return keras.Model(features, points, name=name)


def build_classification_head(classes: int, name: str = "classification_head", seed: int | None = None) -> keras.Model:
    """128-D features -> class probabilities."""
    features = keras.Input((FEATURES,), name="features")
    glorot = lambda layer: _initializer("glorot_uniform", seed, layer)  # noqa: E731
    x = keras.layers.Dense(HIDDEN, activation="relu", kernel_initializer=glorot(1), name="dense1")(features)
    x = keras.layers.Dense(HIDDEN, activation="relu", kernel_initializer=glorot(2), name="dense2")(x)
    probabilities = keras.layers.Dense(classes, activation="softmax", kernel_initializer=glorot(3), name="probabilities")(x)
    return keras.Model(features, probabilities, name=name)


def attach_head(extractor: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """extractor -> head as one model; both keep their identity (weights are shared, not copied)."""
    images = keras.Input(extractor.input_shape[1:], name="image")
    return keras.Model(images, head(extractor(images)), name=name)


def build_landmark_network(extractor: keras.Model, outputs: int, name: str = "landmark_network") -> keras.Model:
    return attach_head(extractor, build_landmark_head(outputs), name)


def build_subnetwork(extractor: keras.Model, classes: int, name: str = "subnetwork") -> keras.Model:
    return attach_head(extractor, build_classification_head(classes), name)


def build_classifier(classes: int, input_size: int = INPUT_SIZE, name: str = "subnetwork") -> keras.Model:
    """A fresh, randomly initialised sub-network (the baseline's members, or a shell to load weights into)."""
    return build_subnetwork(build_extractor(input_size), classes, name)


def infer(model: keras.Model, inputs: np.ndarray, batch_size: int = 32):
    """The model's outputs for network inputs, run eagerly in batches (an array, or a dict of them).

    Eager on purpose: `model.predict` traces a graph first, seconds on a CPU,
    which is most of the cost for the few hundred images of a fold.
    """
    if len(inputs) == 0:
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    chunks = [model(inputs[i : i + batch_size], training=False) for i in range(0, len(inputs), batch_size)]
    if isinstance(chunks[0], dict):
        return {key: np.concatenate([_numpy(c[key]) for c in chunks]) for key in chunks[0]}
    return np.concatenate([_numpy(c) for c in chunks])


def infer_compiled(model: keras.Model, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Like `infer`, through Keras' traced predict step: for a model that predicts again and again.

    The last batch is padded to full size, so one trace serves every call.
    At 160x160 this is ~1.7x faster than eager per image once traced.
    """
    if len(inputs) == 0:
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    chunks = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        short = batch_size - len(chunk)
        if short:
            chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), chunk.dtype)])
        chunks.append(np.asarray(model.predict_on_batch(chunk))[: batch_size - short])
    return np.concatenate(chunks)


def _numpy(tensor) -> np.ndarray:
    # Eager TF tensors convert without a copy-keyword DeprecationWarning this way.
    return tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)


def extractor_of(model: keras.Model) -> keras.Model:
    """The extractor inside a landmark network or sub-network."""
    return model.get_layer("extractor")


def head_of(model: keras.Model) -> keras.Model:
    """The head (landmark or classification) on top of the extractor."""
    return model.layers[-1]


def input_size_of(model: keras.Model) -> int:
    return int(model.input_shape[1])


def classes_of(model: keras.Model) -> int:
    return int(model.output_shape[-1])
