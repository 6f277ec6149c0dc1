"""Training throughput at the paper's 160x160: our member training loop against a bare model.fit.

    python benchmarks/training_throughput.py [--images 192] [--epochs 4] [--size 160]

Our loop adds online augmentation (one cv2.warpAffine per image), validation,
early-stopping bookkeeping and a checkpoint (weights + optimizer state) after
every epoch. The bare fit trains the same architecture on the same arrays with
the same validation set and nothing else. Steady state: the first epoch
(tracing) is left out of both. Target: ours within 1.15x of bare.
Then all five members of an ensemble one after another, as one training task
after another would (the second and later members reuse the traced step).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import keras
import numpy as np

from ferpipe.data.parts import N_POINTS
from ferpipe.model.augment import to_network_input
from ferpipe.model.examples import Examples
from ferpipe.model.networks import build_classifier
from ferpipe.model.profiles import PAPER
from ferpipe.model.training import adam, ensemble_members, train_member

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def examples(n: int, size: int, seed: int) -> Examples:
    rng = np.random.default_rng(seed)
    points = np.clip(rng.normal(0.5, 0.15, (n, N_POINTS, 2)), 0.05, 0.95).astype(np.float32)
    return Examples(
        images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        points=points,
        labels=rng.integers(0, len(CLASSES), n),
        classes=CLASSES,
        image_ids=tuple(f"i{i}" for i in range(n)),
        subjects=tuple(f"s{i}" for i in range(n)),
    )


class EpochClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def bare_fit(train: Examples, val: Examples, epochs: int, validate: bool) -> float:
    """Images/s of model.fit on arrays, epochs after the first."""
    keras.utils.set_random_seed(0)
    model = build_classifier(len(CLASSES), train.size)
    model.compile(adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
    clock = EpochClock()
    validation = (to_network_input(val.images), val.one_hot()) if validate else None
    model.fit(to_network_input(train.images), train.one_hot(), batch_size=32, epochs=epochs,
              validation_data=validation, callbacks=[clock], verbose=0)
    return len(train) / float(np.mean(clock.seconds[1:]))


def ours(train: Examples, val: Examples, epochs: int, members: int) -> tuple[float, float]:
    """(steady-state images/s of one member, images/s over `members` whole trainings incl. all overheads)."""
    profile = replace(PAPER, input_size=train.size, baseline_epochs=epochs, patience=epochs)
    steady, images, started = [], 0, time.perf_counter()
    for member in ensemble_members("baseline")[:members]:
        ticks: list[float] = []  # progress is called once an epoch is fully done: validated and checkpointed
        with tempfile.TemporaryDirectory() as checkpoints:
            trained = train_member(member, train, val, profile, checkpoints, progress=lambda line: ticks.append(time.perf_counter()))
        trained_images = int(np.ceil(len(train) / 32) * 32)  # every batch is full
        steady.append(trained_images / float(np.mean(np.diff(ticks))))
        images += trained_images * len(trained.history)
    return float(steady[0]), images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192, help="training images (a multiple of 32 keeps it fair)")
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    train, val = examples(args.images, args.size, 0), examples(args.val, args.size, 1)
    print(f"{args.images} training + {args.val} validation images, {args.size}x{args.size}, {args.epochs} epochs, "
          f"batch 32, steady state (first epoch left out)")

    bare_val = bare_fit(train, val, args.epochs, validate=True)
    bare_plain = bare_fit(train, val, args.epochs, validate=False)
    one, _ = ours(train, val, args.epochs, members=1)
    print(f"bare model.fit, no validation        {bare_plain:8.1f} images/s")
    print(f"bare model.fit, same validation      {bare_val:8.1f} images/s")
    print(f"ours, one sub-network                {one:8.1f} images/s  "
          f"({bare_val / one:.2f}x bare with validation, {bare_plain / one:.2f}x bare without; target <= 1.15x)")
    steady_five, overall_five = ours(train, val, args.epochs, members=5)
    print(f"ours, five sub-networks in turn      {overall_five:8.1f} images/s of training over all five, "
          f"every overhead included ({overall_five / 5:.1f} ensemble-images/s)")


if __name__ == "__main__":
    main()
