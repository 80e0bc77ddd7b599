#!/usr/bin/env python3
"""Benchmark training speed in one run on this machine (prints figures; not a test).

    .venv/bin/python benchmarks/bench_training.py [--images-per-class 256] [--epochs 3]

1. cnn1 and cnn2 at 128 px, training images/second:
   - original recipe: float32, ``keras.utils.image_dataset_from_directory`` over the JPEG files
     (decoded every epoch) with its default batch of 32, pixels rescaled in the model, no
     augmentation (generous to it);
   - ours: ``bloodcell.train.fit`` (bucket checkpoints, MLflow metrics, the precision policy the
     hardware offers, flip/transpose augmentation layers) on the decode-once uint8 arrays, with
     the batch size of the ``gpu`` profile (the 128 px settings).
   The first epoch (tracing, warm-up) is excluded.
2. vgg16 frozen phase, seconds per epoch: the frozen base computed once (features cached, only the
   head trains) against the base recomputed every epoch (full model, base frozen).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from bloodcell import arrays, hardware, models, tracking, train  # noqa: E402
from bloodcell import config  # noqa: E402
from bloodcell.config import ModelConfig  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.durations.append(time.perf_counter() - self.started)


def sample_files(data: Path, per_class: int, target: Path) -> tuple[list[Path], list[int], list[str]]:
    """Symlink ``per_class`` images of each class under ``target`` (a folder the original recipe reads)."""
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    files, labels = [], []
    for index, label in enumerate(classes):
        (target / label).mkdir(parents=True)
        for path in sorted(p for p in (data / label).iterdir() if not p.name.startswith("."))[:per_class]:
            (target / label / path.name).symlink_to(path)
            files.append(path)
            labels.append(index)
    return files, labels, classes


def original_recipe(name: str, folder: Path, epochs: int, batch: int) -> float:
    keras.mixed_precision.set_global_policy("float32")
    dataset = keras.utils.image_dataset_from_directory(folder, image_size=(128, 128), batch_size=batch,
                                                       shuffle=True, seed=777, verbose=False)
    count = sum(int(b[0].shape[0]) for b in dataset)
    model = models.build_model(name, 8, 128, augment=False)
    train._compile(model, 1e-3)
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer])
    return count * (epochs - 1) / sum(timer.durations[1:])


def our_recipe(name: str, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, bucket: str) -> tuple[float, str]:
    policy = hardware.apply_precision("auto")
    model = models.build_model(name, 8, 128, augment=True)
    train._compile(model, 1e-3)
    cfg = ModelConfig(image_size=128, epochs=epochs, batch_size=batch, early_stopping_patience=100)
    timer = EpochTimer()
    with mlflow.start_run() as run:
        epoch_logger = train.EpochMetricsLogger(tracking.Tracker(f"gs://{bucket}/bench", name), run.info.run_id)
        train.fit(model, (x, y), (x[:256], y[:256]), cfg, epochs, f"gs://{bucket}/bench/{name}-{time.time_ns()}",
                  epoch_logger=epoch_logger, extra_callbacks=(timer,))
    # validation (256 images) is part of each epoch here; count only training images, as for the original
    return len(x) * (epochs - 1) / sum(timer.durations[1:]), policy


def vgg16_frozen(x: np.ndarray, y: np.ndarray, size: int, epochs: int, batch: int) -> tuple[float, float, float]:
    """(seconds per epoch recomputing the base, seconds once for the cached features, seconds per cached epoch)."""
    hardware.apply_precision("auto")
    x = np.stack([keras.ops.convert_to_numpy(keras.ops.image.resize(img, (size, size))) for img in x]).astype(
        np.uint8) if x.shape[1] != size else x
    full = models.build_model("vgg16", 8, size, augment=False, weights=None)
    train._compile(full, 1e-3)
    timer = EpochTimer()
    full.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
    recompute = float(np.mean(timer.durations[1:]))

    base = models.vgg16_base(size, None)
    images = keras.Input((size, size, 3))
    extractor = keras.Model(images, base(models.VGGPreprocess()(images)))
    extractor.predict(x[:batch], verbose=0)
    started = time.perf_counter()
    features = extractor.predict(x, batch_size=batch, verbose=0).astype(np.float32)
    once = time.perf_counter() - started
    head = models.vgg16_head(features.shape[1:], 8)
    train._compile(head, 1e-3)
    timer = EpochTimer()
    head.fit(features, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
    return recompute, once, float(np.mean(timer.durations[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "PBC_dataset_normal_DIB"))
    parser.add_argument("--images-per-class", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement; the first is excluded")
    parser.add_argument("--original-batch-size", type=int, default=32, help="image_dataset_from_directory's default")
    parser.add_argument("--vgg-sizes", default="64,224")
    args = parser.parse_args()
    from bloodcell import storage
    from bloodcell.services import LocalServices, free_port

    with tempfile.TemporaryDirectory(prefix="bloodcell-bench-") as tmp:
        services = LocalServices(Path(tmp, "state"), "bench", free_port(), free_port())
        os.environ.update({k: v for k, v in services.start().items() if k == "STORAGE_EMULATOR_HOST"})
        storage.client.cache_clear()
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        try:
            folder = Path(tmp, "images")
            files, labels, _ = sample_files(Path(args.data), args.images_per_class, folder)
            x = np.stack([arrays.decode_resized(str(f), [128])[0] for f in files])
            y = np.array(labels, dtype=np.int32)
            print(f"{len(files)} images, {args.epochs} epochs per measurement (first excluded), "
                  f"CPU bf16: {hardware.cpu_has_bf16()}")
            ours_batch = {name: config.resolve("gpu").model(name).batch_size for name in ("cnn1", "cnn2")}
            for name in ("cnn1", "cnn2"):
                baseline = original_recipe(name, folder, args.epochs, args.original_batch_size)
                ours, policy = our_recipe(name, x, y, args.epochs, ours_batch[name], "bench")
                print(f"{name} @128px: original (float32, batch {args.original_batch_size}) {baseline:7.0f} img/s | "
                      f"ours ({policy}, batch {ours_batch[name]}) {ours:7.0f} img/s | {ours / baseline:.2f}x")
            for size in (int(s) for s in args.vgg_sizes.split(",")):
                subset = slice(None) if size <= 128 else slice(0, 512)
                batch = config.resolve("gpu").vgg16.batch_size
                recompute, once, cached = vgg16_frozen(x[subset], y[subset], size, args.epochs, batch)
                count = len(y[subset])
                print(f"vgg16 frozen phase @{size}px, {count} images: recompute base {recompute:.2f} s/epoch | "
                      f"cached features {cached:.3f} s/epoch (+{once:.1f} s once) | "
                      f"{recompute / cached:.0f}x per epoch")
        finally:
            services.stop()


if __name__ == "__main__":
    main()
