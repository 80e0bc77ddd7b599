#!/usr/bin/env python3
"""Train the models of a profile on the real split under any Keras backend, e.g. JAX on a bare GPU machine.

Needs only keras (+ its backend), numpy and Pillow: no TensorFlow, google-cloud-storage or MLflow.
The split travels as one compact file: every image of the pipeline's train/val/calibration/test split (same
ingest checks, same ``splitfolders`` assignment and seed), resized once and re-encoded (WebP at 224 px:
52 MiB for all 14,502 images). Models that train at another size are resized from it on arrival.

    # here: export the split of a dataset folder
    .venv/bin/python benchmarks/gpu_training.py export ../shared/datasets/PBC_dataset_normal_DIB split224.npz
    # on the GPU machine: the gpu profile's training of all three models (vgg16 from scratch: no weights there)
    KERAS_BACKEND=jax python benchmarks/gpu_training.py run --data split224.npz --json results.json

``run`` trains each model with the pipeline's own trainer, :func:`bloodcell.fitting.train_recipe` (its recipe's
schedule, early stopping, augmentation in the model, the precision the hardware offers; no checkpoints) and
prints, per model, the training seconds, images/second (first epoch, which compiles, left out) and test accuracy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcell.config import SUBSETS, Profile  # noqa: E402

Subsets = dict[str, tuple[np.ndarray, np.ndarray]]


def export(folder: Path, output: Path, profile_name: str, size: int, quality: int) -> None:
    """Write the pipeline's split of ``folder`` at ``size`` px as WebP bytes (one blob + offsets per subset)."""
    from bloodcell import config, ingest, split

    profile = config.resolve(profile_name)
    root = ingest.find_class_root(folder)
    records, _ = ingest.scan(root)
    records, _ = ingest.drop_duplicates(records)
    assignment = split.assign([asdict(r) for r in records], profile.split_ratio, profile.seed)
    classes = sorted({r.label for r in records})
    saved: dict[str, np.ndarray] = {"classes": np.asarray(classes), "size": np.asarray(size)}
    with ProcessPoolExecutor() as pool:
        for subset in SUBSETS:
            paths = [str(root / item["path"]) for item in assignment[subset]]
            blobs = list(pool.map(_encode, paths, [size] * len(paths), [quality] * len(paths), chunksize=64))
            saved[f"{subset}_webp"] = np.frombuffer(b"".join(blobs), np.uint8)
            saved[f"{subset}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
            saved[f"{subset}_y"] = np.asarray([classes.index(item["label"]) for item in assignment[subset]], np.int32)
    np.savez(output, **saved)
    counts = ", ".join(f"{s} {len(saved[f'{s}_y'])}" for s in SUBSETS)
    print(f"wrote {output}: {counts} images at {size} px, {output.stat().st_size / 2**20:.1f} MiB")


def _encode(path: str, size: int, quality: int) -> bytes:
    from PIL import Image

    from bloodcell import arrays

    buffer = io.BytesIO()
    Image.fromarray(arrays.decode_resized(path, [size])[0]).save(buffer, "WEBP", quality=quality)
    return buffer.getvalue()


def load(path: Path, sizes: list[int], limit: int = 0) -> tuple[list[str], dict[int, Subsets]]:
    """The exported split (or ``limit`` evenly spaced images of each subset), decoded once and resized to each
    of ``sizes`` px: per size, the subsets."""
    saved = np.load(path)
    by_size: dict[int, Subsets] = {size: {} for size in sizes}
    with ProcessPoolExecutor() as pool:
        for subset in SUBSETS:
            blob, offsets = saved[f"{subset}_webp"], saved[f"{subset}_offsets"]
            total = len(offsets) - 1
            chosen = np.linspace(0, total - 1, min(limit, total)).astype(int) if limit else np.arange(total)
            parts = [blob[offsets[i] : offsets[i + 1]].tobytes() for i in chosen]
            decoded = list(pool.map(_decode, parts, [sizes] * len(parts), chunksize=256))
            for index, size in enumerate(sizes):
                by_size[size][subset] = (np.stack([d[index] for d in decoded]), saved[f"{subset}_y"][chosen])
    return [str(c) for c in saved["classes"]], by_size


def _decode(blob: bytes, sizes: list[int]) -> list[np.ndarray]:
    from bloodcell import arrays

    return arrays.decode_resized(io.BytesIO(blob), sizes)


def train_one(model_name: str, profile: Profile, data: Subsets, n_classes: int, epochs: int | None) -> dict:
    """Train one model of ``profile`` with the pipeline's own trainer (:func:`fitting.train_recipe`, no
    checkpoints, from scratch: no pretrained weights here); its speed and test accuracy."""
    import keras

    from bloodcell import feeding, fitting, hardware, recipes
    from bloodcell.weights import Weights

    recipe = recipes.choose(profile.model(model_name), Weights.parse("none"))
    recipe = replace(recipe, epochs=epochs) if epochs else recipe
    keras.utils.set_random_seed(profile.seed)
    precision = hardware.apply_precision(profile.precision)
    (x, y), (x_val, y_val), (x_test, y_test) = (data[s] for s in ("train", "val", "test"))
    durations: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: durations.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: durations.__setitem__(-1, durations[-1] + time.perf_counter()),
    )
    started = time.perf_counter()
    model, history = fitting.train_recipe(
        recipe, n_classes, ((x, y), (x_val, y_val)), fitting.NoCheckpoints(), callbacks=(timer,)
    )
    seconds = time.perf_counter() - started
    steady = durations[1:] or durations
    predicted = feeding.predict(model, x_test, recipe.batch_size).argmax(axis=1)
    return {
        "model": model_name,
        "backend": keras.backend.backend(),
        "device": hardware.device_name(),
        "precision": precision,
        "image_size": recipe.image_size,
        "batch_size": recipe.batch_size,
        "params": model.count_params(),
        "epochs": len(history["loss"]),
        "train_seconds": round(seconds, 1),
        "first_epoch_seconds": round(durations[0], 1),
        "seconds_per_epoch": round(sum(steady) / len(steady), 2),
        "images_per_second": round(len(x) * len(steady) / sum(steady)),
        "best_val_accuracy": round(max(history["val_accuracy"]), 4),
        "test_accuracy": round(float(np.mean(predicted == y_test)), 4),
    }


