"""Ensemble inference at 160x160: five separate models against the fused single graph.

    python benchmarks/ensemble_inference.py [--size 160] [--repeats 30]

Both sides run through Keras' compiled predict step (`predict_on_batch`,
traced once, before timing) and through an eager call, at batch 1 and 32;
figures are the median of `repeats` runs, in ms per image. Separate means
five calls and a numpy sum; fused means one call of `export.build_ensemble_model`.
Target: fused at batch 1 <= 0.8x separate.
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from ferpipe.model.export import PROBABILITIES, build_ensemble_model
from ferpipe.model.networks import build_classifier


def median_ms_per_image(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)  # warm: traces and allocates
    run(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times)) / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    members = []
    for seed in range(5):
        keras.utils.set_random_seed(seed)
        members.append(build_classifier(args.classes, args.size, name=f"member{seed}"))
    fused = build_ensemble_model(members)
    rng = np.random.default_rng(0)

    runners = {
        "compiled": (
            lambda x: np.sum([m.predict_on_batch(x) for m in members], axis=0),
            lambda x: fused.predict_on_batch(x)[PROBABILITIES],
        ),
        "eager": (
            lambda x: np.sum([m(x, training=False).numpy() for m in members], axis=0),
            lambda x: fused(x, training=False)[PROBABILITIES].numpy(),
        ),
    }
    x = rng.uniform(-1, 1, (4, args.size, args.size, 3)).astype(np.float32)
    np.testing.assert_allclose(runners["compiled"][0](x), runners["compiled"][1](x), rtol=1e-5, atol=1e-6)
    print(f"five sub-networks, {args.size}x{args.size}, {args.classes} classes; median of {args.repeats}; ms per image")
    print(f"{'path':10}{'batch':>6}{'separate':>11}{'fused':>9}{'fused/separate':>16}")
    for path, (separate, single) in runners.items():
        for batch_size in (1, 32):
            batch = rng.uniform(-1, 1, (batch_size, args.size, args.size, 3)).astype(np.float32)
            a = median_ms_per_image(separate, batch, args.repeats)
            b = median_ms_per_image(single, batch, args.repeats)
            print(f"{path:10}{batch_size:>6}{a:>11.2f}{b:>9.2f}{b / a:>16.2f}")
    print("target: fused at batch 1 <= 0.80x separate")


if __name__ == "__main__":
    main()
