#!/usr/bin/env python3
"""Training images/second of cnn1 or cnn2 (augmentation on) under any Keras backend, e.g. JAX on a GPU.

Needs only keras (+ its backend), numpy and Pillow, so it runs on a machine without TensorFlow,
google-cloud-storage or MLflow. The data travels as a compact file (the training split re-encoded
as JPEG, about 40 MB at 128 px) or is replaced by random data of the split's exact shape.

    # here: re-encode a stored 128 px training split (prints the arrays URIs: see `bloodcell split`)
    .venv/bin/python benchmarks/gpu_throughput.py export gs://<bucket>/arrays/<key>/128 benchmarks/train128.npz
    # on the GPU machine
    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py run --data benchmarks/train128.npz --model cnn2
    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py run --synthetic 10150 --model cnn2

``run`` trains with the gpu profile's batch size and the precision the hardware offers
(``bloodcell.hardware``) and prints seconds per epoch and images/second, the first epoch
(compilation) excluded.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export(arrays_uri: str, output: Path, quality: int) -> None:
    """Write ``train_x`` as JPEG bytes (one blob + offsets) and ``train_y`` into an ``.npz``."""
    from PIL import Image
    from tqdm import tqdm

    from bloodcell import arrays

    x, y = arrays.load(arrays_uri, "train")
    blobs = []
    for image in tqdm(x, desc="encode", unit="img"):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, "JPEG", quality=quality)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(output, jpeg=np.concatenate(blobs), offsets=offsets, y=np.asarray(y), shape=np.asarray(x.shape))
    print(f"wrote {output}: {len(x)} images {x.shape[1:]} in {output.stat().st_size / 2**20:.1f} MiB")


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    saved = np.load(path)
    jpeg, offsets = saved["jpeg"], saved["offsets"]
    x = np.empty(tuple(saved["shape"]), np.uint8)
    for i in range(len(x)):
        x[i] = np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
    return x, saved["y"]


def run(args: argparse.Namespace) -> dict:
    import keras

    from bloodcell import config, hardware, models

    cfg = config.resolve("gpu").model(args.model)
    size, batch = cfg.image_size, args.batch_size or cfg.batch_size
    if args.data:
        x, y = load(args.data)
    else:
        rng = np.random.default_rng(777)
        x = rng.integers(0, 256, (args.synthetic, size, size, 3), dtype=np.uint8)
        y = rng.integers(0, 8, args.synthetic)
    policy = hardware.apply_precision("auto")
    model = models.build_model(args.model, 8, x.shape[1], augment=not args.no_augment)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    durations: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: durations.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: durations.__setitem__(-1, durations[-1] + time.perf_counter()),
    )
    model.fit(x, y, batch_size=batch, epochs=args.epochs, callbacks=[timer], verbose=2)
    steady = durations[1:] or durations
    per_epoch = sum(steady) / len(steady)
    return {
        "backend": keras.backend.backend(),
        "device": hardware.device_name(),
        "precision": policy,
        "model": args.model,
        "images": len(x),
        "image_size": int(x.shape[1]),
        "batch_size": batch,
        "augment": not args.no_augment,
        "data": str(args.data or f"synthetic {args.synthetic}"),
        "first_epoch_seconds": round(durations[0], 2),
        "seconds_per_epoch": round(per_epoch, 2),
        "images_per_second": round(len(x) / per_epoch, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="re-encode a stored training split compactly")
    out.add_argument("arrays_uri")
    out.add_argument("output", type=Path)
    out.add_argument("--quality", type=int, default=90)
    bench = commands.add_parser("run", help="measure training throughput")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="an .npz written by export")
    source.add_argument("--synthetic", type=int, metavar="N", help="N random images of the gpu profile's size")
    bench.add_argument("--model", default="cnn2", choices=["cnn1", "cnn2"])
    bench.add_argument("--epochs", type=int, default=4)
    bench.add_argument("--batch-size", type=int, help="default: the gpu profile's")
    bench.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()
    if args.command == "export":
        export(args.arrays_uri, args.output, args.quality)
    else:
        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