def image_size(profile: Profile, model_name: str) -> int:
    from bloodcell import recipes
    from bloodcell.weights import Weights

    return recipes.choose(profile.model(model_name), Weights.parse("none")).image_size


def run(args: argparse.Namespace) -> list[dict]:
    from bloodcell import config

    profile = config.resolve(args.profile, config.parse_assignments(args.set))
    names = args.models.split(",")
    loading = time.perf_counter()
    # Decoded before Keras starts its backend: the decoding workers fork, and a forked JAX process can deadlock.
    classes, by_size = load(args.data, sorted({image_size(profile, n) for n in names}), args.limit)
    print(f"decoded the split at {list(by_size)} px in {time.perf_counter() - loading:.1f} s")
    results = []
    for model_name in names:
        data = by_size[image_size(profile, model_name)]
        result = train_one(model_name, profile, data, len(classes), args.epochs)
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    total = sum(r["train_seconds"] for r in results)
    print(f"all models: {total:.0f} s of training in total")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="export a dataset folder's split compactly")
    out.add_argument("folder", type=Path)
    out.add_argument("output", type=Path)
    out.add_argument("--profile", default="gpu", help="whose split ratio and seed (default: gpu)")
    out.add_argument("--size", type=int, default=224)
    out.add_argument("--quality", type=int, default=80)
    bench = commands.add_parser("run", help="train the models and report speed and test accuracy")
    bench.add_argument("--data", type=Path, required=True, help="an .npz written by export")
    bench.add_argument("--profile", default="gpu")
    bench.add_argument("--models", default="cnn2,cnn1,vgg16", help="comma-separated, of the profile's models")
    bench.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, e.g. vgg16.scratch.epochs=20"
    )
    bench.add_argument("--epochs", type=int, help="override every model's epochs (quick tries)")
    bench.add_argument("--limit", type=int, default=0, help="only N evenly spaced images of each subset (quick tries)")
    bench.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.command == "export":
        export(args.folder, args.output, args.profile, args.size, args.quality)
    else:
        run(args)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
