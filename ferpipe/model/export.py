"""The five members fused into one Keras graph: one input, one call, the ensemble's answer.

Serving one graph costs one dispatch instead of five, which matters most at
batch size 1. The graph's outputs are `probabilities` (the class-wise sum of
the five softmax vectors: argmax it for the ensemble's decision, as
`ensemble.ensemble_predictions` does) and `member_probabilities` (images,
members, classes). Input: crops at the members' size scaled to [-1, 1], as
`augment.to_network_input` makes them.

Members are rebuilt under unique names and their weights copied, so models
trained (or loaded) separately, whatever their names, can be fused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import keras

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.model.networks import build_extractor, build_subnetwork, classes_of, input_size_of

PROBABILITIES = "probabilities"
MEMBER_PROBABILITIES = "member_probabilities"


def build_ensemble_model(
    members: Sequence[keras.Model], names: Sequence[str] = ENSEMBLE_PARTS, name: str = "ensemble"
) -> keras.Model:
    """One model computing every member on the same input, plus their sum."""
    if len(members) != len(names):
        raise ValueError(f"{len(members)} members but {len(names)} names")
    size, classes = input_size_of(members[0]), classes_of(members[0])
    for member in members:
        if (input_size_of(member), classes_of(member)) != (size, classes):
            raise ValueError("members disagree on input size or classes")
    image = keras.Input((size, size, 3), name="image")
    branches = []
    for member, branch_name in zip(members, names):
        branch = build_subnetwork(build_extractor(size), classes, name=branch_name)
        branch.set_weights(member.get_weights())
        branches.append(branch(image))
    summed = keras.layers.Add(name=PROBABILITIES)(branches)
    stacked = keras.layers.Concatenate(axis=1, name=MEMBER_PROBABILITIES)(
        [keras.layers.Reshape((1, classes), name=f"{n}_row")(b) for n, b in zip(names, branches)]
    )
    return keras.Model(image, {PROBABILITIES: summed, MEMBER_PROBABILITIES: stacked}, name=name)


def save_ensemble(model: keras.Model, path: str | os.PathLike, saved_model_dir: str | os.PathLike | None = None) -> Path:
    """Write the fused model as .keras, and as a TensorFlow SavedModel when a directory is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    if saved_model_dir is not None:
        model.export(str(saved_model_dir), format="tf_saved_model", verbose=False)
    return path


def load_ensemble(path: str | os.PathLike) -> keras.Model:
    return keras.saving.load_model(path)
