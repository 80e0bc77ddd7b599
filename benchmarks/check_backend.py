#!/usr/bin/env python3
"""Train all three models through the real trainer under a given Keras backend (smoke profile).

    KERAS_BACKEND=jax .venv/bin/python benchmarks/check_backend.py [--per-class 30] [--epochs 2]

Starts its own GCS emulator and MLflow server, ingests a sample of the shared images, splits it,
then runs ``bloodcell train`` for cnn1, cnn2 and vgg16 and ``bloodcell evaluate`` in subprocesses
that inherit KERAS_BACKEND; prints the backend, seconds and test accuracy of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "PBC_dataset_normal_DIB"))
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from bloodcell import config, ingest, split, storage
    from bloodcell.local.services import LocalServices, free_port

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    with tempfile.TemporaryDirectory(prefix="bloodcell-backend-") as tmp:
        sample = Path(tmp, "data")
        for class_dir in sorted(d for d in Path(args.data).iterdir() if d.is_dir()):
            (sample / class_dir.name).mkdir(parents=True)
            for image in sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))[: args.per_class]:
                shutil.copy(image, sample / class_dir.name / image.name)
        services = LocalServices(Path(tmp, "state"), "backend", free_port(), free_port())
        env = {**os.environ, **services.start(), "BLOODCELL_CACHE": str(Path(tmp, "cache"))}
        os.environ.update(env)
        storage.client.cache_clear()
        try:
            dataset = ingest.ingest(str(sample), "backend")
            split_uri = split.split(dataset.dataset_uri, "backend", config.resolve("smoke")).split_uri
            run_id = f"backend-{backend}-{time.time_ns()}"
            common = ["--bucket", "backend", "--run-id", run_id, "--profile", "smoke", "--vgg16-weights", "none"]
            smoke = config.PROFILES["smoke"]
            common += [f"--set={key}={args.epochs}" for key in epoch_settings(smoke)]
            for model in smoke.model_names:
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "bloodcell.cli", "train", model, split_uri, *common],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                print(f"{backend}: trained {model} in {time.perf_counter() - started:.0f} s")
            out = subprocess.run(
                [sys.executable, "-m", "bloodcell.cli", "evaluate", "--bucket", "backend", "--run-id", run_id],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results = json.loads(out.strip().splitlines()[-1])
            for model, result in results.items():
                print(f"{backend}: {model} test accuracy {result['accuracy']:.3f} ({result['n_test']} images)")
        finally:
            services.stop()


def epoch_settings(profile) -> list[str]:
    """The ``epochs`` setting of each model's each recipe (``cnn1.epochs``, ``vgg16.scratch.epochs``, ...)."""
    return [key for key in profile.flat_params() if key.endswith(".epochs") and key.split(".")[0] in profile.models]


if __name__ == "__main__":
    main()
