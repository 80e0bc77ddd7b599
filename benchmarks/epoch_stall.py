#!/usr/bin/env python3
"""Measure the epoch-end stall of Keras' own input pipeline against ``bloodcell.feeding`` (prints figures).

    .venv/bin/python benchmarks/epoch_stall.py [--images 2048] [--epochs 5]

Trains the faithful cnn1 (float32, batch 32, 128 px, random images) for a few epochs, fed
(a) numpy arrays straight to ``Model.fit``, as the original notebooks did with their datasets, and
(b) ``bloodcell.feeding.batches``. Per epoch it prints the wall time, the time inside training
steps and the rest (epoch start and end). Under TensorFlow the rest of (a) grows with the epoch
(tf.data's autotuning thread sleeps in doubling periods, and tearing the iterator down waits for
the sleep to end); (b) turns autotuning off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from benchmarks.bench_training import EpochTimer
from bloodcell import feeding, models, recipes


def measure(label: str, fit_input: dict, epochs: int) -> None:
    keras.utils.set_random_seed(777)
    model = models.build_model("cnn1", 8, 128, augment=False)
    recipes.compile_model(model, 1e-3)
    timer = EpochTimer()
    model.fit(**fit_input, epochs=epochs, verbose=0, callbacks=[timer])
    for index, (wall, steps) in enumerate(zip(timer.durations, timer.in_steps, strict=True), 1):
        print(
            f"{label}: epoch {index}: {wall:6.2f} s wall, {steps:6.2f} s in steps, "
            f"{wall - steps:6.2f} s at the epoch's start and end",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 128, 128, 3), dtype=np.uint8)
    y = rng.integers(0, 8, args.images).astype(np.int32)
    print(f"backend {keras.backend.backend()}, {args.images} images, batch {args.batch_size}")
    measure("numpy to Model.fit  ", {"x": x, "y": y, "batch_size": args.batch_size}, args.epochs)
    measure(
        "bloodcell.feeding   ",
        {"x": feeding.batches(x, y, batch_size=args.batch_size, shuffle=True), "shuffle": False},
        args.epochs,
    )


if __name__ == "__main__":
    main()
